"""A plain NumPy implementation of the online Bayesian classifier on a Gaussian mixture.

The same estimator as `jaxdiff_info.tracking.Tracker` + `jaxdiff_info.estimators.online_block_sums`
(see docs/method.md, "Estimator 3: the online Bayesian classifier"), written the obvious way: a Python loop
over the reverse steps t = T..1, vectorised over the N trajectories and the K classes.

Per step, for trajectories x (N, d) generated with fixed classes c (N,):

    v_k    = abar_t s_k^2 + 1 - abar_t
    eps_k  = sqrt(1 - abar_t) (x - sqrt(abar_t) m_k) / v_k                  (N, K, d), closed form
    mu_k   = (x - beta_t / sqrt(1 - abar_t) eps_k) / sqrt(alpha_t)           DDPM reverse mean
    x'     = mu_{c}(x) + sigma_t z,   sigma_t^2 = beta~_t ("fixed small"),  no noise at t = 1
    log w_k += -||x' - mu_k||^2 / (2 sigma_t^2),  then renormalised by logsumexp (not at t = 1)

and at every step, BEFORE the step from t (the same convention as `Tracker.run`'s observe),
the entropy in bits of P(z | x_t) for every decision problem (default: the class label),
averaged over the trajectories of each generating class.

Dtype: the schedule comes from `jaxdiff_info.schedule.linear_schedule(T)` (float32 arrays),
converted to NumPy in `dtype` (float32 by default, like the JAX loop; float64 on request).
Noise: `np.random.default_rng(seed)`, drawn in `dtype`.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

LN2 = np.log(2.0)


@dataclasses.dataclass(frozen=True)
class NumpyMixture:
    """means (K, d), stds (K,), weights (K,) normalised to sum 1."""

    means: np.ndarray
    stds: np.ndarray
    weights: np.ndarray

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]


def make_numpy_mixture(means, stds, weights=None, dtype=np.float32) -> NumpyMixture:
    means = np.asarray(means, np.float64)
    if means.ndim == 1:
        means = means[:, None]
    k = means.shape[0]
    weights = np.ones(k) if weights is None else np.asarray(weights, np.float64)
    return NumpyMixture(means.astype(dtype), np.asarray(stds, np.float64).astype(dtype), (weights / weights.sum()).astype(dtype))


def numpy_schedule(num_steps: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """betas, alpha_bar (T,) of `jaxdiff_info.schedule.linear_schedule(T)`, as NumPy `dtype`."""
    from jaxdiff_info.schedule import linear_schedule

    s = linear_schedule(num_steps)
    return {"betas": np.asarray(s.betas).astype(dtype), "alpha_bar": np.asarray(s.alpha_bar).astype(dtype)}


def class_label_membership(num_classes: int) -> np.ndarray:
    """(1, K, K): the plain class label, every class its own group."""
    return np.eye(num_classes, dtype=bool)[None]


def logsumexp(a: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis=axis)


def problem_entropy_bits(log_post: np.ndarray, membership: np.ndarray) -> np.ndarray:
    """(N, P) entropy in bits of P(z | x_t) for every problem, from (N, K) normalised log P(k | x_t)
    and (P, G, K) membership (classes in no group are left out and the rest renormalised)."""
    out = np.empty((log_post.shape[0], membership.shape[0]), log_post.dtype)
    for p, groups in enumerate(membership):
        if groups.shape[0] == groups.shape[1] and np.array_equal(groups, np.eye(groups.shape[0], dtype=bool)):
            log_z = log_post  # the class label itself: P(z | x) = P(k | x)
        else:
            masked = np.where(groups[None, :, :], log_post[:, None, :], -np.inf)  # (N, G, K)
            with np.errstate(divide="ignore"):
                log_g = logsumexp(masked, axis=-1)  # (N, G), -inf for an empty group
            log_z = log_g - logsumexp(log_g, axis=-1, keepdims=True)
        p_z = np.exp(log_z)
        with np.errstate(invalid="ignore"):
            terms = np.where(p_z > 0, p_z * log_z, 0.0)
        out[:, p] = -terms.sum(axis=-1) / LN2
    return out


@dataclasses.dataclass
class NumpyRun:
    """class_entropy (S, K, P): per-class mean entropy in bits, in loop order (t = T, T-1, ...,
    the first S steps run); steps: (S,) the t of each row; x: (N, d) final x; log_post: (N, K);
    seconds: wall time of the loop."""

    class_entropy: np.ndarray
    steps: np.ndarray
    x: np.ndarray
    log_post: np.ndarray
    seconds: float


def run_online(
    mixture: NumpyMixture,
    per_class: int,
    num_steps: int = 1000,
    membership: np.ndarray | None = None,
    seed: int = 0,
    dtype=np.float32,
    max_steps: int | None = None,
) -> NumpyRun:
    """Online classifier along `per_class` reverse trajectories of every class (class-major:
    trajectory j of class k is number k * per_class + j).

    max_steps: stop after the first `max_steps` reverse steps t = T, ..., T - max_steps + 1
    (for timing: every step but t = 1 costs the same), None = all T steps.
    """
    dtype = np.dtype(dtype).type
    K, d = mixture.num_components, mixture.dim
    membership = class_label_membership(K) if membership is None else np.asarray(membership, bool)
    sched = numpy_schedule(num_steps, dtype)
    betas, alpha_bar = sched["betas"], sched["alpha_bar"]
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(K), per_class)
    N = classes.shape[0]
    rows = np.arange(N)
    means = mixture.means.astype(dtype)
    var_data = mixture.stds.astype(dtype) ** 2
    one = dtype(1.0)

    x = rng.standard_normal((N, d), dtype=dtype)
    with np.errstate(divide="ignore"):
        log_w = np.log(mixture.weights.astype(dtype))
    log_w = np.broadcast_to(log_w - logsumexp(log_w), (N, K)).copy()

    steps = np.arange(num_steps, 0, -1)[: (num_steps if max_steps is None else max_steps)]
    out = np.empty((steps.shape[0], K, membership.shape[0]), dtype)
    start = time.perf_counter()
    for i, t in enumerate(steps):
        # the statistic at x_t, before the step from t
        h = problem_entropy_bits(log_w, membership)  # (N, P)
        out[i] = h.reshape(K, per_class, -1).mean(axis=1)

        beta, abar = betas[t - 1], alpha_bar[t - 1]
        abar_prev = alpha_bar[t - 2] if t > 1 else one
        v = abar * var_data + (one - abar)  # (K,)
        eps = np.sqrt(one - abar) * (x[:, None, :] - np.sqrt(abar) * means[None]) / v[None, :, None]  # (N, K, d)
        mu = (x[:, None, :] - beta / np.sqrt(one - abar) * eps) / np.sqrt(one - beta)  # (N, K, d)
        if t > 1:
            var = beta * (one - abar_prev) / (one - abar)  # beta~_t
            z = rng.standard_normal((N, d), dtype=dtype)
            x = mu[rows, classes] + np.sqrt(var) * z
            sq = np.sum((x[:, None, :] - mu) ** 2, axis=-1)  # (N, K)
            log_w = log_w - sq / (2 * var)
            log_w = log_w - logsumexp(log_w, axis=-1, keepdims=True)
        else:
            x = mu[rows, classes]  # the last step is noiseless and carries no update
    seconds = time.perf_counter() - start
    return NumpyRun(out, steps, x, log_w, seconds)
