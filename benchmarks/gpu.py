"""Throughput of the ddpm config on one accelerator: training, the online tracker, the mixture loop.

    python -m benchmarks.gpu [--out FILE]           # the full run, on a GPU (sized for < 8 min on one H200)
    python -m benchmarks.gpu --smoke [--out FILE]   # the same code paths at toy sizes (< 1 min on 2 CPU cores)
    python -m benchmarks.gpu --parts train,mixture  # a subset of the three parts

Without an accelerator (jax's first device is a CPU) the full run refuses with exit status 2
and a one-line message suggesting --smoke: at ddpm size it would take hours on a CPU.

What is measured (every part: ahead-of-time compile timed on its own, a warm-up call timed
on its own, then --repeats timed calls each ended by block_until_ready; the median is kept):

1. train: ``jaxdiff_info.training.make_train_step`` (the library's compiled step: flip, t, eps,
   label dropout, the eps-MSE with the config's dropout, clipping, Adam, EMA) at batch 128 on
   the ddpm config, with bf16 (``TrainConfig.bf16``: bfloat16 compute, float32 master
   weights) and without; the state chained from call to call (donated), each timed call a run
   of steps. Images/s, the FLOPs per training image, the fraction of the chip's dense bf16
   peak, the device's peak memory.
2. analyze: the online tracker's step on the ddpm config, ``Tracker.run`` with the image
   analysis's sampler (``analysis.IMAGE_SAMPLER``: DDPM "large", x_0 clipped) and all K = 10
   classes evaluated at every step (one vmapped network call of N trajectories x K classes),
   with a per-class entropy observe; at N = 64 and 256, with the network's compute dtype
   float32 and bfloat16 (``unet.make_eps_fn(config, compute_dtype=jnp.bfloat16)``: the
   library's switch, which `analyze --bf16` uses). Trajectory-steps/s.
3. mixture: the tracking loop of ``benchmarks/tracking.py`` (``build_jax_loop``: Tracker with
   the closed-form mixture eps, block-entropy observe, one scan over all T = 1000 steps) at
   N = 1e6, d = 64, K = 4, with the default key and with threefry4x32. Steps/s.

FLOPs are counted from the jaxpr of each compiled function: 2 x the multiply-adds of every
``dot_general`` and ``conv_general_dilated`` in it (scan bodies times their length, the
larger branch of a cond), i.e. exactly the convolutions and matrix products the program asks
for, forward and backward (the "model FLOPs"; taps on the zeros that the input gradient of a
strided convolution inserts are left out); elementwise work is not counted. XLA's own
cost analysis of the lowered (unoptimised) train step, which counts every operation, is
reported beside it. The fraction of peak divides the jaxpr count by a table of dense bf16
tensor-core peaks (PEAK_BF16); for a device not in it, null.

Peak memory: ``device.memory_stats()["peak_bytes_in_use"]``, the process's peak so far, read
after each training variant (bfloat16 runs first, so its figure is its own); null where the
device keeps no statistics (the CPU). Each compiled program's own footprint (XLA's
memory_analysis: arguments + outputs - aliased + temporaries) is recorded too.

Output: a text table on stdout, and a JSON file (--out; default benchmarks/results_gpu.json
for the full run, none for --smoke), written atomically (a temporary file, then os.replace)
after every variant, with "complete": false until the end, so that a kill or a crash keeps
what was measured. A variant that fails (e.g. out of memory) records its error in place of
its figures and the run goes on; in the full run a variant is not started with less than
RESERVE_S of BUDGET_S left (recorded as skipped). "float32" is XLA's default precision, which
on NVIDIA GPUs from Ampere on means TF32 tensor-core products (recorded in the JSON).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # python benchmarks/gpu.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jaxdiff_info  # noqa: F401  (first: it sets its XLA:CPU flags before JAX starts)
import flax
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.tracking import FAST_IMPL, Case, build_jax_loop, provenance
from experiments.cli import Parser
from jaxdiff_info import estimators, training, unet
from jaxdiff_info.analysis import IMAGE_SAMPLER
from jaxdiff_info.decisions import class_label, membership
from jaxdiff_info.results import write_json
from jaxdiff_info.schedule import linear_schedule, respace
from jaxdiff_info.tracking import Tracker

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results_gpu.json"

# Ho et al. (2020), Appendix B: 21 steps/s at batch 128 on a TPU v3-8.
ANCHOR = {"source": "Ho et al. 2020, Appendix B", "device": "TPU v3-8", "steps_per_s": 21, "batch": 128,
          "images_per_s": 21 * 128}
TARGET_IMAGES_PER_S_BF16 = 8000  # on one H200
BUDGET_S = 480  # the full run is sized to finish within this on one H200

# Dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (SXM parts).
# dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (which quote twice these, "with
# sparsity"); the first name found in a device_kind wins, so the specific parts come first
PEAK_BF16 = {"H200 NVL": 835e12, "H100 NVL": 835e12, "H100 PCIE": 756e12, "H200": 989e12, "H100": 989e12,
             "A100": 312e12}


def peak_bf16_flops(device_kind: str) -> float | None:
    """The table's peak for a jax device_kind ("NVIDIA H200", "NVIDIA A100-SXM4-80GB", ...);
    None for a device not in it (an H200/H100 part the table does not name, e.g. a PCIe H200,
    as well)."""
    kind = device_kind.upper()
    for name, peak in PEAK_BF16.items():
        if name in kind:
            if name in ("H200", "H100") and ("PCIE" in kind or "NVL" in kind):
                return None
            return peak
    return None


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures. net: the U-Net; dataset: the TrainConfig's (its flip default)."""

    name: str  # the model name recorded
    net: unet.UNetConfig
    dataset: str
    train_batch: int
    train_steps: int  # training steps per timed call
    trajectories: tuple[int, ...]  # N of the analyze part, trajectories per network call
    analyze_steps: int  # reverse steps per timed call (one compiled scan)
    analyze_schedule_steps: int  # S of the respaced schedule the steps are taken from
    mixture: tuple[int, int, int, int]  # N, d, K, T
    repeats: int
    smoke: bool = False


