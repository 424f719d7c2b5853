"""Generating a mixture without some of its classes: the exact target p(x | not C) and how far
samples are from it.

    target            p(x | not C) = the mixture of the remaining classes, renormalised:
                      q_k = pi_k / (1 - pi_C) for k not in C
    forbidden_fraction  mean over the samples of the exact P(C | x_0)
    class_fractions   mean exact P(k | x_0) per remaining class k, renormalised over them
    kl_to_target_bits sum_k f_k log2(f_k / q_k), fractions f against the renormalised prior q
    distance_to_target  1-D: Wasserstein-1 to the exact CDF of the target (point components make
                      it jump); d-D: the energy distance to exact draws of the target

The posterior at a sample is read at alpha_bar = READOUT_ALPHA_BAR, the first step of the
default schedule (noise std 0.01): a point component has no density at alpha_bar = 1, and for
components of std >> 0.01 this is the alpha_bar = 1 posterior to O(1e-4). Every metric comes
with a 95% percentile bootstrap interval over the samples, and the distance with its Monte Carlo
floor: the same distance for exact draws of the same size.

docs/method.md, "Guidance driven by the posterior (DNG)".
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info import mixture as gmm

READOUT_ALPHA_BAR = 1.0 - 1e-4
NUM_RESAMPLES = 200
_erf = np.frompyfunc(math.erf, 1, 1)


def _ndtr(z: np.ndarray) -> np.ndarray:
    """Phi(z), the standard normal CDF, in float64."""
    return 0.5 * (1.0 + _erf(np.asarray(z, np.float64) / math.sqrt(2.0)).astype(np.float64))


def without_classes(mixture: gmm.GaussianMixture, removed: np.ndarray) -> gmm.GaussianMixture:
    """p(x | not C): the mixture of the classes outside the mask `removed` (C,), renormalised."""
    index, valid = gmm.class_layout(mixture)
    keep = np.flatnonzero(~np.asarray(removed))
    components = np.concatenate([index[c][valid[c]] for c in keep])
    take = lambda a: None if a is None else a[components]  # noqa: E731
    log_w = mixture.log_weights[components]
    sizes = None if mixture.class_sizes is None else tuple(mixture.class_sizes[c] for c in keep)
    return gmm.GaussianMixture(take(mixture.means), take(mixture.stds), log_w - jax.nn.logsumexp(log_w),
                               take(mixture.basis), take(mixture.spectrum), sizes)


def target_weights(mixture: gmm.GaussianMixture, removed: np.ndarray) -> np.ndarray:
    """(C - |C|,) q_k = pi_k / (1 - pi_C) of the remaining classes."""
    pi = np.asarray(mixture.class_weights, np.float64)[~np.asarray(removed)]
    return pi / pi.sum()


def sample_target(mixture: gmm.GaussianMixture, removed: np.ndarray, key: jax.Array, num: int) -> np.ndarray:
    """(num, d) exact draws of p(x | not C)."""
    return np.asarray(gmm.sample_x0(without_classes(mixture, removed), key, num)[0])


def readout_posterior(mixture: gmm.GaussianMixture, x: np.ndarray, alpha_bar: float = READOUT_ALPHA_BAR) -> np.ndarray:
    """(N, C) exact P(c | x) of samples x (N, d), read at alpha_bar (on the centred mixture)."""
    centred, shift = gmm.centred(mixture)
    x = jnp.asarray(np.asarray(x, np.float64) - np.sqrt(alpha_bar) * shift, jnp.float32)
    post = jax.jit(jax.vmap(gmm.log_posterior, (None, 0, None)))(centred, x, jnp.float32(alpha_bar))
    return np.exp(np.asarray(post, np.float64))


def kl_bits(fractions: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_k f_k log2(f_k / q_k) over the last axis (0 log 0 = 0)."""
    f = np.asarray(fractions, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(f > 0, f * np.log2(f / q), 0.0)
    return terms.sum(-1)


# --- distances -------------------------------------------------------------------------------

def mixture_cdf(target: gmm.GaussianMixture, x: np.ndarray) -> np.ndarray:
    """F(x) of a 1-D mixture: sum_j pi_j Phi((x - m_j) / s_j), a step at m_j where s_j = 0."""
    m = np.asarray(target.means, np.float64)[:, 0]
    s = np.asarray(target.stds, np.float64)
    w = np.exp(np.asarray(target.log_weights, np.float64))
    w = w / w.sum()
    x = np.asarray(x, np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        parts = np.where(s > 0, _ndtr((x - m) / np.where(s > 0, s, 1.0)), (x >= m).astype(np.float64))
    return parts @ w


def _cdf_grid(target: gmm.GaussianMixture, samples: np.ndarray) -> np.ndarray:
    """Cell edges for the W1 integral: each Gaussian component's own dense grid (+-10 std), the
    point components (the CDF's jumps) and the samples (the empirical CDF's jumps)."""
    m = np.asarray(target.means, np.float64)[:, 0]
    s = np.asarray(target.stds, np.float64)
    parts = [m, samples, [min(m.min(), samples.min()) - 1.0, max(m.max(), samples.max()) + 1.0]]
    parts += [mj + sj * np.linspace(-10.0, 10.0, 4001) for mj, sj in zip(m, s) if sj > 0]
    return np.unique(np.concatenate(parts))


def wasserstein1(samples: np.ndarray, target: gmm.GaussianMixture, weights: np.ndarray | None = None) -> np.ndarray:
    """W1 = integral |F_n(x) - F(x)| dx between samples (N,) and a 1-D mixture, by the midpoint
    rule on cells whose edges include every jump of either CDF (exact for the steps).
    weights: (B, N) sample weights summing to 1 per row (bootstrap resamples); returns (B,) then."""
    samples = np.asarray(samples, np.float64).ravel()
    edges = _cdf_grid(target, samples)
    mid, width = 0.5 * (edges[1:] + edges[:-1]), np.diff(edges)
    F = mixture_cdf(target, mid)
    order = np.argsort(samples)
    below = np.searchsorted(samples[order], mid, side="right")  # samples <= each midpoint
    if weights is None:
        return np.sum(np.abs(below / samples.size - F) * width)
    cum = np.concatenate([np.zeros((weights.shape[0], 1)), np.cumsum(weights[:, order], axis=1)], axis=1)
    return np.sum(np.abs(cum[:, below] - F) * width, axis=1)


def _pairwise_mean(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(len(a),) mean_j ||a_i - b_j||."""
    out = np.empty(a.shape[0])
    for i in range(0, a.shape[0], chunk):
        d = np.sqrt(np.maximum(((a[i:i + chunk, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0))
        out[i:i + chunk] = d.mean(1)
    return out


def _distances(a: np.ndarray) -> np.ndarray:
    sq = (a**2).sum(-1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * a @ a.T, 0.0))


def energy_distance(x: np.ndarray, reference: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| between samples x (N, d) and reference draws (M, d)
    (within-sample terms over distinct pairs). weights: (B, N) resample counts / N, as in
    `wasserstein1`."""
    x, y = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    n, m = x.shape[0], y.shape[0]
    yy = _distances(y).sum() / (m * (m - 1))
    xy = _pairwise_mean(x, y)
    dxx = _distances(x)
    if weights is None:
        return 2.0 * xy.mean() - dxx.sum() / (n * (n - 1)) - yy
    c = weights * n  # counts: sum over pairs of distinct positions is c^T D c (D has a zero diagonal)
    within = np.einsum("bi,bi->b", c @ dxx, c) / (n * (n - 1))
    return 2.0 * weights @ xy - within - yy


def distance_to_target(samples: np.ndarray, target: gmm.GaussianMixture, reference: np.ndarray | None = None,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """W1 to the exact CDF for a 1-D target, else the energy distance to `reference` draws."""
    if target.dim == 1:
        return wasserstein1(np.asarray(samples)[:, 0], target, weights)
    if reference is None:
        raise ValueError("a target in d > 1 needs reference draws for the energy distance")
    return energy_distance(samples, reference, weights)


DISTANCE_1D = "Wasserstein-1 distance to the exact CDF of p(x | not C)"
DISTANCE_DD = "energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| to exact draws of p(x | not C)"


# --- the metrics with their intervals ----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RemovalMetrics:
    """Each value with its 95% bootstrap interval [lo, hi]; class fractions (C - |C|,)."""

    forbidden_fraction: float
    forbidden_fraction_ci95: np.ndarray
    class_fractions: np.ndarray
    class_fractions_ci95: np.ndarray  # (C - |C|, 2)
    kl_to_target_bits: float
    kl_to_target_bits_ci95: np.ndarray
    distance_to_target: float
    distance_to_target_ci95: np.ndarray


def resample_weights(key: jax.Array, num: int, num_resamples: int = NUM_RESAMPLES) -> np.ndarray:
    """(B, num) bootstrap weights: counts of each sample in a resample with replacement, / num."""
    idx = np.asarray(jax.random.randint(key, (num_resamples, num), 0, num))
    counts = np.zeros((num_resamples, num))
    np.add.at(counts, (np.arange(num_resamples)[:, None], idx), 1.0)
    return counts / num


def removal_metrics(mixture: gmm.GaussianMixture, removed: np.ndarray, samples: np.ndarray, key: jax.Array, *,
                    reference: np.ndarray | None = None, num_resamples: int = NUM_RESAMPLES) -> RemovalMetrics:
    """Every metric of samples (N, d) against p(x | not C), C the mask `removed` (C,)."""
    removed = np.asarray(removed)
    post = readout_posterior(mixture, samples)
    target = without_classes(mixture, removed)
    q = target_weights(mixture, removed)
    weights = resample_weights(key, samples.shape[0], num_resamples)

    def fractions(w):  # (..., N) -> forbidden (...,), class fractions (..., C - |C|)
        mean = w @ post
        rest = mean[..., ~removed]
        return mean[..., removed].sum(-1), rest / rest.sum(-1, keepdims=True)

    forbidden, frac = fractions(np.full(samples.shape[0], 1.0 / samples.shape[0]))
    forbidden_b, frac_b = fractions(weights)
    dist = float(distance_to_target(samples, target, reference))
    dist_b = distance_to_target(samples, target, reference, weights)
    ci = lambda a: np.percentile(a, [2.5, 97.5], axis=0)  # noqa: E731
    return RemovalMetrics(float(forbidden), ci(forbidden_b), frac, ci(frac_b).T, float(kl_bits(frac, q)),
                          ci(kl_bits(frac_b, q)), dist, ci(dist_b))


def distance_floor(mixture: gmm.GaussianMixture, removed: np.ndarray, num: int, key: jax.Array, *,
                   reference: np.ndarray | None = None, replicates: int = 20) -> tuple[float, np.ndarray]:
    """The Monte Carlo floor of `distance_to_target` for `num` samples: its mean over `replicates`
    sets of exact draws of p(x | not C), and the 2.5-97.5 percentile range of those."""
    target = without_classes(mixture, np.asarray(removed))
    values = [float(distance_to_target(sample_target(mixture, removed, k, num), target, reference))
              for k in jax.random.split(key, replicates)]
    return float(np.mean(values)), np.percentile(values, [2.5, 97.5])
