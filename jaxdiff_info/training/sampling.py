"""Class-conditional samples of a network, and the sample grid written at each checkpoint.

``sample`` is DDPM ancestral sampling on steps respaced from the training schedule, the
reverse chain of ``tracking.generate`` with the network's per-example eps
(``unet.make_eps_fn``); ``_sample_grid_figure`` lays the samples out one row per class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiff_info import tracking, unet
from jaxdiff_info.schedule import Sampler, linear_schedule, respace
from jaxdiff_info.training.config import NUM_TRAIN_STEPS


@functools.lru_cache(maxsize=8)
def _compiled_sampler(net: unet.UNetConfig, num_steps: int, variance: str, clip: bool, bf16: bool):
    schedule = respace(linear_schedule(NUM_TRAIN_STEPS), num_steps)
    sampler = Sampler("ddpm", variance, clip_x0=1.0 if clip else None)
    eps_fn = unet.make_eps_fn(net, compute_dtype=jnp.bfloat16 if bf16 else None)

    def run(params, key, labels):
        k_init, k_steps = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0], net.image_size, net.image_size, net.channels))
        x_0 = tracking.generate(eps_fn, params, schedule, sampler, k_steps, x_T, labels)
        return jnp.clip(x_0, -1.0, 1.0)

    return jax.jit(run)


def sample(net: unet.UNetConfig, params: nnx.State, key: jax.Array, labels: jax.Array, *,
           num_steps: int = 100, variance: str = "small", clip: bool = True, bf16: bool = False) -> jax.Array:
    """Class-conditional samples x_0 (N, H, W, C) in [-1, 1] for labels (N,).

    DDPM ancestral sampling on ``num_steps`` steps respaced from the training schedule
    (``schedule.respace``), sigma_t^2 = beta~_t ("small") or beta_t ("large"). With ``clip``
    (as in Ho et al.'s sampler), each step uses the posterior mean given the prediction of
    x_0 clipped to [-1, 1], i.e. the eps of that clipped prediction (``Sampler(clip_x0=1)``).
    x_T comes from the first key of ``jax.random.split(key)``, the noise of the steps from the
    second (``tracking.generate``). Compiled functions are cached per (net, settings).
    """
    fn = _compiled_sampler(net, int(num_steps), variance, bool(clip), bool(bf16))
    return fn(params, key, jnp.asarray(labels, jnp.int32))


def _sample_grid_figure(images: np.ndarray, class_names, title: str):
    """A figure of uint8 images (K, M, H, W, C), one row per class, labelled."""
    from jaxdiff_info import plots

    K, M, H, W, C = images.shape
    pad = 2
    grid = np.full((K * (H + pad) + pad, M * (W + pad) + pad, C), 255, np.uint8)
    for k in range(K):
        for m in range(M):
            y, x = pad + k * (H + pad), pad + m * (W + pad)
            grid[y:y + H, x:x + W] = images[k, m]
    fig, ax = plots.plt.subplots(figsize=(0.45 * M + 1.6, 0.45 * K + 0.5))
    ax.imshow(grid.squeeze(-1) if C == 1 else grid, cmap="gray" if C == 1 else None, interpolation="nearest")
    ax.set_yticks([pad + k * (H + pad) + H / 2 for k in range(K)], list(class_names), fontsize=8)
    ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=8)
    return fig