FULL = Sizes("ddpm", unet.get_config("ddpm"), "cifar10", 128, 30, (64, 256), 10, 100,
             (1_000_000, 64, 4, 1000), 5)
# The smoke net: tiny with one resolution level, on 8x8x1 images, and ddpm's dropout, so that
# every layer kind of ddpm (conv, GroupNorm, attention, dropout) is on the path; the named
# tiny config compiles its training step in ~20 s per variant on 2 CPU cores, this one in ~8.
SMOKE_NET = dataclasses.replace(unet.get_config("tiny"), ch_mult=(1,), image_size=8, channels=1,
                                attn_resolutions=(), dropout=0.1)
SMOKE = Sizes("tiny (one level, 8x8x1)", SMOKE_NET, "digits", 4, 2, (10, 20), 2, 10, (2000, 64, 4, 50), 2, smoke=True)


# --- measuring ----------------------------------------------------------------------------

def timed_calls(fn: Callable, args: tuple, repeats: int) -> list[float]:
    """Wall seconds of `repeats` calls fn(*args), each blocked on its result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def _jaxprs_in(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _jaxprs_in(v)


def matmul_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and conv_general_dilated in a (closed) jaxpr.

    Sub-jaxprs are included: a scan body times its length, the larger branch of a cond, a
    while body once. A convolution's multiply-adds per output element are the kernel's input
    features times its window (rhs_spec = (out features, in features, *window)), divided by
    its input dilation: the input gradient of a strided convolution is a convolution over the
    output gradient with zeros inserted, and the taps on those zeros are not work done."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[i] for i in contract)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec
            dilation = math.prod(eqn.params["lhs_dilation"])  # taps on the inserted zeros do no work
            total += 2 * math.prod(out) * math.prod(rhs[i] for i in spec[1:]) // dilation
        if name == "cond":
            total += max((matmul_flops(b) for b in eqn.params["branches"]), default=0)
            continue
        inner = sum(matmul_flops(j) for v in eqn.params.values() for j in _jaxprs_in(v))
        total += inner * (eqn.params["length"] if name == "scan" else 1)
    return total


def xla_flops(lowered) -> float | None:
    """XLA's cost analysis of a lowered program: flops of every operation (None if unavailable)."""
    try:
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost["flops"])
        return flops if math.isfinite(flops) and flops > 0 else None
    except Exception:
        return None


