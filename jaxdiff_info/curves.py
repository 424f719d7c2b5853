"""From per-class entropy profiles to the curves a researcher reads: H(Z | X_t) per decision
problem, mutual information, the entropy rate r(t) = dH / d(t/T), its peaks, and bootstrap
confidence intervals.

Per-class profile H_k(t) = E[h(P(z | x_t)) | class k]; for a problem over the classes S,
H(Z | X_t) = sum_{k in S} pi_k / pi_S H_k(t).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def problem_entropy(class_entropy: jax.Array, class_weights: jax.Array) -> jax.Array:
    """(..., T, P) H(Z | X_t) from (..., T, K, P) per-class profiles and (P, K) class weights."""
    return jnp.einsum("...tkp,pk->...tp", class_entropy, class_weights, precision=jax.lax.Precision.HIGHEST)


def mutual_information_bits(prior_entropy_bits: jax.Array, entropy_bits: jax.Array) -> jax.Array:
    """I(Z; X_t) = H(Z) - H(Z | X_t)."""
    return prior_entropy_bits - entropy_bits


# --- the entropy rate ----------------------------------------------------------------------

def rate_operator(time: np.ndarray, bandwidth: float = 0.0) -> np.ndarray:
    """(T, T) linear map D with r = D @ H the derivative dH/d(time).

    bandwidth = 0: second-order finite differences (central inside, one-sided at the ends).
    bandwidth > 0: slope of a local quadratic fit with Gaussian weights of that width in
    normalised time (a Savitzky-Golay filter that also works at the ends); it leaves
    quadratics exact and smooths Monte Carlo noise. A bandwidth below 1.5 grid spacings
    (a coarse, respaced grid) is raised to that, so every fit sees enough points.
    """
    t = np.asarray(time, np.float64)
    return _rate_operator(t.tobytes(), float(bandwidth)).copy()


@functools.lru_cache(maxsize=8)
def _rate_operator(time_bytes: bytes, bandwidth: float) -> np.ndarray:
    t = np.frombuffer(time_bytes, np.float64)
    n = t.shape[0]
    if n < 3:
        raise ValueError("the entropy rate needs at least 3 time points")
    if bandwidth <= 0:
        d = np.zeros((n, n))
        for i in range(n):
            j = np.arange(min(max(i - 1, 0), n - 3), min(max(i - 1, 0), n - 3) + 3)
            d[i, j] = _lagrange_slope(t[j], t[i])
        return d
    bandwidth = max(bandwidth, 1.5 * float(np.max(np.diff(t))))
    delta = t[None, :] - t[:, None]  # (target i, source j)
    w = np.exp(-0.5 * (delta / bandwidth) ** 2)
    s0, s1, s2, s3, s4 = (np.sum(w * delta**power, axis=1) for power in range(5))
    gram = np.stack([np.stack([s0, s1, s2], -1), np.stack([s1, s2, s3], -1), np.stack([s2, s3, s4], -1)], -2)
    row = np.linalg.inv(gram)[:, 1, :]  # the slope's row of the inverse normal matrix, (T, 3)
    return w * (row[:, :1] + row[:, 1:2] * delta + row[:, 2:] * delta**2)


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
    return jnp.einsum("st,...tp->...sp", d, entropy, precision=jax.lax.Precision.HIGHEST)


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


def half_entropy_time(time: jax.Array, entropy_bits: jax.Array) -> jax.Array:
    """(..., P) the time by which half of the entropy is resolved, from (..., T, P) curves.

    The threshold is half of H at the noisiest time on the grid (``time`` ascending, so the
    last entry, where H is the prior entropy up to the signal left at t = T). The result is
    the largest t at which H(t) <= threshold, refined to the crossing by linear interpolation
    between grid points: the first time, in generation order, that H reaches half. It is 0
    when H stays above half to the end, and the noisiest time when H is already at or below
    half there (a prior entropy of 0). Unlike the rate's argmax it does not land on the end
    of the grid when a decision is spread out or still going at t = 0.
    """
    T = entropy_bits.shape[-2]
    h = jnp.moveaxis(entropy_bits, -2, -1)  # (..., P, T)
    threshold = h[..., -1:] / 2.0
    below = h <= threshold
    i = T - 1 - jnp.argmax(below[..., ::-1], axis=-1)  # last index at or below the threshold
    j = jnp.minimum(i + 1, T - 1)
    h_i = jnp.take_along_axis(h, i[..., None], -1)[..., 0]
    h_j = jnp.take_along_axis(h, j[..., None], -1)[..., 0]
    t_i, t_j = time[i], time[j]
    frac = jnp.where(h_j > h_i, (threshold[..., 0] - h_i) / jnp.where(h_j > h_i, h_j - h_i, 1.0), 0.0)
    crossing = t_i + jnp.clip(frac, 0.0, 1.0) * (t_j - t_i)
    return jnp.where(below.any(axis=-1), crossing, 0.0)


# --- bootstrap over blocks of trajectories --------------------------------------------------

def class_entropy_from_blocks(block_sums: jax.Array, block_counts: jax.Array) -> jax.Array:
    """(T, K, P) per-class profiles from (T, K, B, P) block sums and (K, B) counts."""
    counts = jnp.maximum(block_counts.sum(axis=1), 1)
    return block_sums.sum(axis=2) / counts[None, :, None]


def bootstrap_class_entropy(key: jax.Array, block_sums: jax.Array, block_counts: jax.Array, num_resamples: int) -> jax.Array:
    """(R, T, K, P) per-class profiles of R bootstrap resamples: each resample draws, for every
    class, B of its blocks of trajectories with replacement. Blocks are disjoint sets of
    independent trajectories, so this is the bootstrap of the trajectories, coarsened.
    A resample is a multiplicity m[k, b] for every block; its sums are linear in m."""
    _, num_classes, num_blocks, _ = block_sums.shape
    idx = jax.random.randint(key, (num_resamples, num_classes, num_blocks), 0, num_blocks)
    mult = jax.nn.one_hot(idx, num_blocks, dtype=block_sums.dtype).sum(axis=2)  # (R, K, B)
    sums = jnp.einsum("rkb,tkbp->rtkp", mult, block_sums, precision=jax.lax.Precision.HIGHEST)
    counts = jnp.einsum("rkb,kb->rk", mult, block_counts.astype(block_sums.dtype), precision=jax.lax.Precision.HIGHEST)
    return sums / jnp.maximum(counts, 1)[:, None, :, None]


@dataclasses.dataclass(frozen=True)
class Curves:
    """The curves of one estimator, for every decision problem (host arrays).

    time (T,); entropy_bits, entropy_rate (T, P); peak_time (P,), the argmax of the rate;
    half_time (P,), when half of the entropy is resolved (``half_entropy_time``); and, for
    Monte Carlo estimators, 95% bootstrap intervals: *_ci95 (2, T, P), peak_time_ci95 and
    half_time_ci95 (2, P).
    """

    time: np.ndarray
    class_entropy_bits: np.ndarray
    entropy_bits: np.ndarray
    entropy_rate: np.ndarray
    peak_time: np.ndarray
    half_time: np.ndarray
    entropy_bits_ci95: np.ndarray | None = None
    entropy_rate_ci95: np.ndarray | None = None
    peak_time_ci95: np.ndarray | None = None
    half_time_ci95: np.ndarray | None = None


@functools.partial(jax.jit, static_argnames="num_resamples")
def _curves(time, rate_op, class_entropy, class_weights, key, block_sums, block_counts, num_resamples):
    """Entropy, rate, peak and half-entropy time of the point estimate and of bootstrap
    resamples, in one program."""
    time_index = jnp.arange(rate_op.shape[0])

    def summarise(ce):
        h = problem_entropy(ce, class_weights)
        r = jnp.einsum("st,...tp->...sp", rate_op, h, precision=jax.lax.Precision.HIGHEST)
        return h, r, jnp.argmax(r, axis=-2), half_entropy_time(time, h)

    point = summarise(class_entropy)
    if block_sums is None:
        return point, None
    boot = summarise(bootstrap_class_entropy(key, block_sums, block_counts, num_resamples))
    q = jnp.array([2.5, 97.5])
    return point, tuple(jnp.percentile(a, q, axis=0) for a in boot[:2]) + (
        jnp.percentile(time_index[boot[2]], q, axis=0), jnp.percentile(boot[3], q, axis=0))


def curves_from_profiles(time: np.ndarray, class_entropy: jax.Array, class_weights: np.ndarray, bandwidth: float = 0.0) -> Curves:
    """Curves of an estimator without sampling error (e.g. quadrature)."""
    return _assemble(time, class_entropy, class_weights, bandwidth)


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
    class_entropy = class_entropy_from_blocks(jnp.asarray(block_sums), jnp.asarray(block_counts))
    return _assemble(time, class_entropy, class_weights, bandwidth, key, block_sums, block_counts, num_resamples)


def _assemble(time, class_entropy, class_weights, bandwidth, key=None, block_sums=None, block_counts=None,
              num_resamples=0) -> Curves:
    time = np.asarray(time)
    rate_op = jnp.asarray(rate_operator(time, bandwidth), jnp.float32)
    args = (jnp.asarray(block_sums), jnp.asarray(block_counts)) if block_sums is not None else (None, None)
    (h, r, peak, half), ci = _curves(jnp.asarray(time, jnp.float32), rate_op, jnp.asarray(class_entropy),
                                     jnp.asarray(class_weights, jnp.float32), key, *args, num_resamples)
    curves = Curves(time, np.asarray(class_entropy), np.asarray(h), np.asarray(r), time[np.asarray(peak)],
                    np.asarray(half, np.float64))
    if ci is None:
        return curves
    h_ci, r_ci, peak_ci, half_ci = (np.asarray(a) for a in ci)
    # percentiles of step indices, read off on the time grid
    peak_ci = np.interp(peak_ci, np.arange(time.shape[0]), time)
    return dataclasses.replace(curves, entropy_bits_ci95=h_ci, entropy_rate_ci95=r_ci, peak_time_ci95=peak_ci,
                               half_time_ci95=half_ci)
