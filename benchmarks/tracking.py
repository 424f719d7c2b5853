"""Online tracking loop: JAX (`Tracker`, one compiled `lax.scan`) against a plain NumPy loop.

    python -m benchmarks.tracking --repeats 5     # the target run (~10 min on an idle 2-core box)
    python benchmarks/tracking.py --quick         # a smoke run (~30 s)
    python -m benchmarks.tracking --breakdown     # what the JAX step spends its time on (~4 min)
    python -m benchmarks.tracking --experiment-phases   # where python -m experiments.gmm spends its time

For every N (trajectories in total), d and K, on a Gaussian mixture with isotropic components
(default N = 1e5, K = 4, d = 1 and d = 64):

(a) JAX: `Tracker` with the mixture's closed-form eps (`mixture.eps_fn`), DDPM "fixed small",
    and the observe of `estimators.online_block_sums` (block sums of the class-label entropy,
    `estimators.block_entropy_sums`), in one jitted scan over all T steps (the same numbers as
    `online_block_sums(..., chunk=None)` with the same key). The classes are single isotropic
    components, so the step takes the class log-likelihoods in matrix form
    (`Tracker.affine_step`). Once with the default key (threefry2x32) and once with the
    fast configuration's key (`jax.random.key(seed, impl=--fast-impl)`, threefry4x32). Compiled
    ahead of time (`jit(...).lower(...).compile()`); the compile time is reported on its own
    and is not part of the ratio.
(b) NumPy: `benchmarks.numpy_reference.run_online`, the same estimator as a Python loop over
    steps, vectorised over trajectories and classes. For N above --numpy-full-max it is
    timed on the first --numpy-steps steps and scaled by T / steps (every step but the last
    costs the same); the table says so.
(c) the default experiment end to end, `python -m experiments.gmm --out <tmp> --no-progress`,
    in a subprocess (start-up, compilation and figures included).

Both implementations are checked to agree statistically: the class-averaged entropy curve
sum_k pi_k H_k(t), over all T steps at N = --check-size (NumPy runs every step there), must
differ by less than --tolerance bits. The runs of (a) and (b) for one configuration are back
to back (and alternate over --repeats, minimum kept), so machine load hits both alike.

Then, in the same run: the normal draws of one step and the whole loop with every PRNG
implementation JAX offers (`jax.random.key(seed, impl=...)`); and where the time goes, each
step's flops and bytes (XLA's cost analysis of the compiled step, and the least the step must
move) against the machine's matmul rate and memory bandwidth measured in the same run
(`benchmarks.machine_limits`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # python benchmarks/tracking.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if "--jaxlib-default-fusions" in sys.argv:  # a breakdown worker: start XLA before jaxdiff_info
    import jax  # can set its flag, so XLA:CPU keeps jaxlib's default (YNNPACK) fusions

    jax.devices()
import jaxdiff_info  # noqa: F401  (otherwise first: it sets its XLA:CPU flags before JAX starts)
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine_limits
from benchmarks import numpy_reference as ref
from jaxdiff_info import decisions, estimators
from jaxdiff_info import mixture as gmm
from jaxdiff_info.schedule import Sampler, linear_schedule, reverse_std
from jaxdiff_info.tracking import TrackState, Tracker

REPO = Path(__file__).resolve().parent.parent
SAMPLER = Sampler("ddpm", "small")
# the PRNG implementations of jax.random.key(seed, impl=...); the first is JAX's default
KEY_IMPLS = ("threefry2x32", "threefry4x32", "philox2x32", "philox4x32", "rbg", "unsafe_rbg")
FAST_IMPL = "threefry4x32"  # the fastest normal draws on the CPUs measured (benchmarks/README.md)


# --- the problem ---------------------------------------------------------------------------

def benchmark_mixture(num_classes: int, dim: int, seed: int = 0):
    """(means (K, d), stds (K,), weights (K,)) float64: means ~ N(0, (4^2 / d) I) so that two
    means are ~5.7 apart in any d, stds uniform in [0.2, 1], equal weights."""
    rng = np.random.default_rng(1000 + seed)
    means = rng.normal(size=(num_classes, dim)) * 4.0 / np.sqrt(dim)
    stds = rng.uniform(0.2, 1.0, size=num_classes)
    return means, stds, np.full(num_classes, 1.0 / num_classes)


@dataclasses.dataclass
class Case:
    num: int  # N, trajectories in total
    dim: int
    num_classes: int
    steps: int

    @property
    def per_class(self) -> int:
        return self.num // self.num_classes


# --- (a) the JAX loop --------------------------------------------------------------------------

def loop_steps(case: Case, run_steps: int | None) -> jax.Array:
    """t = T, T-1, ...: all T steps, or the first run_steps of them."""
    stop = 0 if run_steps is None else max(case.steps - run_steps, 0)
    return jnp.arange(case.steps, stop, -1, dtype=jnp.int32)


def build_jax_loop(case: Case, seed: int = 0, observe: bool = True, key_impl: str | None = None,
                   eps_fn: Callable | None = None, run_steps: int | None = None, batch_size: int | None = None):
    """The loop of `estimators.online_block_sums` (chunk=None: one scan over all steps), split
    into an ahead-of-time compile and a run. Returns (run() -> (seconds, class entropy
    (T, K) in loop order t = T..1), compile seconds). run_steps: only the first steps;
    batch_size: `Tracker.batch_size` (trajectories per step call, lax.map over the rest)."""
    means, stds, weights = benchmark_mixture(case.num_classes, case.dim, seed)
    mix = gmm.make_mixture(means, stds, weights)
    schedule = linear_schedule(case.steps)
    K = case.num_classes
    tracker = Tracker(eps_fn or gmm.eps_fn(schedule), schedule, SAMPLER, K, batch_size=batch_size)
    blocks = estimators.make_blocks(K, case.per_class)
    classes = jnp.asarray(blocks.classes)
    membership = decisions.membership([decisions.class_label(K)], K)

    def observe_fn(t, x, log_post, log_ratio):  # as in online_block_sums (no record)
        return estimators.block_entropy_sums(log_post, membership, blocks)

    run = jax.jit(lambda p, s, c, ts: tracker.run(p, s, c, ts, observe_fn if observe else None, False))
    key = jax.random.key(seed, impl=key_impl) if key_impl else jax.random.key(seed)
    state = tracker.init(key, classes.shape[0], (case.dim,), mix.log_weights)
    ts = loop_steps(case, run_steps)
    jax.block_until_ready(state)
    start = time.perf_counter()
    compiled = run.lower(mix, state, classes, ts).compile()
    compile_s = time.perf_counter() - start

    def go():
        start = time.perf_counter()
        final, sums = jax.block_until_ready(compiled(mix, state, classes, ts))
        seconds = time.perf_counter() - start
        if sums is None:
            return seconds, None
        per_class = np.asarray(sums)[..., 0].sum(axis=2) / case.per_class  # (T, K)
        return seconds, per_class

    go.compiled = compiled
    return go, compile_s


def general_step_eps(schedule):
    """The mixture's eps without `affine_classes`: the Tracker then takes its general step,
    every class's eps formed (`all_classes`) and the squared distances taken directly, as
    before the matrix form."""
    eps = gmm.eps_fn(schedule)
    general = lambda *a: eps(*a)  # noqa: E731
    general.all_classes, general.check_schedule = eps.all_classes, eps.check_schedule
    return general


def step_cost(go) -> dict[str, float]:
    """XLA's cost analysis of a compiled loop: {flops, bytes accessed, transcendentals} of one
    pass through the scan's body (one step; XLA counts a loop body once, so the rolled loop
    inside threefry2x32 is counted once of its five passes)."""
    cost = go.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(cost.get(k, float("nan"))) for k in ("flops", "bytes accessed", "transcendentals")}


# --- (b) the NumPy loop ------------------------------------------------------------------------

def run_numpy(case: Case, max_steps: int | None, seed: int = 0, dtype=np.float32):
    means, stds, weights = benchmark_mixture(case.num_classes, case.dim, seed)
    mix = ref.make_numpy_mixture(means, stds, weights, dtype)
    r = ref.run_online(mix, case.per_class, case.steps, seed=seed, dtype=dtype, max_steps=max_steps)
    return r.seconds, r.class_entropy[..., 0].astype(np.float64), r.steps.shape[0]


# --- (c) the default experiment ------------------------------------------------------------------

def time_gmm_experiment(extra: list[str], repeats: int) -> list[float]:
    """Wall seconds of `repeats` runs of the experiment in subprocesses that share a fresh,
    empty compilation cache (JAXDIFF_INFO_CACHE): the first run compiles (cold), later ones
    find their programs in the cache (warm)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, JAXDIFF_INFO_CACHE=str(Path(tmp) / "xla"))
        for i in range(repeats):
            cmd = [sys.executable, "-m", "experiments.gmm", "--out", str(Path(tmp) / f"gmm{i}"), "--no-progress", *extra]
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return times


