"""An isotropic Gaussian mixture diffused by the VP process: every quantity in closed form.

Component k has mean m_k (d,), std s_k >= 0 (0: a single data point) and weight pi_k.
Under the forward process, with v_k = abar s_k^2 + 1 - abar,

    p(x_t | k) = N(x_t; sqrt(abar) m_k, v_k I).

Functions take ONE point x (d,) and alpha_bar; `jax.vmap` them over points.
Class index K (one past the last component) means "no class": the unconditional mixture,
the same convention as the null class of a classifier-free-guided network.

The formulas: docs/method.md, "Gaussian mixtures in closed form" and "The mixture as a network".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.schedule import Schedule, alpha_bar_at


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """means (K, d), stds (K,), log_weights (K,) normalised; build with `make_mixture`."""

    means: jax.Array
    stds: jax.Array
    log_weights: jax.Array

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> jax.Array:
        return jnp.exp(self.log_weights)


def _numbers(name: str, value) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers, in lists of one consistent shape") from None


def make_mixture(means, stds=None, weights=None) -> GaussianMixture:
    """Validated mixture. means: (K,) or (K, d); stds: (K,) >= 0 (default 0: points);
    weights: (K,) >= 0, any scale (default equal)."""
    means = _numbers("means", means)
    if means.ndim == 1:
        means = means[:, None]
    if means.ndim != 2 or means.shape[0] < 1 or means.shape[1] < 1:
        raise ValueError(f"means must be a non-empty list of points (K,) or (K, d), got shape {means.shape}")
    k = means.shape[0]
    stds = np.zeros(k) if stds is None else _numbers("stds", stds)
    weights = np.ones(k) if weights is None else _numbers("weights", weights)
    if stds.shape != (k,):
        raise ValueError(f"stds must have one entry per component ({k}), got shape {stds.shape}")
    if weights.shape != (k,):
        raise ValueError(f"weights must have one entry per component ({k}), got shape {weights.shape}")
    if not np.all(np.isfinite(means)):
        raise ValueError("means must be finite numbers")
    if not np.all(np.isfinite(stds)) or np.any(stds < 0):
        raise ValueError("stds must be finite numbers >= 0")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("weights must be finite numbers >= 0")
    if not np.any(weights > 0):
        raise ValueError("weights must not all be zero")
    with np.errstate(divide="ignore"):
        log_weights = np.log(weights) - np.log(weights.sum())
    return GaussianMixture(
        means=jnp.asarray(means, jnp.float32),
        stds=jnp.asarray(stds, jnp.float32),
        log_weights=jnp.asarray(log_weights, jnp.float32),
    )


def _variance(mixture: GaussianMixture, alpha_bar: jax.Array) -> jax.Array:
    """(K,) v_k = abar s_k^2 + 1 - abar."""
    return alpha_bar * mixture.stds**2 + (1.0 - alpha_bar)


def log_prob_given_class(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K,) log p(x_t | k) = log N(x_t; sqrt(abar) m_k, v_k I)."""
    v = _variance(mixture, alpha_bar)
    sq = jnp.sum((x - jnp.sqrt(alpha_bar) * mixture.means) ** 2, axis=-1)
    return -0.5 * sq / v - 0.5 * mixture.dim * jnp.log(2.0 * math.pi * v)


def log_joint(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K,) log pi_k + log p(x_t | k)."""
    return mixture.log_weights + log_prob_given_class(mixture, x, alpha_bar)


def log_prob(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """log p(x_t) = logsumexp_k(log pi_k + log p(x_t | k))."""
    return jax.nn.logsumexp(log_joint(mixture, x, alpha_bar))


def log_posterior(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K,) log P(k | x_t) = log_softmax_k(log pi_k + log p(x_t | k))."""
    return jax.nn.log_softmax(log_joint(mixture, x, alpha_bar))


