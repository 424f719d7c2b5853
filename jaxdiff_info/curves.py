"""From per-class entropy profiles to the curves a researcher reads: H(Z | X_t) per decision
problem, mutual information, the entropy rate r(t) = dH / d(t/T), its peaks, and bootstrap
confidence intervals.

Per-class profile H_k(t) = E[h(P(z | x_t)) | class k]; for a problem over the classes S,
H(Z | X_t) = sum_{k in S} pi_k / pi_S H_k(t).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def problem_entropy(class_entropy: jax.Array, class_weights: jax.Array) -> jax.Array:
    """(..., T, P) H(Z | X_t) from (..., T, K, P) per-class profiles and (P, K) class weights."""
    return jnp.einsum("...tkp,pk->...tp", class_entropy, class_weights)


def mutual_information_bits(prior_entropy_bits: jax.Array, entropy_bits: jax.Array) -> jax.Array:
    """I(Z; X_t) = H(Z) - H(Z | X_t)."""
    return prior_entropy_bits - entropy_bits


# --- the entropy rate ----------------------------------------------------------------------

def rate_operator(time: np.ndarray, bandwidth: float = 0.0) -> np.ndarray:
    """(T, T) linear map D with r = D @ H the derivative dH/d(time).

    bandwidth = 0: second-order finite differences (central inside, one-sided at the ends).
    bandwidth > 0: slope of a local quadratic fit with Gaussian weights of that width in
    normalised time (a Savitzky-Golay filter that also works at the ends); it leaves
    quadratics exact and smooths Monte Carlo noise.
    """
    t = np.asarray(time, np.float64)
    n = t.shape[0]
    if n < 3:
        raise ValueError("the entropy rate needs at least 3 time points")
    if bandwidth <= 0:
        d = np.zeros((n, n))
        for i in range(n):
            j = np.arange(min(max(i - 1, 0), n - 3), min(max(i - 1, 0), n - 3) + 3)
            d[i, j] = _lagrange_slope(t[j], t[i])
        return d
    delta = t[None, :] - t[:, None]  # (target i, source j)
    w = np.exp(-0.5 * (delta / bandwidth) ** 2)
    basis = np.stack([np.ones_like(delta), delta, delta**2], axis=1)  # (i, 3, j)
    gram = np.einsum("ij,iaj,ibj->iab", w, basis, basis)
    coeffs = np.linalg.solve(gram, basis * w[:, None, :])  # (i, 3, j)
    return coeffs[:, 1, :]


def _lagrange_slope(nodes: np.ndarray, at: float) -> np.ndarray:
    """Weights giving f'(at) from f at three nodes (derivative of the interpolating quadratic)."""
    a, b, c = nodes
    return np.array([
        (2 * at - b - c) / ((a - b) * (a - c)),
        (2 * at - a - c) / ((b - a) * (b - c)),
        (2 * at - a - b) / ((c - a) * (c - b)),
    ])


def entropy_rate(time: np.ndarray, entropy: jax.Array, bandwidth: float = 0.0) -> jax.Array:
    """(..., T, P) r(t) = dH(Z | X_t) / d(t/T) in bits per unit of normalised time, from
    (..., T, P) entropies on the time grid `time`."""
    d = jnp.asarray(rate_operator(time, bandwidth), jnp.float32)
    return jnp.einsum("st,...tp->...sp", d, entropy)


# --- peaks ---------------------------------------------------------------------------------

def peak_time(time: np.ndarray, rate: jax.Array) -> jax.Array:
    """(..., P) t/T at which the entropy rate (..., T, P) is largest."""
    return jnp.asarray(time)[jnp.argmax(rate, axis=-2)]


def local_peaks(time: np.ndarray, rate: np.ndarray, min_height: float = 0.2, min_separation: float = 0.05) -> list[float]:
    """Times of the local maxima of one rate curve (T,) that reach min_height of its maximum,
    highest first, at least min_separation apart in normalised time."""
    r = np.asarray(rate, np.float64)
    t = np.asarray(time, np.float64)
    top = r.max()
    if not top > 0:
        return []
    inner = (r[1:-1] >= r[:-2]) & (r[1:-1] > r[2:])
    cand = np.flatnonzero(np.concatenate([[r[0] > r[1]], inner, [r[-1] > r[-2]]]))
    cand = cand[r[cand] >= min_height * top]
    peaks: list[float] = []
    for i in cand[np.argsort(-r[cand])]:
        if all(abs(t[i] - p) >= min_separation for p in peaks):
            peaks.append(float(t[i]))
    return peaks


