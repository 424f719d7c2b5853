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

A trained network has no exact target: `fit_judge` fits a logistic regression (the judge) on
its training images, `judged_metrics` gives the forbidden fraction and class fractions of the
judge's labels and Fréchet distances (`frechet_distance`) to held-out images of the remaining
classes, each with bootstrap intervals, and `held_out_floor` the distance between two halves of
those held-out images, with the samples' distance at the same sizes beside it.

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
        total = rest.sum(-1, keepdims=True)  # 0 in a resample of forbidden samples only: no fractions there
        return mean[..., removed].sum(-1), np.divide(rest, total, out=np.full_like(rest, np.nan), where=total > 0)

    forbidden, frac = fractions(np.full(samples.shape[0], 1.0 / samples.shape[0]))
    forbidden_b, frac_b = fractions(weights)
    dist = float(distance_to_target(samples, target, reference))
    dist_b = distance_to_target(samples, target, reference, weights)
    ci = lambda a: np.nanpercentile(a, [2.5, 97.5], axis=0)  # noqa: E731  (over the resamples that define it)
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


# --- judged by a classifier: trained models, whose p(x | not C) is not known -------------------

PIXEL_FRECHET_MAX_DIM = 1024  # beyond, a d x d square root per bootstrap resample costs too much
JUDGE_MAX_TRAIN = 10000  # training images the judge is fitted on, at most


@dataclasses.dataclass(frozen=True)
class Judge:
    """A multinomial logistic regression on flattened pixels in [-1, 1]: logits = x W^T + b,
    weights (K, D), bias (K,), and its accuracy on a held-out split."""

    weights: np.ndarray
    bias: np.ndarray
    accuracy: float
    num_train: int
    num_test: int

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, K) decision-function values of images (N, ...)."""
        x = np.asarray(images, np.float64).reshape(len(images), -1)
        return x @ self.weights.T + self.bias

    def labels(self, images: np.ndarray) -> np.ndarray:
        return np.argmax(self.logits(images), axis=-1)


def fit_judge(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int, *,
              max_train: int = JUDGE_MAX_TRAIN, max_iter: int = 2000) -> Judge:
    """scikit-learn's LogisticRegression (lbfgs, multinomial, C = 1) on the first max_train of
    `train` = (images in [-1, 1], labels); its accuracy on `test`."""
    from sklearn.linear_model import LogisticRegression

    x, y = np.asarray(train[0], np.float64)[:max_train], np.asarray(train[1])[:max_train]
    if set(np.unique(y)) != set(range(num_classes)):
        raise ValueError(f"the judge's training images must hold every one of the {num_classes} classes")
    fit = LogisticRegression(max_iter=max_iter).fit(x.reshape(len(x), -1), y)
    judge = Judge(np.asarray(fit.coef_, np.float64), np.asarray(fit.intercept_, np.float64), 0.0, len(x),
                  len(test[1]))
    accuracy = float(np.mean(judge.labels(test[0]) == np.asarray(test[1])))
    return dataclasses.replace(judge, accuracy=accuracy)


def _sqrt_psd(cov: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh(cov)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))[..., None, :]) @ np.swapaxes(vecs, -1, -2)


def frechet_from_moments(mean_a, cov_a, mean_b, cov_b) -> np.ndarray:
    """||m_a - m_b||^2 + tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2}) (batched over leading axes)."""
    root = _sqrt_psd(cov_a)
    cross = np.linalg.eigvalsh(root @ cov_b @ root)
    trace = np.trace(cov_a, axis1=-2, axis2=-1) + np.trace(cov_b, axis1=-2, axis2=-1)
    return np.sum((mean_a - mean_b) ** 2, -1) + trace - 2.0 * np.sqrt(np.clip(cross, 0.0, None)).sum(-1)


def _moments(x: np.ndarray, weights: np.ndarray | None = None):
    """Mean and covariance (n / (n - 1) corrected) of rows x (N, F); weights (B, N) as in
    `resample_weights` give (B, F) and (B, F, F)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    if weights is None:
        return x.mean(0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])
    mean = weights @ x
    second = np.einsum("bn,nf,ng->bfg", weights, x, x, optimize=True)
    return mean, (second - mean[:, :, None] * mean[:, None, :]) * n / (n - 1)