def compiled_bytes(compiled) -> int | None:
    """XLA's memory analysis of a compiled program: arguments + outputs - aliased + temporaries."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)
    except Exception:
        return None


def peak_bytes_in_use(device) -> int | None:
    stats = device.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def timed_compile(fn, *args):
    """(jaxpr, lowered, compiled, seconds): trace, lower and compile ahead of time, timed together."""
    start = time.perf_counter()
    traced = fn.trace(*args)
    lowered = traced.lower()
    compiled = lowered.compile()
    return traced.jaxpr, lowered, compiled, time.perf_counter() - start


RESERVE_S = 60  # a variant of the full run starts only while this much of BUDGET_S is left


@dataclasses.dataclass
class Guard:
    """Runs one variant of a part (a dtype, a trajectory count, a key): skipped once the budget
    is spent, its error recorded in place of its figures, and the results file saved after it,
    so that a failure or a kill keeps everything measured before."""

    save: Callable[[], None]
    seconds_left: Callable[[], float]

    def __call__(self, label: str, measure: Callable[[], dict[str, Any]], store: Callable[[dict], None]) -> None:
        if self.seconds_left() < RESERVE_S:
            result = {"skipped": f"not started: less than {RESERVE_S} s of the {BUDGET_S} s budget left"}
        else:
            try:
                result = measure()
            except Exception as e:  # one variant's failure (e.g. out of memory) must not lose the others
                result = {"error": one_line(e)}
        store(result)
        self.save()
        said = result.get("skipped") or result.get("error") or "done"
        print(f"[benchmarks.gpu] {label}: {said}", file=sys.stderr, flush=True)


def one_line(e: Exception) -> str:
    """An exception as the first line of "Type: message", at most 500 characters."""
    return (f"{type(e).__name__}: {e}".splitlines() or ["?"])[0][:500]


def failed(v: dict[str, Any]) -> str | None:
    """The reason a variant has no figures ("error: ..." or "skipped: ..."), else None."""
    for key in ("error", "skipped"):
        if key in v:
            return f"{key}: {v[key]}"
    return None


def summary(times: list[float], per_call: float = 1.0) -> dict[str, Any]:
    """Median and all of the timed calls, in seconds per unit (a step) when a call has per_call units."""
    return {"median_s": statistics.median(times) / per_call, "all_s": [t / per_call for t in times]}


# --- 1. training -----------------------------------------------------------------------------

def bench_train(sizes: Sizes, repeats: int, peak: float | None, device, out: dict[str, Any], guard: Guard) -> None:
    net, B = sizes.net, sizes.train_batch
    configs = {dtype: training.TrainConfig(model=sizes.name, dataset=sizes.dataset, unet=net, batch_size=B,
                                           bf16=dtype == "bfloat16")
               for dtype in ("bfloat16", "float32")}
    rng = np.random.default_rng(0)
    batch = {"images": jnp.asarray(rng.integers(0, 256, (B, net.image_size, net.image_size, net.channels)),
                                   jnp.uint8),
             "labels": jnp.asarray(rng.integers(0, net.num_classes, B), jnp.int32)}
    params = unet.abstract_params(net)
    x1 = jnp.zeros((1, net.image_size, net.image_size, net.channels))
    forward = jax.make_jaxpr(lambda p: unet.apply(net, p, x1, jnp.ones(1, jnp.int32), jnp.zeros(1, jnp.int32)))(params)
    out.update({
        "config": sizes.name, "image_shape": [net.image_size, net.image_size, net.channels], "batch": B,
        "num_params": unet.count_params(params), "steps_per_timed_call": sizes.train_steps,
        "forward_flops_per_image": matmul_flops(forward),
    })

    def measure(tc: training.TrainConfig) -> dict[str, Any]:
        step = training.make_train_step(tc.net, tc)
        state = training.init_state(tc.net, tc)
        jaxpr, lowered, compiled, compile_s = timed_compile(step, state, batch)
        if "train_flops_per_image" not in out:  # the same network and step in either dtype
            out["train_flops_per_image"] = matmul_flops(jaxpr) / B
            xf = xla_flops(lowered)
            out["xla_flops_per_image"] = None if xf is None else xf / B
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(compiled(state, batch))
        warmup_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):  # the state chained through every call (it is donated)
            start = time.perf_counter()
            for _ in range(sizes.train_steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - start)
        loss = float(metrics["loss"])
        step_s = statistics.median(times) / sizes.train_steps
        flops_s = out["train_flops_per_image"] * B / step_s
        return {
            "compile_s": compile_s, "warmup_s": warmup_s, "step": summary(times, sizes.train_steps),
            "steps_per_s": 1.0 / step_s, "images_per_s": B / step_s, "tflops_per_s": flops_s / 1e12,
            "fraction_of_bf16_peak": None if peak is None else flops_s / peak,
            "peak_bytes_in_use": peak_bytes_in_use(device), "compiled_bytes": compiled_bytes(compiled),
            "loss_finite": math.isfinite(loss),
        }  # the compiled step and its state go out of scope: their device memory is freed

    for dtype, tc in configs.items():  # bfloat16 first: its peak memory is its own
        guard(f"train {dtype}", lambda tc=tc: measure(tc), lambda v, dtype=dtype: out.__setitem__(dtype, v))
    bf16 = out["bfloat16"].get("images_per_s")
    out["anchor_ratio_bf16"] = None if bf16 is None else bf16 / ANCHOR["images_per_s"]
    out["target_met_bf16"] = None if sizes.smoke or bf16 is None else bf16 >= TARGET_IMAGES_PER_S_BF16


# --- 2. the online tracker on the network ------------------------------------------------------

def class_entropy_sums(classes, K: int):
    """observe(t, x_t, log P(k | x_t), log_ratio) -> (K,) sums of H(label | x_t) in bits over the
    trajectories of each generating class (N need not be a multiple of K)."""
    label = membership([class_label(K)], K)

    def observe(t, x, log_post, log_ratio):
        h = estimators.batch_problem_entropy_bits(log_post, label)[:, 0]
        return jax.ops.segment_sum(h, classes, num_segments=K)

    return observe


def tracker_run(tracker: Tracker, classes, ts, observe):
    """jit of (params, state) -> Tracker.run over the steps ts, the observe stacked over them."""
    return jax.jit(lambda params, state: tracker.run(params, state, classes, ts, observe, False))


@jax.jit
def perturbed(params, key):
    """params + 0.02 N(0, 1) on every leaf, in one compiled call."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def bench_analyze(sizes: Sizes, repeats: int, peak: float | None, out: dict[str, Any], guard: Guard) -> None:
    net = sizes.net
    K = net.num_classes
    # perturbed: the zero-initialised output layers would make every eps 0
    params = perturbed(unet.init_params(net, jax.random.key(0)), jax.random.key(1))
    schedule = respace(linear_schedule(unet.TRAIN_STEPS), sizes.analyze_schedule_steps)
    S, n = sizes.analyze_schedule_steps, sizes.analyze_steps
    ts = jnp.arange(S, S - n, -1, dtype=jnp.int32)
    shape = (net.image_size, net.image_size, net.channels)
    out.update({"config": sizes.name, "num_classes": K,
                "sampler": "DDPM 'large' (sigma_t^2 = beta_t), x_0 clipped to [-1, 1]",
                "schedule_steps": S, "steps_per_timed_call": n,
                "bf16_via": "unet.make_eps_fn(config, compute_dtype=jnp.bfloat16) in Tracker (the library's switch, "
                            "as `python -m experiments.cifar10 analyze --bf16` uses it)",
                "runs": []})

    def measure(N: int, dtype: str) -> dict[str, Any]:
        classes = jnp.arange(N, dtype=jnp.int32) % K
        observe = class_entropy_sums(classes, K)
        eps = unet.make_eps_fn(net, compute_dtype=jnp.bfloat16 if dtype == "bfloat16" else None)
        tracker = Tracker(eps, schedule, IMAGE_SAMPLER, K)
        state = tracker.init(jax.random.key(2), N, shape, jnp.zeros(K))
        jaxpr, _, compiled, compile_s = timed_compile(tracker_run(tracker, classes, ts, observe), params, state)
        start = time.perf_counter()
        final, sums = jax.block_until_ready(compiled(params, state))
        warmup_s = time.perf_counter() - start
        times = timed_calls(compiled, (params, state), repeats)
        step_s = statistics.median(times) / n
        flops_s = matmul_flops(jaxpr) / n / step_s
        return {
            "compile_s": compile_s, "warmup_s": warmup_s, "step": summary(times, n),
            "trajectory_steps_per_s": N / step_s, "images_per_s": N * K / step_s, "tflops_per_s": flops_s / 1e12,
            "fraction_of_bf16_peak": None if peak is None else flops_s / peak,
            "compiled_bytes": compiled_bytes(compiled),
            "finite": bool(np.isfinite(np.asarray(final.log_posterior)).all() and np.isfinite(np.asarray(sums)).all()),
        }

    for N in sizes.trajectories:
        for dtype in ("float32", "bfloat16"):
            head = {"trajectories": N, "compute_dtype": dtype, "images_per_call": N * K}
            guard(f"analyze N = {N} {dtype}", lambda N=N, dtype=dtype: measure(N, dtype),
                  lambda v, head=head: out["runs"].append({**head, **v}))