# --- bootstrap over blocks of trajectories --------------------------------------------------

def class_entropy_from_blocks(block_sums: jax.Array, block_counts: jax.Array) -> jax.Array:
    """(T, K, P) per-class profiles from (T, K, B, P) block sums and (K, B) counts."""
    counts = jnp.maximum(block_counts.sum(axis=1), 1)
    return block_sums.sum(axis=2) / counts[None, :, None]


def bootstrap_class_entropy(key: jax.Array, block_sums: jax.Array, block_counts: jax.Array, num_resamples: int) -> jax.Array:
    """(R, T, K, P) per-class profiles of R bootstrap resamples: each resample draws, for every
    class, B of its blocks of trajectories with replacement. Blocks are disjoint sets of
    independent trajectories, so this is the bootstrap of the trajectories, coarsened."""
    _, num_classes, num_blocks, _ = block_sums.shape
    idx = jax.random.randint(key, (num_resamples, num_classes, num_blocks), 0, num_blocks)

    def one(i):  # i: (K, B) chosen blocks
        sums = jnp.take_along_axis(block_sums, i[None, :, :, None], axis=2).sum(axis=2)
        counts = jnp.take_along_axis(block_counts, i, axis=1).sum(axis=1)
        return sums / jnp.maximum(counts, 1)[None, :, None]

    return jax.lax.map(one, idx)


@dataclasses.dataclass(frozen=True)
class Curves:
    """The curves of one estimator, for every decision problem (host arrays).

    time (T,); entropy_bits, entropy_rate (T, P); peak_time (P,); and, for Monte Carlo
    estimators, 95% bootstrap intervals: *_ci95 (2, T, P) and peak_time_ci95 (2, P).
    """

    time: np.ndarray
    class_entropy_bits: np.ndarray
    entropy_bits: np.ndarray
    entropy_rate: np.ndarray
    peak_time: np.ndarray
    entropy_bits_ci95: np.ndarray | None = None
    entropy_rate_ci95: np.ndarray | None = None
    peak_time_ci95: np.ndarray | None = None


def curves_from_profiles(time: np.ndarray, class_entropy: jax.Array, class_weights: np.ndarray, bandwidth: float = 0.0) -> Curves:
    """Curves of an estimator without sampling error (e.g. quadrature)."""
    w = jnp.asarray(class_weights, jnp.float32)
    h = problem_entropy(jnp.asarray(class_entropy), w)
    r = entropy_rate(time, h, bandwidth)
    return Curves(np.asarray(time), np.asarray(class_entropy), np.asarray(h), np.asarray(r), np.asarray(peak_time(time, r)))


def curves_from_blocks(
    key: jax.Array,
    time: np.ndarray,
    block_sums: jax.Array,
    block_counts: jax.Array,
    class_weights: np.ndarray,
    bandwidth: float,
    num_resamples: int = 200,
) -> Curves:
    """Curves of a Monte Carlo estimator with 95% percentile-bootstrap intervals."""
    w = jnp.asarray(class_weights, jnp.float32)
    base = curves_from_profiles(time, class_entropy_from_blocks(block_sums, block_counts), class_weights, bandwidth)
    boot = bootstrap_class_entropy(key, block_sums, block_counts, num_resamples)
    h = problem_entropy(boot, w)
    r = entropy_rate(time, h, bandwidth)
    peaks = peak_time(time, r)
    q = jnp.array([2.5, 97.5])
    return dataclasses.replace(
        base,
        entropy_bits_ci95=np.asarray(jnp.percentile(h, q, axis=0)),
        entropy_rate_ci95=np.asarray(jnp.percentile(r, q, axis=0)),
        peak_time_ci95=np.asarray(jnp.percentile(peaks, q, axis=0)),
    )