def class_scores(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(K, d) grad log p(x_t | k) = -(x_t - sqrt(abar) m_k) / v_k."""
    v = _variance(mixture, alpha_bar)
    return -(x - jnp.sqrt(alpha_bar) * mixture.means) / v[:, None]


def score(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array, k: jax.Array | None = None) -> jax.Array:
    """(d,) grad log p(x_t | k); k = None or k = K gives the unconditional score
    sum_k P(k | x_t) grad log p(x_t | k)."""
    scores = class_scores(mixture, x, alpha_bar)
    posterior = jnp.exp(log_posterior(mixture, x, alpha_bar))
    # computed once per point, not once per requested class (keeps XLA from re-fusing it)
    unconditional = jax.lax.optimization_barrier(jnp.matmul(posterior, scores, precision=jax.lax.Precision.HIGHEST))
    if k is None:
        return unconditional
    conditional = scores[jnp.minimum(k, mixture.num_components - 1)]
    return jnp.where(k >= mixture.num_components, unconditional, conditional)


def eps(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array, k: jax.Array | None = None) -> jax.Array:
    """(d,) eps(x_t, t, k) = -sqrt(1 - abar) grad log p(x_t | k)  (k = None or K: unconditional)."""
    return -jnp.sqrt(1.0 - alpha_bar) * score(mixture, x, alpha_bar, k)


def denoiser(mixture: GaussianMixture, x: jax.Array, alpha_bar: jax.Array, k: jax.Array | None = None) -> jax.Array:
    """(d,) E[x_0 | x_t, k] = m_k + sqrt(abar) s_k^2 / v_k (x_t - sqrt(abar) m_k);
    k = None or K: the posterior-weighted average."""
    v = _variance(mixture, alpha_bar)
    gain = jnp.sqrt(alpha_bar) * mixture.stds**2 / v
    means = mixture.means + gain[:, None] * (x - jnp.sqrt(alpha_bar) * mixture.means)
    unconditional = jnp.matmul(jnp.exp(log_posterior(mixture, x, alpha_bar)), means, precision=jax.lax.Precision.HIGHEST)
    if k is None:
        return unconditional
    conditional = means[jnp.minimum(k, mixture.num_components - 1)]
    return jnp.where(k >= mixture.num_components, unconditional, conditional)


def eps_fn(schedule: Schedule, with_null: bool = True):
    """The mixture as a class-conditional eps-predictor eps(mixture, x_t, t, k), the same
    interface as a network eps(params, x_t, t, k): t is a model timestep of `schedule`
    (`Schedule.timesteps`, so a respaced schedule works too), k = K is the unconditional
    prediction.

    with_null=False gives class-conditional predictions only (k = K returns NaN): about half
    the work, since the posterior-weighted unconditional score is never formed. Enough for
    class-conditional generation without guidance.
    """

    def alpha_bar_of(t):
        """alpha_bar at model timestep t: the schedule's step whose timestep is t."""
        i = jnp.searchsorted(schedule.timesteps, t)
        return schedule.alpha_bar[jnp.clip(i, 0, schedule.num_steps - 1)]

    def mixture_eps(mixture: GaussianMixture, x_t: jax.Array, t: jax.Array, k: jax.Array) -> jax.Array:
        return eps(mixture, x_t, alpha_bar_of(t), k)

    def class_eps(mixture: GaussianMixture, x_t: jax.Array, t: jax.Array, k: jax.Array) -> jax.Array:
        alpha_bar = alpha_bar_of(t)
        j = jnp.minimum(k, mixture.num_components - 1)
        v = alpha_bar * mixture.stds[j] ** 2 + (1.0 - alpha_bar)
        e = jnp.sqrt(1.0 - alpha_bar) * (x_t - jnp.sqrt(alpha_bar) * mixture.means[j]) / v
        return jnp.where(k < mixture.num_components, e, jnp.nan)

    def check_schedule(sampling: Schedule) -> None:
        """Refuse a sampling schedule whose steps this eps was not built for."""
        mine = dict(zip(np.asarray(schedule.timesteps).tolist(), np.asarray(schedule.alpha_bar, np.float64)))
        for t, ab in zip(np.asarray(sampling.timesteps).tolist(), np.asarray(sampling.alpha_bar, np.float64)):
            if t not in mine or abs(mine[t] - ab) > 1e-6:
                raise ValueError(
                    f"the mixture's eps was built for another schedule (it has no step at model timestep {t} with "
                    f"alpha_bar {ab:.6g}); build it with mixture.eps_fn of the schedule you sample with, or of "
                    f"the schedule that one was respaced from")

    fn = mixture_eps if with_null else class_eps
    fn.check_schedule = check_schedule
    return fn


def centred(mixture: GaussianMixture) -> tuple[GaussianMixture, np.ndarray]:
    """The mixture moved so that its mean is 0, and the shift (d,) that was taken off.

    Every class posterior is unchanged by the move (x_t moves by sqrt(abar_t) * shift), so
    entropies can be computed on the centred mixture, where float32 does not cancel.
    """
    shift = np.asarray(mixture.weights, np.float64) @ np.asarray(mixture.means, np.float64)
    means = jnp.asarray(np.asarray(mixture.means, np.float64) - shift, jnp.float32)
    return GaussianMixture(means, mixture.stds, mixture.log_weights), shift


# --- sampling ----------------------------------------------------------------------------

def sample_x0_given_class(mixture: GaussianMixture, key: jax.Array, k: jax.Array) -> jax.Array:
    """(d,) x_0 ~ N(m_k, s_k^2 I)."""
    z = jax.random.normal(key, (mixture.dim,))
    return mixture.means[k] + mixture.stds[k] * z


def xt_given_class(mixture: GaussianMixture, k: jax.Array, alpha_bar: jax.Array, z: jax.Array) -> jax.Array:
    """(d,) x_t = sqrt(abar) m_k + sqrt(v_k) z: a draw from p(x_t | k) given z ~ N(0, I)."""
    v = alpha_bar * mixture.stds[k] ** 2 + (1.0 - alpha_bar)
    return jnp.sqrt(alpha_bar) * mixture.means[k] + jnp.sqrt(v) * z


def sample_xt_given_class(mixture: GaussianMixture, key: jax.Array, k: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """(d,) x_t ~ p(x_t | k) = N(sqrt(abar) m_k, v_k I), drawn in one step."""
    return xt_given_class(mixture, k, alpha_bar, jax.random.normal(key, (mixture.dim,)))


def sample_classes(mixture: GaussianMixture, key: jax.Array, num: int) -> jax.Array:
    """(num,) k ~ Categorical(pi)."""
    return jax.random.categorical(key, mixture.log_weights, shape=(num,))


def sample_x0(mixture: GaussianMixture, key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """(num, d) x_0 ~ p(x_0) and their classes (num,)."""
    key_k, key_x = jax.random.split(key)
    ks = sample_classes(mixture, key_k, num)
    xs = jax.vmap(sample_x0_given_class, (None, 0, 0))(mixture, jax.random.split(key_x, num), ks)
    return xs, ks


def sample_xt(mixture: GaussianMixture, key: jax.Array, num: int, schedule: Schedule, t: int) -> tuple[jax.Array, jax.Array]:
    """(num, d) x_t ~ p(x_t) at step t of `schedule`, and their classes (num,)."""
    key_k, key_x = jax.random.split(key)
    ks = sample_classes(mixture, key_k, num)
    abar = alpha_bar_at(schedule, jnp.asarray(t))
    xs = jax.vmap(sample_xt_given_class, (None, 0, 0, None))(mixture, jax.random.split(key_x, num), ks, abar)
    return xs, ks


def permute(mixture: GaussianMixture, order: Sequence[int]) -> GaussianMixture:
    """The same mixture with its components listed in `order`."""
    order = np.asarray(order)
    return GaussianMixture(mixture.means[order], mixture.stds[order], mixture.log_weights[order])
