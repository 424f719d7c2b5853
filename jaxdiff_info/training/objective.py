"""The training objective and the optimiser.

The objective is the eps-prediction loss of Ho et al. (2020), with the class label replaced
by the null label with probability p (0.1) so that one network gives both the conditional
eps(x_t, t, k) and the unconditional eps(x_t, t, null):

    t ~ Uniform{1..T},  eps ~ N(0, I),  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    L(theta) = E || eps - eps_theta(x_t, t, k) ||^2      (mean over pixels and the batch)

on the DDPM linear schedule (T = 1000), x_0 in [-1, 1] NHWC. The optimiser is Adam with a
linear learning-rate warm-up and gradient clipping at global norm 1.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxdiff_info import unet
from jaxdiff_info.schedule import Schedule, alpha_bar_at


def diffusion_loss(
    params: nnx.State,
    net: unet.UNetConfig,
    schedule: Schedule,
    key: jax.Array,
    x_0: jax.Array,
    labels: jax.Array,
    *,
    label_dropout: float = 0.1,
    compute_dtype: Any = None,
) -> jax.Array:
    """Mean of ||eps - eps_theta(x_t, t, k)||^2 / D over a batch, with a fresh t and eps per image.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (``schedule.q_sample``), t ~ Uniform{1..T};
    each label becomes the null class with probability ``label_dropout``; dropout is on.
    x_0: (B, H, W, C) in [-1, 1]; labels: (B,) int in 0..K-1.
    """
    B = x_0.shape[0]
    k_t, k_eps, k_drop, k_dropout = jax.random.split(key, 4)
    t = jax.random.randint(k_t, (B,), 1, schedule.num_steps + 1)
    eps = jax.random.normal(k_eps, x_0.shape, x_0.dtype)
    abar = alpha_bar_at(schedule, t)[:, None, None, None]
    x_t = jnp.sqrt(abar) * x_0 + jnp.sqrt(1.0 - abar) * eps
    dropped = jax.random.bernoulli(k_drop, label_dropout, (B,))
    k = jnp.where(dropped, net.null_class, labels)
    prediction = unet.apply(net, params, x_t, t, k, dropout_key=k_dropout, compute_dtype=compute_dtype,
                            fast_backward=True)
    return jnp.mean((prediction - eps) ** 2)


def learning_rate(lr: float, warmup: int) -> optax.Schedule:
    """lr * min(1, (n + 1) / warmup) for the n-th update (n = 0, 1, ...); constant if warmup = 0."""
    if warmup == 0:
        return optax.constant_schedule(lr)
    return lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)


def make_optimizer(lr: float, warmup: int, grad_clip: float) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (betas 0.9, 0.999, eps 1e-8) with the warm-up schedule."""
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate(lr, warmup)))