# --- output --------------------------------------------------------------------------------------

class Log:
    def __init__(self, path: Path | None):
        self.lines: list[str] = []
        self.path = path

    def __call__(self, line: str = ""):
        print(line, flush=True)
        self.lines.append(line)

    def save(self):
        if self.path is not None:
            self.path.write_text("\n".join(self.lines) + "\n")
            print(f"(written to {self.path})")


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs visible; jax {jax.__version__} ({jax.devices()[0].platform}), numpy {np.__version__}"


def provenance() -> str:
    """The commit the library was at, the files of jaxdiff_info/ and benchmarks/ that differ from
    it (modified or new), and XLA_FLAGS."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout
        except OSError:
            return ""
    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    changed = sorted(line[3:].strip() for line in git("status", "--porcelain", "--", "jaxdiff_info", "benchmarks")
                     .splitlines() if line.strip())
    dirty = f" plus uncommitted changes to {', '.join(changed)}" if changed else ""
    return f"library at commit {head}{dirty}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


# --- the benchmark -----------------------------------------------------------------------------

def key_label(impl: str | None) -> str:
    return impl or f"{jax.random.key_impl(jax.random.key(0))} (default)"


def benchmark(args, log: Log) -> None:
    cases = [Case(n, d, k, args.steps) for n in args.sizes for d in args.dims for k in args.classes]
    impls = [None] + ([args.fast_impl] if args.fast_impl else [])
    log(f"# Online tracking loop: JAX vs NumPy  ({time.strftime('%Y-%m-%d %H:%M')})")
    log(f"# machine: {machine()}")
    log(f"# {provenance()}")
    log(f"# T = {args.steps} steps, DDPM sigma_t^2 = beta~_t, float32 on both sides, class label entropy observed "
        f"every step; repeats = {args.repeats} (min kept, JAX and NumPy alternating); load average at start: "
        f"{load_average()}")
    log(f"# NumPy: every step for N <= {args.numpy_full_max}, else the first {args.numpy_steps} steps x T/steps "
        f"(marked *)")
    started = time.perf_counter()
    limits = machine_limits.measure()
    log(f"# machine limits (measured now): {machine_limits.describe(limits)}")
    log()
    header = (f"{'N':>7} {'d':>3} {'K':>3} {'key impl':<24} | {'JAX s':>8} {'NumPy s':>9} {'NumPy/JAX':>9} | "
              f"{'compile s':>9} | {'max|dH| bits':>12}")
    log(header)
    log("-" * len(header))
    loops: dict[tuple, tuple[float, object]] = {}  # (N, d, K, impl): (best JAX seconds, go)
    for case in cases:
        print(f"  ... N={case.num} d={case.dim} K={case.num_classes} ({time.perf_counter() - started:.0f} s so far)",
              file=sys.stderr, flush=True)
        built = {impl: build_jax_loop(case, args.seed, key_impl=impl) for impl in impls}
        full_numpy = case.num <= args.numpy_full_max
        np_steps = None if full_numpy else min(args.numpy_steps, case.steps)
        best = {impl: np.inf for impl in impls}
        curves = {}
        np_best = np.inf
        for _ in range(args.repeats):
            for impl, (go, _) in built.items():
                seconds, curves[impl] = go()
                best[impl] = min(best[impl], seconds)
            np_s, np_h, ran = run_numpy(case, np_steps, args.seed)
            np_best = min(np_best, np_s * case.steps / ran)
        weights = np.full(case.num_classes, 1.0 / case.num_classes)
        star = "" if full_numpy else "*"
        for impl, (go, compile_s) in built.items():
            diff = float(np.max(np.abs(curves[impl][:ran] @ weights - np_h @ weights)))
            log(f"{case.num:>7} {case.dim:>3} {case.num_classes:>3} {key_label(impl):<24} | {best[impl]:>8.2f} "
                f"{np_best:>8.1f}{star:1} {np_best / best[impl]:>9.1f} | {compile_s:>9.2f} | {diff:>12.4f}")
            loops[(case.num, case.dim, case.num_classes, impl)] = (best[impl], go)
        loops[(case.num, case.dim, case.num_classes, "numpy")] = (np_best, None)
    log()
    log(f"* NumPy timed on the first {args.numpy_steps} steps and scaled linearly to T = {args.steps}; "
        "max|dH| then covers those steps only.")
    log("max|dH|: max over steps of |sum_k pi_k H_k(t)| JAX - NumPy|, the class-averaged entropy curve.")

    if args.check_size:
        log()
        bad = []
        for d in args.dims:
            for k in args.classes:
                case = Case(args.check_size, d, k, args.steps)
                np_s, np_h, _ = run_numpy(case, None, args.seed)
                weights = np.full(k, 1.0 / k)
                for impl in impls:
                    go, _ = build_jax_loop(case, args.seed, key_impl=impl)
                    jax_s, jax_h = go()
                    diff = float(np.max(np.abs(jax_h @ weights - np_h @ weights)))
                    if diff >= args.tolerance:
                        bad.append(f"N={case.num} d={d} K={k} {key_label(impl)}")
                    log(f"agreement, all {args.steps} steps: N = {case.num}, d = {d}, K = {k}, {key_label(impl)}: "
                        f"max|dH| = {diff:.4f} bits (JAX {jax_s:.2f} s, NumPy {np_s:.1f} s)")
        log(f"agreement (full curves, N = {args.check_size}): max|dH| < {args.tolerance} bits: "
            + ("OK" if not bad else "FAILED for " + "; ".join(bad)))

    draws: dict[tuple, float] = {}  # (N, d, impl): ms per step of the normal draws alone
    for d in args.prng_dims or []:
        case = Case(args.prng_size, d, args.classes[0], args.steps)
        for impl, ms in prng_table(case, args, log).items():
            draws[(case.num, d, None if impl == KEY_IMPLS[0] else impl)] = ms

    log()
    log("## Where the time goes: one step of the JAX loop against the machine's limits")
    log(f"# matmul {limits['matmul_gflops']:.0f} GFLOP/s, memory {limits['bandwidth_gbs']:.1f} GB/s (measured above). "
        "XLA: its cost analysis of the compiled step (flops include integer ops; bytes = every fusion's inputs "
        "and outputs); least bytes: x_t read, x_{t-1} written, the (N, K) posterior read and written; "
        "matmul flops: the (N, d) x (d, K) products, 4 N K d")
    log("# ms/step: the whole loop (the table above, / T); draws: the normal draws alone (PRNG table); "
        "at bw / at matmul rate: the time those bytes / flops take at the measured limits")
    log(f"{'N':>7} {'d':>3} {'K':>3} {'key impl':<24} | {'ms/step':>8} {'draws':>6} | {'XLA GFLOP':>9} "
        f"{'XLA GB':>7} {'least GB':>8} {'matmul GFLOP':>12} | {'XLA GB at bw ms':>15} {'least at bw ms':>14} "
        f"{'matmul at rate ms':>17}")
    for (n, d, k, impl), (seconds, go) in loops.items():
        if go is None:
            continue
        cost = step_cost(go)
        least = 4.0 * (2 * n * d + 2 * n * k)
        matmul = 4.0 * n * k * d
        drawn = draws.get((n, d, impl))
        bw, rate = limits["bandwidth_gbs"] * 1e9, limits["matmul_gflops"] * 1e9
        log(f"{n:>7} {d:>3} {k:>3} {key_label(impl):<24} | {1e3 * seconds / args.steps:>8.2f} "
            f"{'-' if drawn is None else f'{drawn:.2f}':>6} | {cost['flops'] / 1e9:>9.2f} "
            f"{cost['bytes accessed'] / 1e9:>7.2f} {least / 1e9:>8.3f} {matmul / 1e9:>12.3f} | "
            f"{1e3 * cost['bytes accessed'] / bw:>15.1f} {1e3 * least / bw:>14.2f} {1e3 * matmul / rate:>17.2f}")
    for n, d, k in {(c.num, c.dim, c.num_classes) for c in cases}:
        np_s = loops[(n, d, k, "numpy")][0]
        log(f"# NumPy reference, N = {n}, d = {d}, K = {k}: {1e3 * np_s / args.steps:.1f} ms/step")

    if args.gmm:
        log()
        extra = ["--steps", "100", "--num-samples", "200"] if args.quick else []
        times = time_gmm_experiment(extra, args.gmm_repeats)
        what = ", ".join(f"{t:.1f} s ({'cold' if i == 0 else 'warm'} cache)" for i, t in enumerate(times))
        log(f"(c) python -m experiments.gmm --out <tmp> --no-progress {' '.join(extra)}".rstrip()
            + f": wall {what}; subprocess, start-up, compilation and figures included; "
            "a fresh JAXDIFF_INFO_CACHE, so run 1 compiles and later runs reuse the cache")
    log(f"# whole run {time.perf_counter() - started:.0f} s; load average at end: {load_average()}")


def prng_table(case: Case, args, log: Log) -> dict[str, float]:
    """The normal draws of one step, z = normal(fold_in(key, t), (N, d)) as the Tracker draws
    them, alone in a scan, and the whole library loop, with every PRNG implementation; the
    first --prng-steps steps, round robin over the implementations, the min of --repeats.
    Returns {impl: ms per step of the draws alone}."""
    S = min(args.prng_steps, case.steps)
    built = {}
    for impl in KEY_IMPLS:
        built[(impl, "draws")] = build_noise_only(case, args.seed, impl, run_steps=S)
        built[(impl, "loop")] = build_jax_loop(case, args.seed, key_impl=impl, run_steps=S)
    times = {name: [] for name in built}
    for _ in range(args.repeats):
        for name, (go, _) in built.items():
            times[name].append(1e3 * go()[0] / S)
    log()
    log(f"## PRNG implementations: N = {case.num}, d = {case.dim}, K = {case.num_classes}, the first {S} steps of "
        f"T = {case.steps}, min of {args.repeats} round-robin repeats, ms per step")
    log(f"{'jax.random.key(seed, impl=...)':<32} {'normal draws alone':>18} {'whole loop':>11} {'loop vs default':>15}")
    default = min(times[(KEY_IMPLS[0], "loop")])
    for impl in KEY_IMPLS:
        draws, loop = min(times[(impl, "draws")]), min(times[(impl, "loop")])
        log(f"{impl:<32} {draws:>18.2f} {loop:>11.2f} {default / loop:>14.2f}x")
    return {impl: min(times[(impl, "draws")]) for impl in KEY_IMPLS}


# --- where the JAX step spends its time ---------------------------------------------------------

def counter_prng():
    """A key implementation that is no PRNG, for timing only: bits = iota * 2654435761 ^ key,
    one multiply and one xor per word. The loop with it costs what the loop costs less the
    hashing of the bits (the conversion of bits to normals, erf_inv, stays)."""
    from jax.extend.random import define_prng_impl

    u32 = jnp.uint32

    def seed(s):
        return jnp.asarray(s, u32).reshape(1)

    def split(key, shape):
        return (key[0] + u32(0x9E3779B9) * (1 + jax.lax.iota(u32, int(np.prod(shape))))).reshape(*shape, 1)

    def random_bits(key, bit_width, shape):
        if bit_width != 32:
            raise ValueError("the counter draws 32-bit words only")
        return ((jax.lax.iota(u32, int(np.prod(shape))) * u32(2654435761)) ^ key[0]).reshape(shape)

    def fold_in(key, data):
        return key ^ (jnp.asarray(data, u32) * u32(0x85EBCA6B))

    global _COUNTER
    if _COUNTER is None:
        _COUNTER = define_prng_impl(key_shape=(1,), seed=seed, split=split, random_bits=random_bits,
                                    fold_in=fold_in, name="counter (no hash)")
    return _COUNTER


_COUNTER = None


def build_batched_loop(case: Case, seed: int = 0, observe: bool = True, run_steps: int | None = None):
    """The same loop written on the batch by hand, (N, K, d) arrays, no vmap: the NumPy
    reference's arithmetic in one jitted scan (threefry noise, same key use as `Tracker`)."""
    means_np, stds_np, weights = benchmark_mixture(case.num_classes, case.dim, seed)
    mix = gmm.make_mixture(means_np, stds_np, weights)
    schedule = linear_schedule(case.steps)
    K = case.num_classes
    blocks = estimators.make_blocks(K, case.per_class)
    classes = jnp.asarray(blocks.classes)
    key_x, key_run = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(key_x, (case.num, case.dim))
    lw0 = jnp.broadcast_to(mix.log_weights, (case.num, K))

    def body(state, t):
        x, log_w = state.x, state.log_posterior
        out = None
        if observe:
            p = jnp.exp(log_w)
            h = -jnp.sum(jnp.where(p > 0, p * log_w, 0.0), axis=-1) / np.log(2.0)
            out = blocks.sums(h)
        abar, beta = schedule.alpha_bar[t - 1], schedule.betas[t - 1]
        v = abar * mix.stds**2 + 1.0 - abar
        mu = (x[:, None, :] - (beta / v)[:, None] * (x[:, None, :] - jnp.sqrt(abar) * mix.means)) / jnp.sqrt(1.0 - beta)
        sigma = reverse_std(schedule, t, SAMPLER)
        z = jax.random.normal(jax.random.fold_in(state.key, t), x.shape)
        x_new = jnp.take_along_axis(mu, classes[:, None, None], axis=1)[:, 0] + sigma * z
        sq = jnp.sum((x_new[:, None, :] - mu) ** 2, axis=-1)
        var = jnp.where(t > 1, sigma**2, 1.0)
        lw_new = jnp.where(t > 1, jax.nn.log_softmax(log_w - 0.5 * sq / var, axis=-1), log_w)
        return TrackState(x_new, lw_new, state.key), out

    run = jax.jit(lambda s, ts: jax.lax.scan(body, s, ts))
    state = TrackState(x0, lw0, key_run)
    ts = loop_steps(case, run_steps)
    start = time.perf_counter()
    compiled = run.lower(state, ts).compile()
    compile_s = time.perf_counter() - start

    def go():
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, ts))
        return time.perf_counter() - start, None

    return go, compile_s