# --- 3. the mixture tracking loop --------------------------------------------------------------

def bench_mixture(sizes: Sizes, repeats: int, out: dict[str, Any], guard: Guard) -> None:
    N, d, K, T = sizes.mixture
    case = Case(N, d, K, T)
    out.update({"N": N, "d": d, "K": K, "T": T, "runs": [],
                "what": "benchmarks.tracking.build_jax_loop: Tracker + mixture.eps_fn (matrix form), DDPM 'small', "
                        "block-entropy observe, one scan over all T steps"})

    def measure(impl) -> dict[str, Any]:
        go, compile_s = build_jax_loop(case, key_impl=impl)
        warmup_s = go()[0]
        times = [go()[0] for _ in range(repeats)]
        loop_s = statistics.median(times)
        return {"compile_s": compile_s, "warmup_s": warmup_s, "loop": summary(times), "steps_per_s": T / loop_s,
                "trajectory_steps_per_s": N * T / loop_s}

    for impl in (None, FAST_IMPL):
        name = impl or "threefry2x32 (default)"
        guard(f"mixture {name}", lambda impl=impl: measure(impl),
              lambda v, name=name: out["runs"].append({"key_impl": name, **v}))


# --- output -----------------------------------------------------------------------------------

def _fmt_bytes(b: int | None) -> str:
    return "unavailable" if b is None else f"{b / 2**30:.2f} GiB"


