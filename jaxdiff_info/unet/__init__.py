"""Class-conditional DDPM U-Net (Ho et al., 2020, Appendix B) in Flax NNX.

The noise-prediction network eps_theta(x_t, t, k) of the CIFAR-10 model of
Ho et al.: a Wide-ResNet style U-Net with four feature-map resolutions
(32, 16, 8, 4), two residual blocks per resolution, self-attention at 16x16,
GroupNorm, swish and a sinusoidal timestep embedding.  Class conditioning adds
a learned embedding of the label k to the timestep embedding; the label
``num_classes`` is the null label used for classifier-free guidance.

The rest of the library treats the network as a pure function of an explicit
parameter pytree.  The design is::

    params = init_params(config, key)            # nnx.State of nnx.Param
    eps    = apply(config, params, x_t, t, k)    # (B, H, W, C) -> (B, H, W, C)
    eps_fn = make_eps_fn(config)                 # eps_fn(params, x, t, k), one example

The static structure of the network (the ``nnx.GraphDef``) depends only on the
``UNetConfig`` and is cached per config (``graphdef(config)``), so a config is
all a caller has to keep next to the parameters.  ``apply`` merges graphdef
and parameters into a fresh module inside the (possibly traced) call, which
makes it a pure function of ``params`` that can be jitted, differentiated and
vmapped; the config (hashable) and ``compute_dtype`` are static arguments::

    apply_jit = jax.jit(apply, static_argnums=0, static_argnames="compute_dtype")

The hyper-parameters are in ``unet.config`` and the layers and modules in ``unet.network``;
this module is the functional interface, and every name is importable from it.

Layout is NHWC throughout.  Labels outside 0..num_classes give NaN output for
the examples that carry them (an error cannot be raised under ``jit``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff_info.layers import Conv, GroupNorm, Linear
from jaxdiff_info.unet.config import CONFIGS, TRAIN_STEPS, UNetConfig, get_config  # noqa: F401
from jaxdiff_info.unet.network import (  # noqa: F401
    AttnBlock,
    Block,
    Downsample,
    ResBlock,
    UNet,
    Upsample,
    preconditioning,
    timestep_embedding,
)

__all__ = [
    "CONFIGS",
    "UNet",
    "UNetConfig",
    "abstract_params",
    "apply",
    "count_params",
    "get_config",
    "graphdef",
    "init_params",
    "make_eps_fn",
    "preconditioning",
    "timestep_embedding",
]


# --- Functional interface ------------------------------------------------------------


@functools.cache
def _split_abstract(config: UNetConfig):
    abstract = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    return nnx.split(abstract, nnx.Param)


def graphdef(config: UNetConfig) -> nnx.GraphDef:
    """Static structure of the U-Net of ``config`` (cached)."""
    return _split_abstract(config)[0]


def abstract_params(config: UNetConfig) -> nnx.State:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct leaves), no allocation."""
    return jax.tree.map(lambda leaf: leaf, _split_abstract(config)[1])


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: UNetConfig, key: jax.Array) -> nnx.State:
    """Initial parameters, an ``nnx.State`` of ``nnx.Param`` (float32)."""
    model = UNet(config, rngs=nnx.Rngs(params=key))
    _, params = nnx.split(model, nnx.Param)
    return params


def apply(
    net: UNetConfig | nnx.GraphDef,
    params: nnx.State,
    x_t: jax.Array,
    t: jax.Array,
    k: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
    compute_dtype: Any = None,
    fast_backward: bool = False,
) -> jax.Array:
    """Batched noise prediction eps_theta(x_t, t, k).

    Args:
      net: a ``UNetConfig`` or the ``nnx.GraphDef`` of the network.
      params: the parameter state from ``init_params``.
      x_t: (B, H, W, C) noisy images.
      t: (B,) integer timesteps in 1..T (embedded as floats); a scalar is
        broadcast.
      k: (B,) integer labels in 0..num_classes, ``num_classes`` being the null
        label; a scalar is broadcast.  Out-of-range labels give NaN for that
        example.
      dropout_key: a PRNG key; dropout is applied iff it is given.
      compute_dtype: e.g. ``jnp.bfloat16``: dense and convolution layers
        compute in this dtype (parameters stay float32 and are cast on use),
        while GroupNorm, softmax and the output stay float32.
      fast_backward: the same function, with a backward pass that takes the sums over the
        pixels (bias, GroupNorm) as matrix products, faster on XLA:CPU (see
        ``layers.add_bias``); reverse-mode autodiff only (no jax.jvp). The training objective
        sets it.

    Returns:
      eps: (B, H, W, C) float32.
    """
    gdef = graphdef(net) if isinstance(net, UNetConfig) else net
    model = nnx.merge(gdef, params)
    if compute_dtype is not None:
        model = nnx.with_attributes(model, only=(nnx.Conv, nnx.Linear), dtype=compute_dtype)
    if fast_backward:
        model = nnx.with_attributes(model, only=(Conv, Linear, GroupNorm, ResBlock), fast_backward=True)
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    return model(jnp.asarray(x_t), t, k, rngs=rngs)


def make_eps_fn(
    net: UNetConfig | nnx.GraphDef, *, compute_dtype: Any = None
) -> Callable[[nnx.State, jax.Array, jax.Array, jax.Array], jax.Array]:
    """Per-example noise prediction eps(params, x_t, t, k), deterministic.

    ``x_t``: (H, W, C), ``t`` and ``k`` scalars -> eps (H, W, C) float32.
    Compose with ``jax.vmap`` (e.g. over trajectories and over classes) and
    ``jax.jit``; GroupNorm and attention act per example, so vmapped calls equal
    a single batched ``apply``.

    The same config and dtype give the same function, so that a compiled loop keyed on it
    (the online classifier's) is reused by the next call.
    """
    return _eps_fn(net, None if compute_dtype is None else jnp.dtype(compute_dtype))


@functools.lru_cache(maxsize=16)
def _eps_fn(net, compute_dtype):
    """`make_eps_fn`, built."""
    gdef = graphdef(net) if isinstance(net, UNetConfig) else net

    def eps(params, x_t, t, k):
        t = jnp.asarray(t)
        k = jnp.asarray(k)
        if x_t.ndim != 3 or t.ndim != 0 or k.ndim != 0:
            raise ValueError(
                "eps expects one example: x_t (H, W, C), scalar t and k; got "
                f"shapes {x_t.shape}, {t.shape}, {k.shape}"
            )
        out = apply(gdef, params, x_t[None], t[None], k[None], compute_dtype=compute_dtype)
        return out[0]

    return eps


def _is_class_embedding(path) -> bool:
    return any(getattr(p, "key", None) == "class_embed" for p in path)


def count_params(params: nnx.State, *, include_class_embedding: bool = True) -> int:
    """Number of scalar parameters (works on concrete or abstract params)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return sum(
        math.prod(leaf.shape)
        for path, leaf in leaves
        if include_class_embedding or not _is_class_embedding(path)
    )
