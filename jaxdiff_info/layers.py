"""Flax layers with the parameters of flax's own and a faster backward pass on XLA:CPU.

Reverse-mode autodiff turns every broadcast of the forward pass (a bias over the pixels, the
timestep embedding over the pixels, GroupNorm's statistics over a group) into a sum over the
pixels. XLA:CPU runs such a sum over the leading axes of an NHWC array as a single-threaded,
strided loop; written as a product with a vector of ones it is a matrix-vector product,
vectorised and on every core (4x faster on the 8x32x32x256 activations of ddpm,
benchmarks/README.md). The layers below compute the same values as their flax counterparts
(to float32 round-off, the sums being taken in another order) and do so only when
``fast_backward`` is set (``apply(..., fast_backward=True)``, as the training objective
does); their gradients are custom reverse-mode rules, so forward-mode autodiff (jax.jvp)
does not go through them.

``Dropout`` (used with or without ``fast_backward``) draws its mask from 16 random bits per
element instead of jax.random.bernoulli's 32 (``dropout_mask``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


# The sums are products at full float32 precision: at XLA's default precision, GPUs from
# NVIDIA Ampere on would round g to TF32 (a 10-bit mantissa) before summing, and GroupNorm's
# one-pass variance E[x^2] - E[x]^2 would lose its digits. On the CPU it changes nothing.
SUM_PRECISION = jax.lax.Precision.HIGHEST


def _sum_rows(g: jax.Array) -> jax.Array:
    """(..., C) -> (C,): the sum over every leading axis, as ones @ g, accumulated in float32."""
    g2 = g.reshape(-1, g.shape[-1])
    return jnp.dot(jnp.ones((g2.shape[0],), g.dtype), g2, precision=SUM_PRECISION,
                   preferred_element_type=jnp.float32)


def _sum_pixels(g: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C): the sum over the pixels of each example, a batched ones @ g."""
    B, C = g.shape[0], g.shape[-1]
    g3 = g.reshape(B, -1, C)
    ones = jnp.ones((B, 1, g3.shape[1]), g.dtype)
    out = jax.lax.dot_general(ones, g3, (((2,), (1,)), ((0,), (0,))), precision=SUM_PRECISION,
                              preferred_element_type=jnp.float32)
    return out[:, 0]


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y + bias: bias (C,) over every leading axis of y (..., C), or (B, C) over the pixels of
    y (B, H, W, C), each example its own."""
    return y + _expand_bias(y, bias)


def _expand_bias(y, bias):
    return bias if bias.ndim == 1 else bias.reshape(bias.shape[:1] + (1,) * (y.ndim - 2) + bias.shape[1:])


def add_bias_fwd(y, bias):
    return add_bias(y, bias), bias


def add_bias_bwd(bias, g):
    db = _sum_rows(g) if bias.ndim == 1 else _sum_pixels(g)
    return g, db.astype(bias.dtype)


add_bias.defvjp(add_bias_fwd, add_bias_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm_fn(x, scale, bias, num_groups: int, epsilon: float):
    """GroupNorm of x (B, H, W, C) (float32) with per-channel scale and bias, as flax's
    (one-pass variance E[x^2] - E[x]^2, clipped at 0), its sums as matrix products."""
    return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_stats(x, num_groups):
    """Per-example, per-channel mean and 1/std of the channel's group, each (B, C)."""
    B, C = x.shape[0], x.shape[-1]
    n = x.size // (B * num_groups)
    s = jnp.stack([_sum_pixels(x), _sum_pixels(jnp.square(x))])  # (2, B, C)
    s = jnp.sum(s.reshape(2, B, num_groups, C // num_groups), axis=-1) / n  # (2, B, G)
    mean, mean2 = s[0], s[1]
    var = jnp.maximum(0.0, mean2 - jnp.square(mean))
    return jnp.repeat(mean, C // num_groups, axis=1), jnp.repeat(var, C // num_groups, axis=1)


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
    mean, var = _group_stats(x, num_groups)
    rstd = jax.lax.rsqrt(var + epsilon)
    mean4, rstd4 = mean[:, None, None, :], rstd[:, None, None, :]
    y = (x - mean4) * (rstd4 * scale) + bias
    return y, (x, mean, rstd, scale)


def _group_norm_bwd(num_groups, epsilon, res, dy):
    """x_hat = (x - mean) rstd, y = x_hat scale + bias. With per-channel sums over the pixels
    S1 = sum dy and S2 = sum dy x_hat: dbias = sum_b S1, dscale = sum_b S2, and
    dx = rstd (scale dy - m1 - x_hat m2), m1, m2 the group means of scale S1, scale S2."""
    x, mean, rstd, scale = res
    B, C = x.shape[0], x.shape[-1]
    n = x.size // (B * num_groups)
    mean4, rstd4 = mean[:, None, None, :], rstd[:, None, None, :]
    x_hat = (x - mean4) * rstd4
    s = jnp.stack([_sum_pixels(dy), _sum_pixels(dy * x_hat)])  # (2, B, C)
    m = jnp.sum((s * scale).reshape(2, B, num_groups, C // num_groups), axis=-1) / n
    m = jnp.repeat(m, C // num_groups, axis=2)[:, :, None, None, :]  # (2, B, 1, 1, C)
    dx = rstd4 * (scale * dy - m[0] - x_hat * m[1])
    return dx, jnp.sum(s[1], axis=0), jnp.sum(s[0], axis=0)


_group_norm_fn.defvjp(_group_norm_fwd, _group_norm_bwd)


class Conv(nnx.Conv):
    """``nnx.Conv`` (same parameters); with ``fast_backward`` set, a 2-d NHWC convolution
    whose bias gradient is a matrix product (``add_bias``)."""

    fast_backward: bool = False

    def __call__(self, inputs):
        if not self.fast_backward:
            return super().__call__(inputs)
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        y = jax.lax.conv_general_dilated(x, kernel, strides, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=self.precision)
        return add_bias(y, bias)


class Linear(nnx.Linear):
    """``nnx.Linear`` (same parameters); with ``fast_backward`` set, its bias gradient is a
    matrix product (``add_bias``)."""

    fast_backward: bool = False

    def __call__(self, inputs):
        if not self.fast_backward:
            return super().__call__(inputs)
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]), dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        return add_bias(y, bias)


class GroupNorm(nnx.GroupNorm):
    """``nnx.GroupNorm`` over (H, W, channels of a group) (same parameters); with
    ``fast_backward`` set, ``_group_norm_fn``."""

    fast_backward: bool = False

    def __call__(self, x):
        if not self.fast_backward:
            return super().__call__(x)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return _group_norm_fn(x, scale, bias, self.num_groups, self.epsilon)


DROPOUT_BITS = 16  # random bits per element of a dropout mask


def dropout_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> tuple[jax.Array, float]:
    """A keep mask of ``shape`` and the probability of keeping, from 16 random bits per element.

    Each element is kept iff its 16-bit uniform integer u satisfies u >= round(rate * 2^16),
    so that the keep probability is 1 - round(rate * 2^16) / 2^16 (rate 0.1: 0.8999939). The
    bits are drawn as 32-bit words along the last axis, two elements per word: half the draw
    of ``jax.random.bernoulli``, which XLA:CPU runs on one core (benchmarks/README.md).
    """
    threshold = round(rate * 2 ** DROPOUT_BITS)
    *lead, C = shape
    words = jax.random.bits(key, (*lead, (C + 1) // 2), jnp.uint32)
    u = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(*lead, 2 * ((C + 1) // 2))[..., :C]
    return u >= threshold, 1.0 - threshold / 2 ** DROPOUT_BITS


class Dropout(nnx.Dropout):
    """``nnx.Dropout`` (no broadcast dimensions) with ``dropout_mask``: x / p where kept, 0
    elsewhere, p the mask's keep probability, so that E[output] = x exactly."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs: nnx.Rngs | jax.Array | None = None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.broadcast_dims:
            raise ValueError("layers.Dropout has no broadcast_dims; use nnx.Dropout")
        if rngs is None:
            raise ValueError("dropout is on but no rngs were given")
        key = rngs if isinstance(rngs, jax.Array) else rngs[self.rng_collection]()
        keep, p = dropout_mask(key, inputs.shape, self.rate)
        return jnp.where(keep, inputs * jnp.asarray(1.0 / p, inputs.dtype), jnp.zeros_like(inputs))