def _pct(f: float | None) -> str:
    return "n/a" if f is None else f"{100 * f:.1f}%"


def table(r: dict[str, Any]) -> str:
    dev = r["device"]
    peak = r["peak_bf16_flops_per_s"]
    peak_text = "unknown (not in PEAK_BF16)" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
    lines = [f"# benchmarks.gpu{' --smoke' if r['smoke'] else ''}: {dev['device_kind']} ({dev['platform']}), "
             f"jax {r['versions']['jax']}, {r['date']}; {r['provenance']}",
             f"# anchor: Ho et al. trained this model at 21 steps/s at batch 128 (~2,700 images/s) on a TPU v3-8; "
             f"target on one H200: >= {TARGET_IMAGES_PER_S_BF16:,} images/s bf16",
             f"# dense bf16 peak of this device: {peak_text}"]
    for part in PARTS:
        if part in r and failed(r[part]):
            lines += ["", f"{part}: {failed(r[part])}"]
    if "train" in r and not failed(r["train"]):
        t = r["train"]
        lines += ["", f"training, {t['config']}, batch {t['batch']} ({t['num_params']:,} parameters); FLOPs per image "
                  f"(convolutions + matmuls, jaxpr count): forward {t['forward_flops_per_image'] / 1e9:.3f} G"
                  + ("" if "train_flops_per_image" not in t else
                     f", train step {t['train_flops_per_image'] / 1e9:.3f} G")
                  + ("" if t.get("xla_flops_per_image") is None else
                     f" (XLA cost analysis, every op: {t['xla_flops_per_image'] / 1e9:.3f} G)"),
                  f"  {'dtype':<9} {'compile s':>9} {'ms/step':>8} {'steps/s':>8} {'images/s':>9} {'TFLOP/s':>8} "
                  f"{'of bf16 peak':>12}  {'peak memory':<12} {'x anchor':>8}"]
        for dtype in ("float32", "bfloat16"):
            v = t.get(dtype, {"skipped": "not reached"})
            if failed(v):
                lines.append(f"  {dtype:<9} {failed(v)}")
                continue
            lines.append(f"  {dtype:<9} {v['compile_s']:>9.1f} {1e3 * v['step']['median_s']:>8.2f} "
                         f"{v['steps_per_s']:>8.2f} "
                         f"{v['images_per_s']:>9.1f} {v['tflops_per_s']:>8.2f} {_pct(v['fraction_of_bf16_peak']):>12}  "
                         f"{_fmt_bytes(v['peak_bytes_in_use']):<12} {v['images_per_s'] / ANCHOR['images_per_s']:>8.2f}")
        if t.get("target_met_bf16") is not None:
            verdict = "met" if t["target_met_bf16"] else "NOT met"
            lines.append(f"  target (>= {TARGET_IMAGES_PER_S_BF16:,} images/s bf16): {verdict}")
    if "analyze" in r and not failed(r["analyze"]):
        a = r["analyze"]
        lines += ["", f"analyze: online tracker, {a['config']}, all {a['num_classes']} classes every step, "
                  f"{a['steps_per_timed_call']} steps per call; bf16 via {a['bf16_via'].split(' (')[0]}",
                  f"  {'N':>5} {'dtype':<9} {'images/call':>11} {'compile s':>9} {'ms/step':>9} "
                  f"{'trajectory-steps/s':>18} {'images/s':>9} {'of bf16 peak':>12}"]
        for v in a["runs"]:
            if failed(v):
                lines.append(f"  {v['trajectories']:>5} {v['compute_dtype']:<9} {failed(v)}")
                continue
            lines.append(f"  {v['trajectories']:>5} {v['compute_dtype']:<9} {v['images_per_call']:>11} "
                         f"{v['compile_s']:>9.1f} "
                         f"{1e3 * v['step']['median_s']:>9.2f} {v['trajectory_steps_per_s']:>18.1f} "
                         f"{v['images_per_s']:>9.1f} {_pct(v['fraction_of_bf16_peak']):>12}")
    if "mixture" in r and not failed(r["mixture"]):
        m = r["mixture"]
        lines += ["", f"mixture tracking loop: N = {m['N']:,}, d = {m['d']}, K = {m['K']}, T = {m['T']}",
                  f"  {'key':<24} {'compile s':>9} {'loop s':>8} {'steps/s':>9}"]
        for v in m["runs"]:
            if failed(v):
                lines.append(f"  {v['key_impl']:<24} {failed(v)}")
                continue
            lines.append(f"  {v['key_impl']:<24} {v['compile_s']:>9.2f} {v['loop']['median_s']:>8.3f} "
                         f"{v['steps_per_s']:>9.1f}")
    parts = ", ".join(f"{k} {r[k]['wall_s']:.1f} s" for k in PARTS if "wall_s" in r.get(k, {}))
    lines += ["", f"# whole run {r['wall_s']:.1f} s ({parts}); medians of {r['repeats']} timed calls after a timed "
              f"warm-up call"]
    if not r.get("complete"):
        lines.append("# INCOMPLETE: the run stopped before its end")
    if not r["smoke"] and r["wall_s"] > BUDGET_S:
        lines.append(f"# over the {BUDGET_S / 60:.0f}-minute budget of the full run")
    return "\n".join(lines)


