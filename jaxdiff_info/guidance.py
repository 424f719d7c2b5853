"""Guidance driven by the tracked posterior: Dynamic Negative Guidance (Koulischer et al. 2025).

To generate without a set C of classes, p(x | not C) = (p(x) - pi_C p(x | C)) / (1 - pi_C), so

    eps_not_C(x_t) = eps_null - P(C | x_t) / (1 - P(C | x_t)) (eps_C - eps_null),
    eps_C          = sum_{c in C} P(c | x_t, C) eps_c,

exactly, for exact scores and the exact posterior. DNG scales the correction by lam and reads
P(C | x_t) from the online classifier riding along the same compiled loop: at every step every
class eps (and the null) is formed, the guided eps from the current tracked log posterior, the
reverse step taken with it, and every class's log weight updated with the class kernels,

    log w_k(t-1) = log w_k(t) + log N(x_{t-1}; mu(x_t, eps_k), sigma_t^2 I),

sigma_t the std of the step taken (the recursion of `tracking.Tracker` with w = 0). The class
kernels are the unguided ones, so the tracked P(k | x_t, ..., x_T) is the posterior of the
unguided model evaluated on the guided path: with kernels that are the exact reverse of the
forward chain (DDPM beta~_t on point classes) it is the state posterior P(k | x_t) of the
unguided model at the current x_t, whatever moved the path there, which is what the formula needs.

Methods (`Guidance.method`): "dng" (the exact recursion, the default), "dng_published" (the
published variant: a scalar P(C) updated against the null kernel, with temperature, offset and
clamping, `published_update`), "negative" (negative prompting, a constant scale w) and "none".
Everything is log space and float32: P / (1 - P) = exp(logsumexp_C log w - logsumexp_{not C} log w).

docs/method.md, "Guidance driven by the posterior (DNG)".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff_info.schedule import Sampler, Schedule, reverse_mean, reverse_std
from jaxdiff_info.tracking import EpsFn

METHODS = ("dng", "dng_published", "negative", "none")
# exp(LOG_RATIO_GUARD) bounds P/(1 - P) against float32 overflow only (not a method choice); past
# ~1e5 the float32 rounding of eps_null, multiplied by the ratio, dominates the correction anyway
LOG_RATIO_GUARD = 30.0


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How the eps of a step is formed (the scale lam or w is given apart, as a number).

    method:      "dng" | "dng_published" | "negative" | "none" (the null eps alone)
    max_ratio:   dng: cap P/(1 - P) at this value (None: the exact recursion, guarded only
                 against float32 overflow at exp(LOG_RATIO_GUARD))
    dng_published, the published variant's options (upstream defaults: prior 0.2, temperature 1,
    offset 0, p_min 1e-6, p_max 0.99):
    prior:       its P(C) at t = T (None: the prior pi_C of the removed classes)
    temperature: multiplies the squared-distance difference in the update
    offset:      added to it, per step
    p_min, p_max: the clamp of P(C) after every update
    """

    method: str = "dng"
    max_ratio: float | None = None
    prior: float | None = None
    temperature: float = 1.0
    offset: float = 0.0
    p_min: float = 1e-6
    p_max: float = 0.99

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown guidance {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.max_ratio is not None and not (math.isfinite(self.max_ratio) and self.max_ratio > 0):
            raise ValueError(f"max_ratio must be a finite number > 0 (or None), got {self.max_ratio}")
        if not (0.0 < self.p_min < self.p_max < 1.0):
            raise ValueError(f"the clamp needs 0 < p_min < p_max < 1, got p_min {self.p_min:g}, p_max {self.p_max:g}")
        if self.prior is not None and not (0.0 < self.prior < 1.0):
            raise ValueError(f"the published variant's prior must be in (0, 1), got {self.prior}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"the temperature must be a finite number > 0, got {self.temperature}")
        if not math.isfinite(self.offset):
            raise ValueError(f"the offset must be a finite number, got {self.offset}")

    def describe(self, scale: float) -> str:
        """The eps of a step, in one line."""
        if self.method == "dng":
            cap = "" if self.max_ratio is None else f", P/(1 - P) capped at {self.max_ratio:g}"
            return (f"DNG, exact recursion: eps = eps_null - lam P(C | x_t)/(1 - P(C | x_t)) (eps_C - eps_null), "
                    f"lam = {scale:g}, P from the K-class online classifier{cap}")
        if self.method == "dng_published":
            prior = "pi_C" if self.prior is None else f"{self.prior:g}"
            return (f"DNG, published variant: eps = eps_null - lam p/(1 - p) (eps_C - eps_null), lam = {scale:g}; "
                    f"p_T = {prior}, log p += (-temperature (|x' - mu_C|^2 - |x' - mu_null|^2) + offset) "
                    f"/ (2 sigma_t^2), "
                    f"temperature {self.temperature:g}, offset {self.offset:g}, clamped to "
                    f"[{self.p_min:g}, {self.p_max:g}]")
        if self.method == "negative":
            return f"negative prompting: eps = eps_null - w (eps_C - eps_null), w = {scale:g}"
        return "unguided: eps = eps_null"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GuidedRun:
    """A batch of guided trajectories and what rode along. Per step arrays run in generation order
    (t = S..1), taken at x_t before the step from t; M = `record` trajectories are kept whole.

    x_0:                 (N, *shape) the samples
    log_posterior:       (N, K) tracked log P(k | x_1, ..., x_T) at the end
    removed_probability: (S,) mean over the batch of the tracked P(C | x_t, ..., x_T)
    effective_scale:     (S, 3) mean, median and max over the batch of the coefficient of
                         (eps_C - eps_null) in the step: lam P/(1 - P) (dng), lam p/(1 - p)
                         (dng_published), w (negative), 0 (none)
    path_x:              (S, M, *shape) x_t of the first M trajectories
    path_log_posterior:  (S, M, K) their tracked log P(k | x_t, ..., x_T)
    path_scale:          (S, M) their coefficient
    path_published:      (S, M) their published-variant p (NaN for other methods)
    """

    x_0: jax.Array
    log_posterior: jax.Array
    removed_probability: jax.Array
    effective_scale: jax.Array
    path_x: jax.Array
    path_log_posterior: jax.Array
    path_scale: jax.Array
    path_published: jax.Array


# --- the formulas, for one example -------------------------------------------------------------

def removed_log_odds(log_posterior: jax.Array, removed: jax.Array) -> jax.Array:
    """log [P(C | x) / (1 - P(C | x))] from a normalised log posterior (K,) and the mask of C (K,):
    logsumexp over C minus logsumexp over the rest, so nothing cancels as P(C) -> 1."""
    neg = jnp.full_like(log_posterior, -jnp.inf)
    return (jax.nn.logsumexp(jnp.where(removed, log_posterior, neg))
            - jax.nn.logsumexp(jnp.where(removed, neg, log_posterior)))


def removed_eps(eps_class: jax.Array, log_posterior: jax.Array, removed: jax.Array) -> jax.Array:
    """eps_C = sum_{c in C} P(c | x, C) eps_c, eps_class (K, *shape), weights from log_posterior (K,)."""
    w = jax.nn.softmax(jnp.where(removed, log_posterior, -jnp.inf))
    return jnp.tensordot(w, eps_class, axes=1, precision=jax.lax.Precision.HIGHEST)


def dng_ratio(log_odds: jax.Array, max_ratio: float | None = None) -> jax.Array:
    """P/(1 - P) = exp(log odds), capped at max_ratio (None: at exp(LOG_RATIO_GUARD))."""
    cap = LOG_RATIO_GUARD if max_ratio is None else min(math.log(max_ratio), LOG_RATIO_GUARD)
    return jnp.exp(jnp.minimum(log_odds, cap))


def negative_guided(eps_null: jax.Array, eps_c: jax.Array, scale: jax.Array) -> jax.Array:
    """eps_null - scale (eps_C - eps_null): negative prompting (scale = w) and DNG (scale = lam P/(1 - P))."""
    return eps_null - scale * (eps_c - eps_null)


def published_update(log_p: jax.Array, x_prev: jax.Array, mean_removed: jax.Array, mean_null: jax.Array,
                     variance: jax.Array, guidance: Guidance) -> jax.Array:
    """The published variant's update of log p = log P(C), against the null kernel:

        log p' = clip(log p + (-temperature (|x' - mu_C|^2 - |x' - mu_null|^2) + offset) / (2 sigma^2),
                      log p_min, log p_max)

    mu_C = mu(x_t, eps_C), mu_null = mu(x_t, eps_null) unguided, sigma^2 the variance of the step."""
    diff = jnp.sum((x_prev - mean_removed) ** 2) - jnp.sum((x_prev - mean_null) ** 2)
    step = (-guidance.temperature * diff + guidance.offset) / (2.0 * variance)
    return jnp.clip(log_p + step, math.log(guidance.p_min), math.log(guidance.p_max))


def _all_eps(eps_fn: EpsFn, params, x, timestep, K: int) -> jax.Array:
    """(K + 1, *shape) every class's eps and, last, the null's."""
    all_classes = getattr(eps_fn, "all_classes", None)
    if all_classes is not None:
        eps = all_classes(params, x, timestep, True)
        if eps.shape[0] != K + 1:  # a trace-time check: the prior and the model disagree on K
            raise ValueError(f"the eps function has {eps.shape[0] - 1} classes and a null, but the prior has {K} "
                             "classes (for a mixture, pass its class_log_weights)")
        return eps
    return jax.vmap(eps_fn, (None, None, None, 0))(params, x, timestep, jnp.arange(K + 1))


def guided_step(eps_fn: EpsFn, params, schedule: Schedule, sampler: Sampler, guidance: Guidance, t, x, log_w,
                log_p, z, scale, removed):
    """One guided reverse step of one trajectory, and the tracker's update.

    x (*shape), log_w (K,) tracked log P(k | x_t, ...), log_p () the published variant's log p,
    z (*shape) N(0, I), scale the lam or w, removed (K,) the mask of C. Returns x_{t-1},
    log_w and log_p after the step, and the coefficient of (eps_C - eps_null) used."""
    K = log_w.shape[0]
    eps = _all_eps(eps_fn, params, x, schedule.timesteps[t - 1], K)
    eps_class, eps_null = eps[:K], eps[K]
    eps_c = removed_eps(eps_class, log_w, removed)
    if guidance.method == "dng":
        coef = scale * dng_ratio(removed_log_odds(log_w, removed), guidance.max_ratio)
    elif guidance.method == "dng_published":
        coef = scale * jnp.exp(log_p - jnp.log1p(-jnp.exp(log_p)))
    elif guidance.method == "negative":
        coef = scale * jnp.ones((), x.dtype)
    else:
        coef = jnp.zeros((), x.dtype)
    mean = functools.partial(reverse_mean, schedule, t, x, sampler=sampler)
    sigma = reverse_std(schedule, t, sampler)
    x_prev = mean(eps=negative_guided(eps_null, eps_c, coef)) + sigma * z
    # Bayes over the K classes with the unguided class kernels (the last step carries no update)
    update = t > 1
    var = jnp.where(update, sigma**2, 1.0)
    means = jax.vmap(lambda e: mean(eps=e))(eps_class)
    sq = jnp.sum(((x_prev - means) ** 2).reshape(K, -1), axis=-1)
    log_w_prev = jnp.where(update, jax.nn.log_softmax(log_w - 0.5 * sq / var), log_w)
    if guidance.method == "dng_published":
        log_p = jnp.where(update, published_update(log_p, x_prev, mean(eps=eps_c), mean(eps=eps_null), var,
                                                   guidance), log_p)
    return x_prev, log_w_prev, log_p, coef


# --- the batch: one compiled scan ----------------------------------------------------------------

def removal_mask(remove, num_classes: int) -> np.ndarray:
    """(K,) bool mask of the removed classes C (a sequence of class indices); ValueError unless C
    is a non-empty proper subset of the classes."""
    remove = [int(c) for c in remove]
    if not remove:
        raise ValueError("name at least one class to remove")
    bad = [c for c in remove if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"there is no class {bad[0]}: the classes are 0..{num_classes - 1}")
    mask = np.zeros(num_classes, bool)
    mask[remove] = True
    if mask.all():
        raise ValueError("cannot remove every class: nothing would be left to generate")
    return mask


def sample(eps_fn: EpsFn, params, schedule: Schedule, sampler: Sampler, key: jax.Array, remove, *, num: int,
           shape: tuple[int, ...], log_prior: jax.Array, guidance: Guidance = Guidance(), scale: float = 1.0,
           record: int = 8, batch_size: int | None = None) -> GuidedRun:
    """Generate `num` samples without the classes `remove` (indices), guided by `guidance` at
    `scale` (lam for DNG, w for negative prompting), with the online classifier in the loop.

    eps_fn:    per-example eps(params, x_t, t, k), k = K the null class (as `tracking.Tracker`)
    log_prior: (K,) log pi_k, the tracker's start (any scale: normalised here)
    key:       x_T ~ N(0, I) from its first split; the noise of the step from t is
               normal(fold_in(second split, t)), the convention of `Tracker.run`
    record:    how many trajectories' x_t to keep (`GuidedRun.path_x`)
    batch_size: trajectories per network call (None: all), as in `Tracker`
    """
    if not sampler.stochastic:
        raise ValueError("guidance by the tracked posterior needs a stochastic sampler: a deterministic step "
                         "carries no likelihood to update on")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"the guidance scale must be a finite number >= 0, got {scale}")
    check = getattr(eps_fn, "check_schedule", None)
    if check is not None:
        check(schedule)
    log_prior = jax.nn.log_softmax(jnp.asarray(log_prior, jnp.float32))
    mask = removal_mask(remove, log_prior.shape[0])
    p_C = float(np.exp(np.asarray(log_prior, np.float64))[mask].sum())
    if not 0.0 < p_C < 1.0:
        raise ValueError(f"the removed classes have prior weight {p_C:g}: there is nothing to remove, or nothing left")
    prior = p_C if guidance.prior is None else guidance.prior
    log_p0 = float(np.log(prior))  # unclamped at the start, as upstream
    return _scan(eps_fn, sampler, guidance, int(num), tuple(shape), int(min(record, num)), batch_size,
                 params, schedule, key, jnp.float32(scale), jnp.asarray(mask), log_prior, jnp.float32(log_p0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _scan(eps_fn, sampler, guidance, num, shape, record, batch_size, params, schedule, key, scale, removed,
          log_prior, log_p0):
    key_x, key_run = jax.random.split(key)
    x_T = jax.random.normal(key_x, (num, *shape))
    K = log_prior.shape[0]
    init = (x_T, jnp.broadcast_to(log_prior, (num, K)), jnp.full((num,), log_p0))

    def one(t, a):
        x, log_w, log_p, z = a
        return guided_step(eps_fn, params, schedule, sampler, guidance, t, x, log_w, log_p, z, scale, removed)

    def body(state, t):
        x, log_w, log_p = state
        z = jax.random.normal(jax.random.fold_in(key_run, t), x.shape)
        x_prev, log_w_prev, log_p_prev, coef = jax.lax.map(functools.partial(one, t), (x, log_w, log_p, z),
                                                           batch_size=batch_size or num)
        p_removed = jnp.exp(jnp.where(removed, log_w, -jnp.inf)).sum(-1)
        published = jnp.exp(log_p) if guidance.method == "dng_published" else jnp.full_like(log_p, jnp.nan)
        stats = jnp.stack([coef.mean(), jnp.median(coef), coef.max()])
        out = (p_removed.mean(), stats, x[:record], log_w[:record], coef[:record], published[:record])
        return (x_prev, log_w_prev, log_p_prev), out

    steps = jnp.arange(schedule.num_steps, 0, -1)
    (x_0, log_w, _), out = jax.lax.scan(body, init, steps)
    return GuidedRun(x_0, log_w, *out)
