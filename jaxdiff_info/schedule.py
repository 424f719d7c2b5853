"""Noise schedules and the discrete variance-preserving diffusion, as pure functions.

Steps are t = 1..T; arrays are indexed by t - 1. Every function acts on ONE example
(x of any shape) and is meant to be `jax.vmap`-ed at the edge.

The formulas: docs/method.md, "Time and the forward process" and "Reverse steps".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Variance = Literal["small", "large"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete VP schedule of T steps.

    betas:      (T,) beta_t of each step (for a respaced schedule, 1 - abar_t / abar_{t-1})
    alpha_bar:  (T,) alpha_bar_t = prod_{s<=t} (1 - beta_s)
    timesteps:  (T,) int, the step of the model's own (training) schedule each step sits at;
                this is the t handed to eps(params, x_t, t, k)
    num_train_steps: T of the training schedule (static); normalised time is timesteps / it
    """

    betas: jax.Array
    alpha_bar: jax.Array
    timesteps: jax.Array
    num_train_steps: int = dataclasses.field(metadata=dict(static=True))

    @property
    def num_steps(self) -> int:
        return self.betas.shape[0]

    @property
    def time(self) -> jax.Array:
        """(T,) normalised time t / T_train of each step, in (0, 1]."""
        return self.timesteps / self.num_train_steps

    @property
    def log_snr(self) -> jax.Array:
        """(T,) log SNR_t = log(alpha_bar_t / (1 - alpha_bar_t))."""
        return jnp.log(self.alpha_bar) - jnp.log1p(-self.alpha_bar)

    @property
    def ou_time(self) -> jax.Array:
        """(T,) Ornstein-Uhlenbeck time s with alpha_bar = exp(-2 s)."""
        return -0.5 * jnp.log(self.alpha_bar)


def _from_alpha_bar(alpha_bar: np.ndarray, timesteps: np.ndarray, num_train_steps: int) -> Schedule:
    alpha_bar = np.asarray(alpha_bar, np.float64)
    prev = np.concatenate([[1.0], alpha_bar[:-1]])
    betas = 1.0 - alpha_bar / prev
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32),
        alpha_bar=jnp.asarray(alpha_bar, jnp.float32),
        timesteps=jnp.asarray(timesteps, jnp.int32),
        num_train_steps=int(num_train_steps),
    )


def linear_schedule(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """DDPM linear betas; for T != 1000 both ends scale by 1000 / T (so alpha_bar_T stays ~0)."""
    _check_num_steps(num_steps)
    scale = 1000.0 / num_steps
    betas = np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)
    if betas[-1] >= 1.0:
        raise ValueError(f"too few steps ({num_steps}) for a linear schedule: beta_T >= 1; use at least 21")
    alpha_bar = np.cumprod(1.0 - betas)
    return _from_alpha_bar(alpha_bar, np.arange(1, num_steps + 1), num_steps)


def cosine_schedule(num_steps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal cosine schedule: alpha_bar(u) = cos^2((u + o) / (1 + o) * pi / 2)."""
    _check_num_steps(num_steps)
    f = lambda u: np.cos((u + offset) / (1.0 + offset) * math.pi / 2.0) ** 2
    u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    betas = np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)
    alpha_bar = np.cumprod(1.0 - betas)
    return _from_alpha_bar(alpha_bar, np.arange(1, num_steps + 1), num_steps)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


def make_schedule(name: str, num_steps: int = 1000) -> Schedule:
    """A named schedule ("linear" or "cosine") of num_steps steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](num_steps)


def respace(schedule: Schedule, num_steps: int) -> Schedule:
    """A schedule of num_steps steps on an evenly spaced subset of the model's steps.

    Each step jumps between kept steps, beta_i = 1 - abar_{t_i} / abar_{t_{i-1}}, so the
    marginals q(x_t | x_0) at kept steps are unchanged.
    """
    _check_num_steps(num_steps)
    if num_steps > schedule.num_steps:
        raise ValueError(
            f"cannot sample with {num_steps} steps: the model's schedule has only {schedule.num_steps}"
        )
    keep = np.unique(np.round(np.linspace(1, schedule.num_steps, num_steps)).astype(int)) - 1
    alpha_bar = np.asarray(schedule.alpha_bar, np.float64)[keep]
    timesteps = np.asarray(schedule.timesteps)[keep]
    return _from_alpha_bar(alpha_bar, timesteps, schedule.num_train_steps)


def _check_num_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 2:
        raise ValueError(f"the number of diffusion steps must be an integer >= 2, got {num_steps}")


# --- the forward process --------------------------------------------------------------

def alpha_bar_at(schedule: Schedule, t: jax.Array) -> jax.Array:
    """alpha_bar_t for t in 0..T (alpha_bar_0 = 1)."""
    return jnp.where(t > 0, schedule.alpha_bar[jnp.maximum(t - 1, 0)], 1.0)