# --- CLI ---------------------------------------------------------------------------------------

PARTS = ("train", "analyze", "mixture")


PROG = "python -m benchmarks.gpu"


def parse_args(argv=None):
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help=f"the JSON results file (default: {DEFAULT_OUT.relative_to(REPO)} for the full run, "
                        "none for --smoke)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--smoke", action="store_true", help="toy sizes, any device: checks the code paths in < 1 min")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default: 5; smoke 2)")
    a = p.parse_args(argv)
    a.parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    unknown = [x for x in a.parts if x not in PARTS]
    if unknown or not a.parts:
        p.error(f"--parts: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if a.repeats is not None and a.repeats < 1:
        p.error("--repeats must be >= 1")
    if a.out is None and not a.smoke:
        a.out = DEFAULT_OUT
    if a.out is not None and a.out.is_dir():
        p.error(f"--out {a.out} is a folder; give the path of the JSON file to write")
    if a.out is not None and a.out.exists() and not a.overwrite:
        p.error(f"--out {a.out} already exists (an earlier run's results); pass --overwrite to replace it or "
                f"choose another --out")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = jax.devices()[0]
    if device.platform == "cpu" and not args.smoke:
        print(f"{PROG}: error: no accelerator found (jax's device is the CPU); the full run is sized for one GPU "
              "and would take hours here: use --smoke for the CPU smoke run", file=sys.stderr)
        return 2
    sizes = SMOKE if args.smoke else FULL
    repeats = args.repeats or sizes.repeats
    peak = peak_bf16_flops(device.device_kind)
    start = time.perf_counter()
    r: dict[str, Any] = {
        "benchmark": "benchmarks/gpu.py", "smoke": args.smoke,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"platform": device.platform, "device_kind": device.device_kind, "count": jax.device_count(),
                   "accelerator": device.platform != "cpu"},
        "versions": {"jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
                     "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version()},
        "provenance": provenance(),
        "float32_precision": f"jax_default_matmul_precision = {jax.config.jax_default_matmul_precision}: "
                             "XLA's default precision, under which NVIDIA GPUs from Ampere on run float32 "
                             "convolutions and matmuls on TF32 tensor cores (float32 storage and sums, products "
                             "of inputs rounded to a 10-bit mantissa); the 'float32' rows are that",
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "anchor": ANCHOR, "target_images_per_s_bf16": TARGET_IMAGES_PER_S_BF16,
        "peak_bf16_flops_per_s": peak,
        "peak_source": "dense bf16 tensor-core peak of the device kind from NVIDIA's data sheets "
                       f"({', '.join(f'{k} {v / 1e12:.0f}' for k, v in PEAK_BF16.items())} TFLOP/s; "
                       "H100/H200 PCIe and NVL parts excluded); null: not in the table",
        "flops_method": "jaxpr count: 2 x multiply-adds of every dot_general and conv_general_dilated of the "
                        "compiled function (forward and backward), elementwise work not counted; "
                        "xla_flops_per_image: XLA's cost analysis of the lowered train step (every op)",
        "memory_method": "peak_bytes_in_use: device.memory_stats(), the process's peak after each training variant "
                         "(bfloat16 first); null: the device keeps no statistics. compiled_bytes: XLA's "
                         "memory_analysis of the program (arguments + outputs - aliased + temporaries)",
        "repeats": repeats,
    }
    if device.platform == "cpu":
        r["memory_stats"] = "unavailable: memory_stats() is None on the CPU"
    r["complete"] = False

    def save():  # after every variant: a failure or a kill later keeps what was measured
        r["wall_s"] = time.perf_counter() - start
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.out, r)

    try:
        save()  # an --out that cannot be written is found before the run
    except OSError as e:
        print(f"{PROG}: error: cannot write {args.out}: {e.strerror or e}; choose another --out", file=sys.stderr)
        return 2
    budget = math.inf if args.smoke else BUDGET_S
    guard = Guard(save, lambda: budget - (time.perf_counter() - start))
    for part in args.parts:
        print(f"[benchmarks.gpu] {part} ...", file=sys.stderr, flush=True)
        part_start = time.perf_counter()
        r[part] = {}
        try:
            if part == "train":
                bench_train(sizes, repeats, peak, device, r[part], guard)
            elif part == "analyze":
                bench_analyze(sizes, repeats, peak, r[part], guard)
            else:
                bench_mixture(sizes, repeats, r[part], guard)
        except Exception as e:  # in a part's set-up, outside its variants
            r[part] = {"error": one_line(e)}
        r[part]["wall_s"] = time.perf_counter() - part_start
    r["complete"] = True
    try:
        save()
    except OSError as e:
        print(f"{PROG}: error: cannot write {args.out}: {e.strerror or e}; the figures are below", file=sys.stderr)
        print(table(r))
        return 2
    print(table(r))
    if args.out is not None:
        print(f"(written to {args.out})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the results file (if any) holds the variants measured so far, "
              "with complete = false", file=sys.stderr)
        sys.exit(130)
