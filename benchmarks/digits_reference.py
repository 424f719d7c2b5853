"""The online classifier on the empirical-score model of the digits: wall time and peak memory.

    python -m benchmarks.digits_reference                 # the target run (T = 1000, 100 per class)
    python -m benchmarks.digits_reference --steps 100     # a shorter smoke run

The model is `jaxdiff_info.references.empirical_reference` of scikit-learn's `load_digits`
images scaled to [-1, 1] (v / 8 - 1): every one of the 1,797 images a point component of
weight 1/1,797, grouped into its class, 10 classes, d = 64. It is tracked with the library's
defaults, exactly as a user calls it:

    jaxdiff_info.online_curves(mix, None, jdi.linear_schedule(T), samples_per_class=100, key=...)

(DDPM beta~_t, the class label, 32 blocks and 200 bootstrap resamples, and the exact-state
readout P(k | x_t) at every step). The wall time of that call includes compiling it (a fresh
process; no persistent compilation cache is set up here), and the XLA compile time inside it
is printed too (`jax.monitoring`). Peak memory is the process's
maximum resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`), imports, data and
XLA included. Also printed: the flops of one step counted from the matrix products, and the
machine's measured matmul rate (`benchmarks.machine_limits`).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

START = time.perf_counter()

if __package__ in (None, ""):  # python benchmarks/digits_reference.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jaxdiff_info as jdi  # noqa: E402  (first: it sets its XLA:CPU flags before JAX starts)
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import machine_limits  # noqa: E402
from benchmarks.tracking import load_average, machine, provenance  # noqa: E402
from jaxdiff_info.references import empirical_reference  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def digits_mixture():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, np.float64) / 8.0 - 1.0  # grey levels 0..16 -> [-1, 1]
    return empirical_reference(images, np.asarray(bunch.target), 10)


def step_flops(num: int, components: int, dim: int, classes: int, state_readout: bool) -> float:
    """Multiply-adds x 2 of the matrix products of one step: the component posterior's x.m_k
    (N K d) and the per-class weighted means sum_l w_l m_l (N K d) of every class's eps
    (`mixture.class_eps`), and with the exact-state readout the posterior's x.m_k again
    (N K d); the rest of the step is O(N (K + C d))."""
    products = 2 + (1 if state_readout else 0)
    return 2.0 * products * num * components * dim + 20.0 * num * (components + classes * dim)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.digits_reference", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="T (default %(default)s)")
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-limits", dest="limits", action="store_false", help="skip measuring the machine's limits")
    args = p.parse_args(argv)

    print(f"# Empirical-score model of the digits, online classifier  ({time.strftime('%Y-%m-%d %H:%M')})")
    print(f"# machine: {machine()}")
    print(f"# {provenance()}")
    print(f"# load average at start: {load_average()}")
    imported = time.perf_counter() - START
    mix = digits_mixture()
    print(f"# model: {mix.num_components} point components in {mix.num_classes} classes, d = {mix.dim}; "
          f"T = {args.steps}, {args.samples_per_class} trajectories per class")
    schedule = jdi.linear_schedule(args.steps)
    compiles: list[float] = []
    def on_event(name, secs, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(secs)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    start = time.perf_counter()
    curves = jdi.online_curves(mix, None, schedule, samples_per_class=args.samples_per_class,
                               key=jax.random.key(args.seed))
    wall = time.perf_counter() - start
    total = time.perf_counter() - START
    peak = peak_mb()
    h = curves.entropy_bits[0]
    n = args.samples_per_class * mix.num_classes
    print(f"online_curves wall: {wall:.1f} s (compilation included: {len(compiles)} XLA compilations, "
          f"{sum(compiles):.1f} s); whole process {total:.1f} s (imports {imported:.1f} s); peak RSS {peak:.0f} MB")
    print(f"  H(label | x_t) bits: t = T {h[-1]:.3f}, t/T = 0.5 {h[len(h) // 2]:.3f}, t = 1 {h[0]:.3f}; "
          f"peak of the rate at t/T = {curves.peak_time[0]:.3f}; exact-state readout at t = 1: "
          f"{curves.exact_state.entropy_bits[0][0]:.3f} bits")
    flops = step_flops(n, mix.num_components, mix.dim, mix.num_classes, state_readout=True)
    print(f"  per step: ~{flops / 1e9:.2f} GFLOP in the matrix products (N = {n}, K = {mix.num_components}, "
          f"d = {mix.dim}); {flops * args.steps / wall / 1e9:.1f} GFLOP/s over the whole call")
    if args.limits:
        limits = machine_limits.measure()
        print(f"  machine: {machine_limits.describe(limits)}")
        print(f"  the call's matrix products alone at the measured matmul rate: "
              f"{flops * args.steps / (limits['matmul_gflops'] * 1e9):.1f} s")
    print(f"# load average at end: {load_average()}")
    targets = wall < 120 and peak < 2048
    print(f"targets (online_curves under 120 s, peak memory under 2 GB): {'met' if targets else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
