"""What this machine can do at best, measured in the same run as a benchmark.

    python -m benchmarks.machine_limits

- matmul rate: a jitted float32 (n, n) x (n, n) product (precision HIGHEST, as the mixture's
  closed forms use), n = 2048, and NumPy's (its BLAS) for comparison; GFLOP/s = 2 n^3 / s.
- memory bandwidth: a jitted x <- x / 2 over 64 M float32 in place (the buffer donated: 256 MB
  read, 256 MB written) and NumPy's `np.multiply(x, 0.5, out=y)` into a preallocated buffer;
  GB/s = bytes read + written per second. The arrays are far larger than the caches.

Each figure is the best of `repeats` runs (the machine may be shared: the best is the least
disturbed).
"""

from __future__ import annotations

import time

import jaxdiff_info  # noqa: F401  (its XLA:CPU flags, as the benchmarks run)
import jax
import jax.numpy as jnp
import numpy as np


def _best(f, repeats: int) -> float:
    f()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def measure(repeats: int = 5, n: int = 2048, elements: int = 64 * 2**20) -> dict[str, float]:
    """{"matmul_gflops", "numpy_matmul_gflops", "bandwidth_gbs", "numpy_bandwidth_gbs"}."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    b = jax.random.normal(jax.random.key(1), (n, n))
    mm = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
    t_mm = _best(lambda: mm(a, b).block_until_ready(), repeats)
    an, bn = np.asarray(a), np.asarray(b)
    t_np_mm = _best(lambda: an @ bn, repeats)

    scale = jax.jit(lambda x: 0.5 * x, donate_argnums=0)  # in place: no fresh (page-faulting) output
    state = {"x": jnp.ones((elements,), jnp.float32)}

    def halve():
        state["x"] = scale(state["x"])
        state["x"].block_until_ready()

    t_bw = _best(halve, repeats)
    xn, yn = np.ones(elements, np.float32), np.empty(elements, np.float32)
    t_np_bw = _best(lambda: np.multiply(xn, 0.5, out=yn), repeats)
    moved = 2 * 4 * elements
    return {"matmul_gflops": 2 * n**3 / t_mm / 1e9, "numpy_matmul_gflops": 2 * n**3 / t_np_mm / 1e9,
            "bandwidth_gbs": moved / t_bw / 1e9, "numpy_bandwidth_gbs": moved / t_np_bw / 1e9}


def describe(limits: dict[str, float]) -> str:
    return (f"matmul {limits['matmul_gflops']:.0f} GFLOP/s "
            f"(jax, f32 HIGHEST; numpy {limits['numpy_matmul_gflops']:.0f}), "
            f"memory {limits['bandwidth_gbs']:.1f} GB/s read + write (jax x <- x / 2 in place; numpy "
            f"{limits['numpy_bandwidth_gbs']:.1f})")


if __name__ == "__main__":
    print(describe(measure()))