def q_sample(schedule: Schedule, key: jax.Array, x_0: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  eps ~ N(0, I)."""
    abar = alpha_bar_at(schedule, t)
    eps = jax.random.normal(key, x_0.shape, x_0.dtype)
    return jnp.sqrt(abar) * x_0 + jnp.sqrt(1.0 - abar) * eps


# --- conversions between predictions (at a given alpha_bar) ---------------------------

def eps_to_x0(x_t: jax.Array, eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def x0_to_eps(x_t: jax.Array, x_0: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """eps = (x_t - sqrt(abar) x_0) / sqrt(1 - abar)."""
    return (x_t - jnp.sqrt(alpha_bar) * x_0) / jnp.sqrt(1.0 - alpha_bar)


def eps_to_score(eps: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """grad log p(x_t) = -eps / sqrt(1 - abar)."""
    return -eps / jnp.sqrt(1.0 - alpha_bar)


def score_to_eps(score: jax.Array, alpha_bar: jax.Array) -> jax.Array:
    """eps = -sqrt(1 - abar) grad log p(x_t)."""
    return -jnp.sqrt(1.0 - alpha_bar) * score


# --- reverse steps ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sampler:
    """Which reverse step: DDPM ancestral ("ddpm", variance "small" = beta~_t or "large" = beta_t)
    or DDIM ("ddim", noise scale eta: sigma_t = eta * sqrt(beta~_t))."""

    kind: Literal["ddpm", "ddim"] = "ddpm"
    variance: Variance = "small"
    eta: float = 1.0
    clip_x0: float | None = None  # clip the predicted x_0 to [-c, c] (Ho et al.: c = 1 for images)

    def __post_init__(self):
        if self.kind not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {self.kind!r}; choose ddpm or ddim")
        if self.variance not in ("small", "large"):
            raise ValueError(f"unknown variance {self.variance!r}; choose small (beta~_t) or large (beta_t)")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")
        if self.clip_x0 is not None and not (math.isfinite(self.clip_x0) and self.clip_x0 > 0):
            raise ValueError(f"clip_x0 must be a finite number > 0 (or None), got {self.clip_x0}")

    @property
    def stochastic(self) -> bool:
        return self.kind == "ddpm" or self.eta > 0

    def describe(self) -> str:
        clip = "" if self.clip_x0 is None else f", x_0 prediction clipped to +-{self.clip_x0:g}"
        if self.kind == "ddpm":
            return f"DDPM ancestral, sigma_t^2 = {'beta~_t' if self.variance == 'small' else 'beta_t'}{clip}"
        return f"DDIM, eta = {self.eta:g} (sigma_t = eta sqrt(beta~_t)){clip}"


def reverse_std(schedule: Schedule, t: jax.Array, sampler: Sampler) -> jax.Array:
    """sigma_t of the step x_t -> x_{t-1}; zero at t = 1 (the last step is noiseless)."""
    beta = schedule.betas[t - 1]
    abar = schedule.alpha_bar[t - 1]
    abar_prev = alpha_bar_at(schedule, t - 1)
    beta_tilde = beta * (1.0 - abar_prev) / (1.0 - abar)
    if sampler.kind == "ddpm":
        var = beta_tilde if sampler.variance == "small" else beta
        std = jnp.sqrt(var)
    else:
        std = sampler.eta * jnp.sqrt(beta_tilde)
    return jnp.where(t > 1, std, 0.0)


def reverse_mean(schedule: Schedule, t: jax.Array, x_t: jax.Array, eps: jax.Array, sampler: Sampler) -> jax.Array:
    """Mean of x_{t-1} given x_t and an eps-prediction.

    DDPM: mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)
    DDIM: mu = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps
    With clip_x0, x0_hat = clip(eps_to_x0(x_t, eps)) and eps is recomputed from it (for DDPM
    this is the posterior mean of q(x_{t-1} | x_t, x0_hat)).
    """
    beta = schedule.betas[t - 1]
    abar = schedule.alpha_bar[t - 1]
    if sampler.clip_x0 is not None:
        x0 = jnp.clip(eps_to_x0(x_t, eps, abar), -sampler.clip_x0, sampler.clip_x0)
        eps = x0_to_eps(x_t, x0, abar)
    if sampler.kind == "ddpm":
        return (x_t - beta / jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(1.0 - beta)
    abar_prev = alpha_bar_at(schedule, t - 1)
    sigma = reverse_std(schedule, t, sampler)
    x0 = eps_to_x0(x_t, eps, abar)
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps


def reverse_step(
    schedule: Schedule, key: jax.Array, t: jax.Array, x_t: jax.Array, eps: jax.Array, sampler: Sampler
) -> jax.Array:
    """x_{t-1} = mean(x_t, eps) + sigma_t z,  z ~ N(0, I)."""
    z = jax.random.normal(key, x_t.shape, x_t.dtype)
    return reverse_mean(schedule, t, x_t, eps, sampler) + reverse_std(schedule, t, sampler) * z
