"""jaxdiff_info.layers: the U-Net with fast_backward computes the same function and the same
gradients as with flax's own layers (to float32 round-off), with dropout and bf16 included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff_info import layers, unet

NET = unet.UNetConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.1,
                      num_classes=3, image_size=8, channels=3, num_groups=4)


def loss(params, fast, key, compute_dtype=None):
    kx, kt, kk, kd = jax.random.split(key, 4)
    x = jax.random.normal(kx, (4, 8, 8, 3))
    t = jax.random.randint(kt, (4,), 0, 1000)
    k = jax.random.randint(kk, (4,), 0, 4)
    out = unet.apply(NET, params, x, t, k, dropout_key=kd, compute_dtype=compute_dtype, fast_backward=fast)
    return jnp.mean((out - x) ** 2)


@pytest.mark.parametrize("compute_dtype, tol", [(None, 1e-5),
                                                (pytest.param(jnp.bfloat16, 5e-2, marks=pytest.mark.slow))])
def test_fast_backward_gives_the_same_loss_and_gradients(compute_dtype, tol):
    params = unet.init_params(NET, jax.random.key(0))
    # non-trivial biases and GroupNorm scales (the initial ones are 0 and 1)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    key = jax.random.key(1)
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=(1, 3))
    (l0, g0), (l1, g1) = (value_and_grad(params, fast, key, compute_dtype) for fast in (False, True))
    np.testing.assert_allclose(l1, l0, rtol=tol)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g0))
    worst = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)))
    assert worst < tol * scale, (worst, scale)
    # the gradients are not trivially equal: another key's differ
    g2 = value_and_grad(params, True, jax.random.key(2), compute_dtype)[1]
    assert max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g2))) > 10 * worst


def reference_group_norm(x, scale, bias, groups, eps):
    """GroupNorm written out: statistics over (H, W, the channels of a group), two-pass variance."""
    B, H, W, C = x.shape
    xg = x.reshape(B, H, W, groups, C // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_and_its_gradient_match_the_formula():
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8)) * 3 + 1
    scale, bias = jnp.linspace(0.5, 1.5, 8), jnp.linspace(-1, 1, 8)
    np.testing.assert_allclose(layers._group_norm_fn(x, scale, bias, 4, 1e-6),
                               reference_group_norm(x, scale, bias, 4, 1e-6), atol=2e-5)
    w = jax.random.normal(jax.random.key(1), x.shape)
    ours = jax.grad(lambda *a: jnp.sum(w * layers._group_norm_fn(*a, 4, 1e-6)), (0, 1, 2))(x, scale, bias)
    theirs = jax.grad(lambda *a: jnp.sum(w * reference_group_norm(*a, 4, 1e-6)), (0, 1, 2))(x, scale, bias)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-4)


def dot_precisions(closed):
    """The precision of every dot_general in a jaxpr, sub-jaxprs (custom rules, scans) included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)

    walk(closed.jaxpr)
    return found


def test_the_sums_ask_for_full_float32_precision():
    """GroupNorm's statistics and the backward's sums over pixels are products with a vector of
    ones: they ask for HIGHEST precision, so that a GPU does not take them in TF32 (10-bit
    mantissas; the CPU computes float32 either way)."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
    w = jax.random.normal(jax.random.key(1), x.shape)
    scale, bias = jnp.ones(8), jnp.zeros(8)
    jaxprs = [
        jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(w * layers._group_norm_fn(*a, 4, 1e-6)), (0, 1, 2)))(x, scale, bias),
        jax.make_jaxpr(jax.grad(lambda y, b: jnp.sum(w * layers.add_bias(y, b)), (0, 1)))(x, bias),
        jax.make_jaxpr(jax.grad(lambda y, b: jnp.sum(w * layers.add_bias(y, b)), (0, 1)))(x, jnp.ones((2, 8))),
    ]
    for closed in jaxprs:
        precisions = dot_precisions(closed)
        assert precisions, closed
        assert all(p is not None and set(p) == {jax.lax.Precision.HIGHEST} for p in precisions), precisions


def test_add_bias_gradient_is_the_sum_over_pixels():
    y = jax.random.normal(jax.random.key(0), (3, 4, 4, 5))
    w = jax.random.normal(jax.random.key(1), y.shape)
    for bias in (jnp.ones(5), jnp.ones((3, 5))):  # one bias, or one per example
        gy, gb = jax.grad(lambda y, b: jnp.sum(w * layers.add_bias(y, b)), (0, 1))(y, bias)
        np.testing.assert_allclose(gy, w)
        np.testing.assert_allclose(gb, w.sum(axis=(0, 1, 2)) if bias.ndim == 1 else w.sum(axis=(1, 2)), atol=1e-5)


def test_dropout_mask_keeps_at_its_stated_rate_and_is_unbiased():
    key = jax.random.key(3, impl="rbg")
    for shape in ((64, 16, 16, 32), (4096, 7)):  # an even and an odd last axis
        keep, p = layers.dropout_mask(key, shape, 0.1)
        assert keep.shape == shape and keep.dtype == jnp.bool_
        assert p == 1 - 6554 / 65536
        n = keep.size
        frac = float(jnp.mean(keep))
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / n), (frac, p)  # 5 binomial sd
        # independent along the last axis (the two halves of each 32-bit word): the fraction
        # of pairs with both kept is p^2
        both = float(jnp.mean(keep[..., 0:shape[-1] - 1:2] & keep[..., 1::2]))
        m = keep[..., 1::2].size
        assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / m), (both, p * p)
    x = jnp.ones((256, 8, 8, 16))
    drop = layers.Dropout(0.1)
    out = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=key))
    kept = out != 0
    np.testing.assert_allclose(out[kept], 1 / p, rtol=1e-6)
    assert abs(float(out.mean()) - 1.0) < 5 * np.sqrt((1 - p) / p / x.size)  # E[out] = x
    assert drop(x, deterministic=True) is x and layers.Dropout(0.0)(x, deterministic=False) is x
    # another key, another mask; the same key, the same mask
    k2 = jax.random.key(4, impl="rbg")
    assert bool(jnp.any(layers.dropout_mask(k2, x.shape, 0.1)[0] != layers.dropout_mask(key, x.shape, 0.1)[0]))
    np.testing.assert_array_equal(layers.dropout_mask(key, x.shape, 0.1)[0], layers.dropout_mask(key, x.shape, 0.1)[0])