def build_noise_only(case: Case, seed: int = 0, key_impl: str | None = None, run_steps: int | None = None):
    """Only the noise of the loop: z = normal(fold_in(key, t), (N, d)) every step, x += z."""
    key = jax.random.key(seed, impl=key_impl) if key_impl else jax.random.key(seed)

    def body(x, t):
        return x + 1e-3 * jax.random.normal(jax.random.fold_in(key, t), x.shape), None

    run = jax.jit(lambda x, ts: jax.lax.scan(body, x, ts)[0])
    x = jnp.zeros((case.num, case.dim))
    ts = loop_steps(case, run_steps)
    compiled = run.lower(x, ts).compile()

    def go():
        start = time.perf_counter()
        jax.block_until_ready(compiled(x, ts))
        return time.perf_counter() - start, None

    return go, 0.0


def build_observe_only(case: Case, seed: int = 0, run_steps: int | None = None, unpadded: bool = False):
    """Only the observe of the loop: `estimators.block_entropy_sums` of an (N, K) log-posterior
    (class label) every step. unpadded: the same block sums without `jnp.pad` (full rows of
    blocks reshaped and summed, the remainder added to the first blocks), entropy computed
    directly from P(k | x_t)."""
    K = case.num_classes
    blocks = estimators.make_blocks(K, case.per_class)
    membership = decisions.membership([decisions.class_label(K)], K)
    log_post = jax.nn.log_softmax(3.0 * jax.random.normal(jax.random.key(seed), (case.num, K)))
    n, B = blocks.per_class, blocks.num_blocks
    full = (n // B) * B

    def unpadded_sums(lp):
        p = jnp.exp(lp)
        h = -jnp.sum(jnp.where(p > 0, p * lp, 0.0), axis=-1) / np.log(2.0)
        v = h.reshape(K, n)
        sums = v[:, :full].reshape(K, n // B, B).sum(axis=1)
        return sums.at[:, : n - full].add(v[:, full:])[..., None]

    def body(lp, t):
        sums = unpadded_sums(lp) if unpadded else estimators.block_entropy_sums(lp, membership, blocks)
        return lp + 1e-6, sums

    ts = loop_steps(case, run_steps)
    compiled = jax.jit(lambda lp, ts: jax.lax.scan(body, lp, ts)).lower(log_post, ts).compile()

    def go():
        start = time.perf_counter()
        jax.block_until_ready(compiled(log_post, ts))
        return time.perf_counter() - start, None

    return go, 0.0


def count_ynn_fusions(case: Case, run_steps: int) -> int:
    """YNNPACK fusions in the compiled library loop (0 when jaxdiff_info's flag took effect)."""
    means, stds, weights = benchmark_mixture(case.num_classes, case.dim)
    mix = gmm.make_mixture(means, stds, weights)
    schedule = linear_schedule(case.steps)
    tracker = Tracker(gmm.eps_fn(schedule), schedule, SAMPLER, case.num_classes)
    blocks = estimators.make_blocks(case.num_classes, case.per_class)
    membership = decisions.membership([decisions.class_label(case.num_classes)], case.num_classes)
    observe = lambda t, x, lp, ratio: estimators.block_entropy_sums(lp, membership, blocks)  # noqa: E731
    classes = jnp.asarray(blocks.classes)
    state = tracker.init(jax.random.key(0), case.num, (case.dim,), mix.log_weights)
    run = jax.jit(lambda p, s, c, ts: tracker.run(p, s, c, ts, observe, False))
    return run.lower(mix, state, classes, loop_steps(case, run_steps)).compile().as_text().count("__ynn_fusion")


def worker_default_fusions(args) -> int:
    """One timed run of the library loop in this process (started with jaxlib's default
    fusions); prints 'ms_per_step ynn_fusion_count' for the parent."""
    n, d, k = args.breakdown_case[0]
    case = Case(n, d, k, args.steps)
    S = min(args.breakdown_steps, case.steps)
    go, _ = build_jax_loop(case, args.seed, run_steps=S)
    print(f"{1e3 * go()[0] / S} {count_ynn_fusions(case, S)}")
    return 0


def default_fusions_variant(case: Case, args, S: int):
    """The library loop with jaxlib's default XLA:CPU fusions (YNNPACK on), in a subprocess
    per timed run (compile excluded from the time)."""
    cmd = [sys.executable, "-m", "benchmarks.tracking", "--jaxlib-default-fusions", "--steps", str(case.steps),
           "--breakdown-case", str(case.num), str(case.dim), str(case.num_classes), "--breakdown-steps", str(S),
           "--seed", str(args.seed)]
    found = {}

    def go():
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        ms, ynn = proc.stdout.split()[-2:]
        found["ynn"] = int(ynn)
        return float(ms) * S / 1e3, None

    return go, float("nan"), found


def breakdown(args, log: Log) -> None:
    """Variants of the JAX step, timed round robin (the min of --repeats kept), per case."""
    log(f"# JAX step breakdown; machine: {machine()}; load average {load_average()}")
    log(f"# {provenance()}")
    for n, d, k in args.breakdown_case:
        case = Case(n, d, k, args.steps)
        S = min(args.breakdown_steps, case.steps)
        sched = linear_schedule(case.steps)
        fast = args.fast_impl or FAST_IMPL
        variants = {
            "library loop (Tracker + block-entropy observe)": lambda: build_jax_loop(case, args.seed, run_steps=S),
            f"  key impl {fast}": lambda: build_jax_loop(case, args.seed, key_impl=fast, run_steps=S),
            "  without observe": lambda: build_jax_loop(case, args.seed, observe=False, run_steps=S),
            "  bits for free (a counter, no hash)": lambda: build_jax_loop(
                case, args.seed, key_impl=counter_prng(), run_steps=S),
            "  general step (every class's eps, no matrix form)": lambda: build_jax_loop(
                case, args.seed, eps_fn=general_step_eps(sched), run_steps=S),
            "  with jaxlib's default fusions (YNNPACK on)": lambda: default_fusions_variant(case, args, S),
            f"  Tracker(batch_size={args.batch_size})": lambda: build_jax_loop(
                case, args.seed, run_steps=S, batch_size=args.batch_size),
            "observe alone (block_entropy_sums, class label)": lambda: build_observe_only(case, args.seed, S),
            "hand-batched (N,K,d) step + direct entropy": lambda: build_batched_loop(case, args.seed, run_steps=S),
            "normal draws alone, threefry2x32 (default)": lambda: build_noise_only(case, args.seed, run_steps=S),
            f"normal draws alone, {fast}": lambda: build_noise_only(case, args.seed, fast, run_steps=S),
            "normal draws alone, bits for free": lambda: build_noise_only(case, args.seed, counter_prng(), S),
            "NumPy reference (same steps)": None,
        }
        built = {name: (make() if make else None) for name, make in variants.items()}
        times = {name: [] for name in variants}
        for _ in range(args.repeats):  # round robin: load hits every variant alike
            for name, b in built.items():
                times[name].append(run_numpy(case, S, args.seed)[0] if b is None else b[0]()[0])
        log()
        log(f"## N = {n}, d = {d}, K = {k}: the first {S} steps of T = {case.steps}, "
            f"min of {args.repeats} round-robin repeats (all runs in ms/step)")
        log(f"{'variant':<52} {'ms/step':>8}   {'all repeats':<24} {'compile s':>9}")
        for name, b in built.items():
            ms = [1e3 * t / S for t in times[name]]
            log(f"{name:<52} {min(ms):>8.2f}   {' '.join(f'{m:.3g}' for m in ms):<24} "
                f"{(b[1] if b else float('nan')):>9.2f}")
        for name, b in built.items():
            if b is not None and len(b) > 2:
                log(f"({name.strip()}: {b[2].get('ynn', '?')} YNNPACK fusions in that compiled loop; "
                    f"{count_ynn_fusions(case, S)} in the others)")
        del built
    log(f"# load average at end: {load_average()}")


def experiment_phases(log: Log) -> None:
    """`python -m experiments.gmm` (defaults) run in this process (after the imports): wall
    time of each library call it makes (results blocked on; the calls do not nest) and the
    XLA compile time inside it (jax.monitoring). The compilation cache is the experiment's
    own (JAXDIFF_INFO_CACHE), so point it at an empty folder for a cold run."""
    import shutil

    from jaxdiff_info import api, plots, results
    import experiments.gmm as experiment

    events: dict[str, list[float]] = {}
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: events.setdefault(name, []).append(secs))
    phases: dict[str, tuple[float, float]] = {}  # name: (wall seconds, of which XLA compile)

    def wrap(module, name):
        f = getattr(module, name)

        def timed(*a, **k):
            compiles = sum(events.get("/jax/core/compile/backend_compile_duration", []))
            start = time.perf_counter()
            out = f(*a, **k)
            if not hasattr(out, "savefig"):
                out = jax.block_until_ready(out)
            spent = sum(events.get("/jax/core/compile/backend_compile_duration", [])) - compiles
            total, compiled = phases.get(name, (0.0, 0.0))
            phases[name] = (total + time.perf_counter() - start, compiled + spent)
            return out

        setattr(module, name, timed)

    for name in ("quadrature_class_entropy", "forward_mc_block_sums", "online_block_sums"):
        wrap(estimators, name)
    for name in ("curves_from_blocks", "curves_from_profiles"):
        wrap(api, name)  # as the research API calls them
    wrap(results, "save_figure")
    wrap(experiment, "_density_figure")
    for name in ("curves_figure", "posterior_paths_figure"):
        wrap(plots, name)
    out = Path(tempfile.mkdtemp()) / "gmm"
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            experiment.main(["--out", str(out), "--no-progress"])
        finally:
            sys.stdout = stdout
    total = time.perf_counter() - start
    shutil.rmtree(out.parent, ignore_errors=True)
    compile_all = events.get("/jax/core/compile/backend_compile_duration", [])
    log(f"# python -m experiments.gmm (defaults), in process after imports: {total:.1f} s; "
        f"XLA compilations: {len(compile_all)}, {sum(compile_all):.1f} s; "
        f"lowering {sum(events.get('/jax/core/compile/jaxpr_to_mlir_module_duration', [])):.1f} s")
    log(f"  {'library call':<28} {'wall s':>7} {'of which XLA compile s':>23}")
    for name, (secs, compiled) in sorted(phases.items(), key=lambda kv: -kv[1][0]):
        log(f"  {name:<28} {secs:>7.2f} {compiled:>23.2f}")
    log(f"  {'(everything else)':<28} {total - sum(secs for secs, _ in phases.values()):>7.2f}")


# --- CLI ----------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracking", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="diffusion steps T (default %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="N, trajectories in total")
    p.add_argument("--dims", type=int, nargs="+", default=[1, 64])
    p.add_argument("--classes", type=int, nargs="+", default=[4])
    p.add_argument("--fast-impl", default=FAST_IMPL, choices=[*KEY_IMPLS, ""],
                   help="key implementation of the fast configuration, timed beside the default key "
                        "(default %(default)s; '' for none)")
    p.add_argument("--check-size", type=int, default=10_000,
                   help="N of the agreement check over all T steps, NumPy included (default %(default)s; 0: none)")
    p.add_argument("--prng-dims", type=int, nargs="*", default=[64],
                   help="d of the PRNG table, at N = --prng-size (default %(default)s; none: skip)")
    p.add_argument("--prng-size", type=int, default=100_000)
    p.add_argument("--prng-steps", type=int, default=50, help="steps timed per PRNG variant (default %(default)s)")
    p.add_argument("--numpy-full-max", type=int, default=10_000,
                   help="largest N for which NumPy runs every step (default %(default)s)")
    p.add_argument("--numpy-steps", type=int, default=50, help="steps NumPy runs above that N (default %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side, alternating; min kept")
    p.add_argument("--tolerance", type=float, default=0.05, help="bits, for the agreement check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-gmm", dest="gmm", action="store_false", help="skip (c), the experiment end to end")
    p.add_argument("--gmm-repeats", type=int, default=2, help="runs of (c): the first cold, the rest warm")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: N 2000, d 1 and 8, K 4, T 100, a short experiment")
    p.add_argument("--breakdown", action="store_true", help="time variants of the JAX step instead")
    p.add_argument("--breakdown-case", type=int, nargs=3, action="append", metavar=("N", "d", "K"),
                   help="a case for --breakdown (repeatable; default 100000 64 4 and 100000 1 4)")
    p.add_argument("--breakdown-steps", type=int, default=10, help="steps timed per breakdown variant")
    p.add_argument("--batch-size", type=int, default=2048, help="Tracker.batch_size tried by --breakdown")
    p.add_argument("--jaxlib-default-fusions", action="store_true", help=argparse.SUPPRESS)  # breakdown worker
    p.add_argument("--experiment-phases", action="store_true",
                   help="time the phases of python -m experiments.gmm (defaults) in this process instead")
    p.add_argument("--output", type=Path, default=None,
                   help="also write the output here (default: benchmarks/results_tracking.txt for the full "
                        "benchmark, nothing for --quick / --breakdown)")
    a = p.parse_args(argv)
    if a.quick:
        a.sizes, a.dims, a.classes, a.steps, a.numpy_full_max = [2000], [1, 8], [4], 100, 2000
        a.check_size, a.prng_dims, a.prng_size, a.prng_steps = 2000, [8], 2000, 20
        a.breakdown_case, a.breakdown_steps = [[2000, 8, 4]], 50
    if a.breakdown_case is None:
        a.breakdown_case = [[100_000, 64, 4], [100_000, 1, 4]]
    for n in [*a.sizes, *([a.check_size] if a.check_size else [])]:
        for k in a.classes:
            if n % k:
                p.error(f"N = {n} is not a multiple of K = {k} (trajectories are split equally by class)")
    if a.output is None and not (a.quick or a.breakdown or a.experiment_phases or a.jaxlib_default_fusions):
        a.output = REPO / "benchmarks" / "results_tracking.txt"
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    log = Log(args.output)
    if args.jaxlib_default_fusions:
        return worker_default_fusions(args)
    if args.experiment_phases:
        experiment_phases(log)
    elif args.breakdown:
        breakdown(args, log)
    else:
        benchmark(args, log)
    log.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
