"""Online tracking loop: JAX (`Tracker`, one compiled `lax.scan`) against a plain NumPy loop.

    python -m benchmarks.tracking                 # the full benchmark (~30-36 min on a busy 2-core box)
    python benchmarks/tracking.py --quick         # a smoke run (~1 min)
    python -m benchmarks.tracking --breakdown     # what the JAX step spends its time on (~10 min)
    python -m benchmarks.tracking --experiment-phases   # where python -m experiments.gmm spends its time

For every N (trajectories in total), d and K, on a Gaussian mixture with isotropic components:

(a) JAX: `Tracker` with the mixture's closed-form eps (`mixture.eps_fn`), DDPM "fixed small",
    and the observe of `estimators.online_block_sums` (block sums of the class-label entropy,
    `estimators.block_entropy_sums`), in one jitted scan over all T steps (the same numbers as
    `online_block_sums(..., chunk=None)` with the same key). Compiled ahead of
    time (`jit(...).lower(...).compile()`); the compile time is reported on its own and is
    not part of the ratio.
(b) NumPy: `benchmarks.numpy_reference.run_online`, the same estimator as a Python loop over
    steps, vectorised over trajectories and classes. For N above --numpy-full-max it is
    timed on the first --numpy-steps steps and scaled by T / steps (every step but the last
    costs the same); the table says so.
(c) the default experiment end to end, `python -m experiments.gmm --out <tmp> --no-progress`,
    in a subprocess (start-up, compilation and figures included).

Both implementations are checked to agree statistically: the class-averaged entropy curve
sum_k pi_k H_k(t), max over the steps NumPy ran, must differ by less than --tolerance bits
at N <= --numpy-full-max (where NumPy runs every step). The runs of (a) and (b) for one
configuration are back to back (and alternate over --repeats, minimum kept), so machine
load hits both alike.
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

from benchmarks import numpy_reference as ref
from jaxdiff_info import decisions, estimators
from jaxdiff_info import mixture as gmm
from jaxdiff_info.schedule import Sampler, alpha_bar_at, linear_schedule, reverse_std
from jaxdiff_info.tracking import TrackState, Tracker

REPO = Path(__file__).resolve().parent.parent
SAMPLER = Sampler("ddpm", "small")


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

    return go, compile_s


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
    """The commit the library was at, whether tracked files of jaxdiff_info/ or experiments/ had
    uncommitted changes, and XLA_FLAGS."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    head = git("rev-parse", "--short", "HEAD") or "?"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "jaxdiff_info", "experiments")
    return (f"library at commit {head}{' + uncommitted changes to tracked files' if dirty else ''}; "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


# --- the benchmark -----------------------------------------------------------------------------

def benchmark(args, log: Log) -> None:
    cases = [Case(n, d, k, args.steps) for n in args.sizes for d in args.dims for k in args.classes]
    log(f"# Online tracking loop: JAX vs NumPy  ({time.strftime('%Y-%m-%d %H:%M')})")
    log(f"# machine: {machine()}")
    log(f"# {provenance()}")
    log(f"# T = {args.steps} steps, DDPM sigma_t^2 = beta~_t, float32 on both sides, class label entropy observed "
        f"every step; repeats = {args.repeats} (min kept); load average at start: {load_average()}")
    log(f"# NumPy: every step for N <= {args.numpy_full_max}, else the first {args.numpy_steps} steps x T/steps "
        f"(marked *)")
    log()
    header = (f"{'N':>7} {'d':>3} {'K':>3} | {'JAX s':>8} {'NumPy s':>9} {'NumPy/JAX':>9} | {'compile s':>9} "
              f"| {'max|dH| bits':>12}")
    rows = []
    started = time.perf_counter()
    for case in cases:
        print(f"  ... N={case.num} d={case.dim} K={case.num_classes} ({time.perf_counter() - started:.0f} s so far)",
              file=sys.stderr, flush=True)
        go, compile_s = build_jax_loop(case, args.seed)
        full_numpy = case.num <= args.numpy_full_max
        np_steps = None if full_numpy else min(args.numpy_steps, case.steps)
        jax_best = np_best = np.inf
        for _ in range(args.repeats):
            jax_s, jax_h = go()
            np_s, np_h, ran = run_numpy(case, np_steps, args.seed)
            jax_best, np_best = min(jax_best, jax_s), min(np_best, np_s * case.steps / ran)
        weights = np.full(case.num_classes, 1.0 / case.num_classes)
        diff = float(np.max(np.abs(jax_h[:ran] @ weights - np_h @ weights)))
        star = "" if full_numpy else "*"
        row = (f"{case.num:>7} {case.dim:>3} {case.num_classes:>3} | {jax_best:>8.2f} {np_best:>8.1f}{star:1} "
               f"{np_best / jax_best:>9.1f} | {compile_s:>9.2f} | {diff:>12.4f}")
        if not rows:
            log(header)
            log("-" * len(header))
        rows.append((case, full_numpy, diff))
        log(row)
        del go
    log()
    if not all(full for _, full, _ in rows):
        log(f"* NumPy timed on the first {args.numpy_steps} steps and scaled linearly to T = {args.steps}; "
            "max|dH| then covers those steps only.")
    log("max|dH|: max over steps of |sum_k pi_k H_k(t)| JAX - NumPy|, the class-averaged entropy curve.")
    checked = [(c, d) for c, full, d in rows if full]
    bad = [(c, d) for c, d in checked if d >= args.tolerance]
    if checked:
        verdict = "OK" if not bad else "FAILED for " + ", ".join(f"N={c.num} d={c.dim} K={c.num_classes}" for c, _ in bad)
        log(f"agreement (full curves, N <= {args.numpy_full_max}): max|dH| < {args.tolerance} bits: {verdict}")

    if args.gmm:
        log()
        extra = ["--steps", "100", "--num-samples", "200"] if args.quick else []
        times = time_gmm_experiment(extra, args.gmm_repeats)
        what = ", ".join(f"{t:.1f} s ({'cold' if i == 0 else 'warm'} cache)" for i, t in enumerate(times))
        log(f"(c) python -m experiments.gmm --out <tmp> --no-progress {' '.join(extra)}".rstrip()
            + f": wall {what}; subprocess, start-up, compilation and figures included; "
            "a fresh JAXDIFF_INFO_CACHE, so run 1 compiles and later runs reuse the cache")
    log(f"# whole run {time.perf_counter() - started:.0f} s; load average at end: {load_average()}")


# --- where the JAX step spends its time ---------------------------------------------------------

def conditional_eps_fn(schedule):
    """eps(x_t, t, k) of class k only: the same values as `mixture.eps_fn` for k < K, without
    the unconditional (posterior-weighted) score that `mixture.eps` computes for every k."""

    def eps(mix, x, t, k):
        abar = alpha_bar_at(schedule, t)
        return -jnp.sqrt(1.0 - abar) * gmm.class_scores(mix, x, abar)[k]

    return eps


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
        variants = {
            "library loop (Tracker + block-entropy observe)": lambda: build_jax_loop(case, args.seed, run_steps=S),
            "  library loop without observe": lambda: build_jax_loop(case, args.seed, observe=False, run_steps=S),
            "  observe alone (block_entropy_sums, class label)": lambda: build_observe_only(case, args.seed, S),
            "  observe alone, direct entropy, block sums w/o pad": lambda: build_observe_only(
                case, args.seed, S, unpadded=True),
            "  eps of class k only (no unconditional score)": lambda: build_jax_loop(
                case, args.seed, eps_fn=conditional_eps_fn(sched), run_steps=S),
            "  eps of class k only, without observe": lambda: build_jax_loop(
                case, args.seed, observe=False, eps_fn=conditional_eps_fn(sched), run_steps=S),
            "  with jaxlib's default fusions (YNNPACK on)": lambda: default_fusions_variant(case, args, S),
            f"  Tracker(batch_size={args.batch_size})": lambda: build_jax_loop(
                case, args.seed, run_steps=S, batch_size=args.batch_size),
            f"  Tracker(batch_size={args.batch_size}), eps of class k only": lambda: build_jax_loop(
                case, args.seed, eps_fn=conditional_eps_fn(sched), run_steps=S, batch_size=args.batch_size),
            "  key impl unsafe_rbg instead of threefry": lambda: build_jax_loop(
                case, args.seed, key_impl="unsafe_rbg", run_steps=S),
            "hand-batched (N,K,d) step + direct entropy": lambda: build_batched_loop(case, args.seed, run_steps=S),
            "  hand-batched without observe": lambda: build_batched_loop(case, args.seed, observe=False, run_steps=S),
            "noise alone, threefry normal (N,d) per step": lambda: build_noise_only(case, args.seed, run_steps=S),
            "noise alone, unsafe_rbg normal (N,d) per step": lambda: build_noise_only(
                case, args.seed, "unsafe_rbg", run_steps=S),
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
            log(f"{name:<52} {min(ms):>8.1f}   {' '.join(f'{m:.3g}' for m in ms):<24} "
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
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000], help="N, trajectories in total")
    p.add_argument("--dims", type=int, nargs="+", default=[1, 64])
    p.add_argument("--classes", type=int, nargs="+", default=[4, 16])
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
                   help="a case for --breakdown (repeatable; default 100000 64 16 and 100000 1 16)")
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
        a.breakdown_case, a.breakdown_steps = [[2000, 8, 4]], 50
    if a.breakdown_case is None:
        a.breakdown_case = [[100_000, 64, 16], [100_000, 1, 16]]
    for n in a.sizes:
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