def frechet_distance(x: np.ndarray, reference: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """The Fréchet distance between Gaussians fitted to rows x (N, F) and reference (M, F);
    weights (B, N): one per bootstrap resample of x, (B,)."""
    mean_b, cov_b = _moments(reference)
    mean_a, cov_a = _moments(x, weights)
    return frechet_from_moments(mean_a, cov_a, mean_b, cov_b)


@dataclasses.dataclass(frozen=True)
class JudgedMetrics:
    """Removal as the judge sees it, each value with its 95% bootstrap interval [lo, hi]:
    forbidden_fraction, class_fractions (C - |C|,) over the remaining classes, their KL to q,
    and distances {feature space: (value, [lo, hi])} to the held-out images of those classes."""

    forbidden_fraction: float
    forbidden_fraction_ci95: np.ndarray
    class_fractions: np.ndarray
    class_fractions_ci95: np.ndarray
    kl_to_target_bits: float
    kl_to_target_bits_ci95: np.ndarray
    distances: dict


def judged_metrics(labels: np.ndarray, features: dict, reference: dict, removed: np.ndarray, q: np.ndarray,
                   key: jax.Array, num_resamples: int = NUM_RESAMPLES) -> JudgedMetrics:
    """labels (N,) the judge's labels of N samples; features {name: (N, F)} and reference
    {name: (M, F)} (held-out images of the remaining classes); q the renormalised prior of the
    remaining classes. Class fractions are over the samples judged to a remaining class (NaN
    when none is)."""
    removed = np.asarray(removed)
    onehot = np.eye(removed.size)[np.asarray(labels)]
    weights = resample_weights(key, len(labels), num_resamples)

    def fractions(w):
        mean = w @ onehot
        rest = mean[..., ~removed]
        total = rest.sum(-1, keepdims=True)
        return mean[..., removed].sum(-1), np.where(total > 0, rest / np.where(total > 0, total, 1.0), np.nan)

    forbidden, frac = fractions(np.full(len(labels), 1.0 / len(labels)))
    forbidden_b, frac_b = fractions(weights)
    ci = lambda a: np.percentile(a, [2.5, 97.5], axis=0)  # noqa: E731
    distances = {}
    for name in features:
        value = float(frechet_distance(features[name], reference[name]))
        distances[name] = (value, bias_shifted_ci(value, frechet_distance(features[name], reference[name], weights)))
    kl = float(kl_bits(frac, q))
    return JudgedMetrics(float(forbidden), ci(forbidden_b), frac, ci(frac_b).T, kl,
                         bias_shifted_ci(kl, kl_bits(frac_b, q)), distances)


def bias_shifted_ci(value: float, resampled: np.ndarray) -> np.ndarray:
    """The 2.5-97.5 percentiles of resampled values of a statistic biased up by resampling (a
    KL, a Fréchet distance: duplicates look like extra spread), shifted down by the bootstrap's
    estimate of that bias, mean(resampled) - value, and clipped at 0."""
    resampled = np.asarray(resampled, np.float64)
    resampled = resampled[np.isfinite(resampled)]
    if resampled.size == 0:
        return np.array([np.nan, np.nan])
    return np.maximum(np.percentile(resampled, [2.5, 97.5]) - (resampled.mean() - value), 0.0)


def held_out_floor(features: dict, reference: dict, key: jax.Array, replicates: int = 20) -> dict:
    """Per feature space, over `replicates` random splits of the held-out reference (M, F) into
    halves A and B: the floor, FD(A, B), and the samples at the same sizes, FD(|A| of the samples
    (N, F), B): {name: {"floor": mean, "floor_range": [2.5, 97.5 percentiles], "matched": ...,
    "matched_range": ...}}. A Fréchet distance estimated from finite sets is biased up by about
    tr(S) (1/n_a + 1/n_b); the matched distance has the floor's bias."""
    out = {}
    keys = jax.random.split(key, replicates)
    for name in features:
        ref, x = np.asarray(reference[name], np.float64), np.asarray(features[name], np.float64)
        half = ref.shape[0] // 2
        if half < 2:
            raise ValueError(f"too few held-out images of the remaining classes ({ref.shape[0]}) for a floor")
        floor, matched = [], []
        for k in keys:
            order = np.asarray(jax.random.permutation(k, ref.shape[0]))
            pick = np.asarray(jax.random.choice(jax.random.fold_in(k, 1), x.shape[0], (min(half, x.shape[0]),),
                                                replace=False))
            a, b = ref[order[:half]], ref[order[half:]]
            floor.append(float(frechet_distance(a, b)))
            matched.append(float(frechet_distance(x[pick], b)))
        pct = lambda v: np.percentile(v, [2.5, 97.5])  # noqa: E731
        out[name] = {"floor": float(np.mean(floor)), "floor_range": pct(floor), "matched": float(np.mean(matched)),
                     "matched_range": pct(matched), "sizes": [min(half, x.shape[0]), ref.shape[0] - half]}
    return out
