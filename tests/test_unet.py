"""Tests of the class-conditional DDPM U-Net (jaxdiff_info.unet)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdiff_info import mixture, unet
from jaxdiff_info.schedule import alpha_bar_at, linear_schedule

# A network of the full form (down path, middle, up path, attention in all
# three) that compiles quickly: 16x16 images, resolutions 16 and 8, attention at 8.
SMALL = unet.UNetConfig(
    ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
    dropout=0.1, num_classes=10, image_size=16, channels=3, num_groups=4,
)

# The smallest network: a single resolution (no resampling), attention included.
MINI = unet.UNetConfig(
    ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
    dropout=0.1, num_classes=3, image_size=8, channels=3, num_groups=4,
)


# XLA on the CPU compiles the (default, partitionable) threefry generator
# slowly; keys of the "rbg" implementation keep the compile times of the tests
# with random draws inside the network short.
def rbg_key(seed):
    return jax.random.key(seed, impl="rbg")


_apply = jax.jit(unet.apply, static_argnums=0, static_argnames=("compute_dtype",))


def _loss(params, x, t, k, key):
    """Training loss ||eps_theta - x||^2 with dropout; returns (loss, eps)."""
    eps = unet.apply(SMALL, params, x, t, k, dropout_key=key)
    return jnp.mean((eps - x) ** 2), eps


_loss_and_grad = jax.jit(jax.value_and_grad(_loss, has_aux=True))


def random_params(config, seed):
    """Parameters with every entry random (no zero-initialised layers).

    Kernels ~ N(0, 1/fan_in), vectors ~ N(0, 1/4); drawn with numpy.
    """
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1 / math.sqrt(math.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.5
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), jnp.float32)

    return jax.tree.map(draw, unet.abstract_params(config))


@pytest.fixture(scope="module")
def params():
    return random_params(SMALL, 0)


def inputs(config, batch, seed=1):
    """x (B, H, W, C) ~ N(0, 1), t in 1..1000, k in 0..num_classes."""
    rng = np.random.default_rng(seed)
    s, c = config.image_size, config.channels
    x = jnp.asarray(rng.standard_normal((batch, s, s, c)), jnp.float32)
    t = jnp.asarray(rng.integers(1, 1001, batch), jnp.int32)
    k = jnp.asarray(rng.integers(0, config.num_classes + 1, batch), jnp.int32)
    return x, t, k


# ----------------------------------------------------------------------------
# Configs and parameter counts
# ----------------------------------------------------------------------------


def ddpm_count_by_hand(ch=128, temb=512):
    """Parameter count of Ho et al.'s CIFAR-10 model, layer by layer.

    Widths 128, 256, 256, 256 at resolutions 32, 16, 8, 4; attention at 16.
    """
    conv = lambda ci, co, ks=3: ks * ks * ci * co + co
    gn = lambda c: 2 * c

    def res(ci, co):
        return (gn(ci) + conv(ci, co) + (temb * co + co) + gn(co) + conv(co, co)
                + (conv(ci, co, 1) if ci != co else 0))

    def attn(c):
        return gn(c) + 4 * conv(c, c, 1)

    n = (ch * temb + temb) + (temb * temb + temb)          # timestep MLP
    n += conv(3, 128)                                      # conv_in
    # Down path; skips (widths): 128 | 128 128 | 128 | 256 256 | 256 | 256 256 | 256 | 256 256
    n += 2 * res(128, 128) + conv(128, 128)                # 32x32
    n += res(128, 256) + res(256, 256) + 2 * attn(256) + conv(256, 256)  # 16x16
    n += 2 * res(256, 256) + conv(256, 256)                # 8x8
    n += 2 * res(256, 256)                                 # 4x4
    n += 2 * res(256, 256) + attn(256)                     # middle
    # Up path: each block consumes one skip (popped from the end).
    n += 3 * res(512, 256) + conv(256, 256)                # 4x4
    n += 3 * res(512, 256) + conv(256, 256)                # 8x8
    n += 2 * res(512, 256) + res(384, 256) + 3 * attn(256) + conv(256, 256)  # 16x16
    n += res(384, 128) + 2 * res(256, 128)                 # 32x32 (input upsampled at width 256)
    n += gn(128) + conv(128, 3)                            # output
    return n


def test_ddpm_parameter_count_matches_ho_et_al():
    config = unet.get_config("ddpm")
    abstract = unet.abstract_params(config)       # shapes only, via nnx.eval_shape
    n = unet.count_params(abstract, include_class_embedding=False)
    assert ddpm_count_by_hand() == 35_746_307
    assert n == 35_746_307
    assert round(n / 1e6, 1) == 35.7
    # The class embedding adds (num_classes + 1) x 4ch.
    assert unet.count_params(abstract) == n + 11 * 512


def test_tiny_config_counts_and_class_embedding_shape():
    config = unet.get_config("tiny")
    abstract = unet.abstract_params(config)
    assert abstract["class_embed"]["embedding"].shape == (config.num_classes + 1, 4 * config.ch)
    n_all = unet.count_params(abstract)
    n_net = unet.count_params(abstract, include_class_embedding=False)
    assert n_all - n_net == (config.num_classes + 1) * 4 * config.ch
    assert n_net < 1_000_000


def test_get_config():
    assert unet.get_config("ddpm") is unet.CONFIGS["ddpm"]
    assert unet.get_config("ddpm").ch_mult == (1, 2, 2, 2)
    with pytest.raises(ValueError) as err:
        unet.get_config("x")
    assert str(err.value) == "unknown model config 'x'; choose one of: ddpm, tiny"


def test_config_validation_and_hashability():
    with pytest.raises(ValueError, match="num_groups"):
        unet.UNetConfig(ch=12, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                        dropout=0.0, num_classes=2, num_groups=8)
    a = unet.UNetConfig(16, [1, 2], 1, [8], 0.1, 10, 16, 3, 4)
    assert a == SMALL and hash(a) == hash(SMALL)


def test_timestep_embedding():
    emb = unet.timestep_embedding(jnp.array([0, 1, 1000]), 8)
    assert emb.shape == (3, 8) and emb.dtype == jnp.float32
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    freqs = 10000.0 ** (-np.arange(4) / 3)
    np.testing.assert_allclose(emb[1], np.concatenate([np.sin(freqs), np.cos(freqs)]), rtol=1e-6)
    np.testing.assert_allclose(emb[2, 3], np.sin(1000 * 1e-4), rtol=1e-5)


# ----------------------------------------------------------------------------
# Blocks against direct numpy transcriptions of their definitions
# ----------------------------------------------------------------------------


def randomised(make_module, seed):
    """The module with all its parameters drawn at random (with numpy)."""
    graph, state = nnx.split(nnx.eval_shape(make_module), nnx.Param)
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32), state)
    return nnx.merge(graph, state)


def np_group_norm(x, gn, groups):
    B, H, W, C = x.shape
    g = x.reshape(B, H, W, groups, C // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = g.var(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / np.sqrt(var + 1e-6)
    return g.reshape(x.shape) * np.asarray(gn.scale[...]) + np.asarray(gn.bias[...])


def np_conv3x3(x, conv):
    W, b = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
    H, Wd = x.shape[1:3]
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + H, j:j + Wd], W[i, j])
               for i in range(3) for j in range(3)) + b


def np_dense(x, lin):
    return x @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])


def np_swish(x):
    return x / (1 + np.exp(-x))


def test_attention_block_matches_definition():
    block = randomised(lambda: unet.AttnBlock(8, num_groups=2, rngs=nnx.Rngs(0)), 1)
    x = np.random.default_rng(2).standard_normal((2, 4, 4, 8)).astype(np.float32)
    h = np_group_norm(x, block.norm, 2)
    q, k, v = (np_dense(h, lin).reshape(2, 16, 8) for lin in (block.q, block.k, block.v))
    logits = np.einsum("bic,bjc->bij", q, k) / np.sqrt(8)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)                     # softmax over the H*W key positions
    expected = x + np_dense(np.einsum("bij,bjc->bic", w, v).reshape(x.shape), block.proj_out)
    np.testing.assert_allclose(jax.jit(block)(x), expected, atol=2e-5, rtol=1e-4)


def test_residual_block_matches_definition():
    block = randomised(
        lambda: unet.ResBlock(4, 8, 12, dropout=0.1, num_groups=2, rngs=nnx.Rngs(0)), 3)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    temb = rng.standard_normal((2, 12)).astype(np.float32)
    h = np_conv3x3(np_swish(np_group_norm(x, block.norm1, 2)), block.conv1)
    h = h + np_dense(np_swish(temb), block.temb_proj)[:, None, None, :]
    h = np_conv3x3(np_swish(np_group_norm(h, block.norm2, 2)), block.conv2)
    expected = np_dense(x, block.shortcut) + h
    out = jax.jit(lambda x, temb: block(x, temb, None))(x, temb)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


def test_resampling():
    up = randomised(lambda: unet.Upsample(2, rngs=nnx.Rngs(0)), 5)
    x = np.random.default_rng(6).standard_normal((1, 3, 3, 2)).astype(np.float32)
    nearest = x.repeat(2, axis=1).repeat(2, axis=2)
    np.testing.assert_allclose(jax.jit(up)(x), np_conv3x3(nearest, up.conv), atol=1e-5)
    down = randomised(lambda: unet.Downsample(2, rngs=nnx.Rngs(0)), 7)
    x = np.random.default_rng(8).standard_normal((1, 6, 6, 2)).astype(np.float32)
    # Stride 2 with SAME padding as in TensorFlow (one row/column of zeros at the
    # bottom/right only): output pixel (i, j) is centred on input (2i+1, 2j+1).
    full = np_conv3x3(x, down.conv)
    np.testing.assert_allclose(jax.jit(down)(x), full[:, 1::2, 1::2], atol=1e-5)


# ----------------------------------------------------------------------------
# Forward pass
# ----------------------------------------------------------------------------


def test_full_size_configs_trace_to_the_right_shape():
    for name in ("ddpm", "tiny"):
        config = unet.get_config(name)
        x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
        lab = jax.ShapeDtypeStruct((2,), jnp.int32)
        out = jax.eval_shape(functools.partial(unet.apply, config), unet.abstract_params(config),
                             x, lab, lab)
        assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32


def test_init_params_ddpm_style():
    init = unet.init_params(MINI, rbg_key(3))
    assert jax.tree.structure(init) == jax.tree.structure(unet.abstract_params(MINI))
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(init))
    # The last layer of every residual branch and the output convolution start
    # at zero, so eps is exactly 0 at initialisation ...
    assert not np.any(init["conv_out"]["kernel"])
    assert not np.any(init["mid"][0]["res"]["conv2"]["kernel"])
    assert not np.any(init["mid"][0]["attn"]["proj_out"]["kernel"])
    x, t, k = inputs(MINI, 4)
    eps = _apply(MINI, init, x, t, k)
    assert eps.shape == x.shape and not np.any(eps)
    # ... while the other kernels and the class embedding are random.
    assert np.std(init["conv_in"]["kernel"]) > 0.05
    assert np.std(init["class_embed"]["embedding"]) > 0.5
    other = unet.init_params(MINI, rbg_key(4))
    assert not np.allclose(init["conv_in"]["kernel"], other["conv_in"]["kernel"])


def test_output_shape_dtype_and_determinism(params):
    x, t, k = inputs(SMALL, 4)
    eps = _apply(SMALL, params, x, t, k)
    assert eps.shape == x.shape and eps.dtype == jnp.float32
    assert np.all(np.isfinite(eps)) and np.std(eps) > 1e-2
    np.testing.assert_array_equal(eps, _apply(SMALL, params, x, t, k))
    # Depends on the input and on the timestep.
    assert not np.allclose(eps, _apply(SMALL, params, x + 0.1, t, k), atol=1e-4)
    assert not np.allclose(eps, _apply(SMALL, params, x, t + 100, k), atol=1e-4)


def test_examples_are_independent(params):
    """GroupNorm and attention act per example: a batch is a stack of singletons."""
    x, t, k = inputs(SMALL, 4)
    eps = _apply(SMALL, params, x, t, k)
    x2 = x.at[0].set(-x[0])
    eps2 = _apply(SMALL, params, x2, t, k)
    np.testing.assert_allclose(eps2[1:], eps[1:], atol=1e-6)
    assert not np.allclose(eps2[0], eps[0], atol=1e-4)


def test_dropout_only_with_a_key(params):
    x, t, k = inputs(SMALL, 4)
    det = _apply(SMALL, params, x, t, k)
    train_eps = lambda seed: _loss_and_grad(params, x, t, k, rbg_key(seed))[0][1]
    d1, d1b, d2 = train_eps(7), train_eps(7), train_eps(8)
    np.testing.assert_array_equal(d1, d1b)
    assert not np.allclose(d1, det, atol=1e-4)
    assert not np.allclose(d1, d2, atol=1e-4)


# ----------------------------------------------------------------------------
# Class conditioning
# ----------------------------------------------------------------------------


def test_class_label_changes_output(params):
    x, t, _ = inputs(SMALL, 4)
    outs = [_apply(SMALL, params, x, t, jnp.full((4,), c, jnp.int32)) for c in (0, 1, SMALL.num_classes)]
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert not np.allclose(outs[a], outs[b], atol=1e-4)
    assert all(np.all(np.isfinite(o)) for o in outs)   # the null label is a valid input


def test_class_embedding_row_acts_only_on_its_label(params):
    x, t, _ = inputs(SMALL, 4)
    k = jnp.array([0, 3, 3, SMALL.num_classes])
    base = np.asarray(_apply(SMALL, params, x, t, k))
    perturbed = jax.tree_util.tree_map_with_path(
        lambda path, a: a.at[3].add(1.0) if "class_embed" in jax.tree_util.keystr(path) else a,
        params)
    out = np.asarray(_apply(SMALL, perturbed, x, t, k))
    np.testing.assert_array_equal(out[[0, 3]], base[[0, 3]])
    assert not np.allclose(out[1:3], base[1:3], atol=1e-4)


def test_out_of_range_labels_give_nan_for_that_example_only(params):
    x, t, _ = inputs(SMALL, 4)
    k = jnp.array([2, SMALL.num_classes + 1, -1, SMALL.num_classes])
    out = np.asarray(_apply(SMALL, params, x, t, k))
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(out[2]))
    ref = np.asarray(_apply(SMALL, params, x, t, jnp.array([2, 0, 0, SMALL.num_classes])))
    np.testing.assert_allclose(out[[0, 3]], ref[[0, 3]], atol=1e-6)


def test_float_labels_are_rejected(params):
    x, t, _ = inputs(SMALL, 1)
    with pytest.raises(TypeError, match="integers"):
        unet.apply(SMALL, params, x, t, jnp.zeros((1,)))


# ----------------------------------------------------------------------------
# Per-example function, vmap, jit, grad
# ----------------------------------------------------------------------------


def test_nested_vmap_of_eps_equals_one_batched_call(params):
    B, K = 2, 2
    x, t, _ = inputs(SMALL, B, seed=5)
    ks = jnp.array([3, SMALL.null_class], jnp.int32)
    eps = unet.make_eps_fn(unet.graphdef(SMALL))       # the graphdef serves as well as the config
    over_classes = jax.vmap(eps, in_axes=(None, None, None, 0))
    over_both = jax.jit(jax.vmap(over_classes, in_axes=(None, 0, 0, None)))
    nested = over_both(params, x, t, ks)                       # (B, K, H, W, C)
    assert nested.shape == (B, K) + x.shape[1:]

    flat = _apply(SMALL, params, jnp.repeat(x, K, axis=0), jnp.repeat(t, K), jnp.tile(ks, B))
    np.testing.assert_allclose(nested.reshape(flat.shape), flat, atol=1e-5, rtol=1e-5)
    # Different classes of the same trajectory differ.
    assert not np.allclose(nested[:, 0], nested[:, 1], atol=1e-4)

    with pytest.raises(ValueError, match="one example"):
        eps(params, x, t, ks[:B])


def test_jit_grad_is_finite_and_reaches_every_parameter(params):
    x, t, _ = inputs(SMALL, 4)
    k = jnp.arange(4, dtype=jnp.int32)
    key = rbg_key(0)
    loss = lambda p: _loss_and_grad(p, x, t, k, key)[0][0]
    (value, _), grads = _loss_and_grad(params, x, t, k, key)
    assert np.isfinite(value)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(g)), name
        assert np.any(g != 0), name
    # Only the embedding rows of the labels present receive a gradient.
    g_emb = grads["class_embed"]["embedding"]
    assert np.all(np.any(g_emb[:4] != 0, axis=1))
    assert not np.any(g_emb[4:])

    # The gradient agrees with a central difference along a random direction
    # (same dropout mask on both sides).
    direction = random_params(SMALL, 11)
    h = 1e-2
    shifted = lambda s: jax.tree.map(lambda p, d: np.asarray(p) + s * np.asarray(d), params, direction)
    fd = (loss(shifted(h)) - loss(shifted(-h))) / (2 * h)
    analytic = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(fd, analytic, rtol=2e-2)


def test_bfloat16_compute():
    params = random_params(MINI, 2)
    x, t, k = inputs(MINI, 4)
    ref = _apply(MINI, params, x, t, k)
    low = _apply(MINI, params, x, t, k, compute_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32
    err = np.linalg.norm(low - ref) / np.linalg.norm(ref)
    assert 0 < err < 5e-2            # computed in bfloat16, and close to float32


# ----------------------------------------------------------------------------
# The preconditioned output (UNetConfig.sigma_data)
# ----------------------------------------------------------------------------


def test_preconditioned_network_starts_at_the_exact_eps_of_gaussian_data():
    """F = 0 at initialisation, so eps = c_skip x_t: the exact eps of data N(0, sigma_data^2 I),
    here computed as a one-component mixture."""
    config = dataclasses.replace(MINI, sigma_data=0.5)
    init = unet.init_params(config, rbg_key(3))
    x, t, k = inputs(config, 4)
    eps = _apply(config, init, x, t, k)
    gaussian = mixture.make_mixture(np.zeros((1, x[0].size)), [0.5])
    schedule = linear_schedule(1000)
    expected = jax.vmap(lambda x, t: mixture.eps(gaussian, x.ravel(), alpha_bar_at(schedule, t), 0))(x, t)
    np.testing.assert_allclose(eps.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)


def test_preconditioned_output_is_the_raw_output_scaled_by_c_out(params):
    """The same parameters with and without sigma_data: eps - c_skip x_t = c_out F."""
    config = dataclasses.replace(SMALL, sigma_data=0.7)
    x, t, k = inputs(SMALL, 4)
    raw = _apply(SMALL, params, x, t, k)
    c_skip, c_out = unet.preconditioning(t, 0.7)
    np.testing.assert_allclose(_apply(config, params, x, t, k), c_skip * x + c_out * raw, rtol=1e-5, atol=1e-6)
    # c_out is the standard deviation of eps given the best linear prediction: at small t
    # nearly 1 (F is eps), at large t nearly sqrt(abar) sigma_data (F is about -x_0 / sigma_data).
    abar = alpha_bar_at(linear_schedule(1000), t)
    np.testing.assert_allclose(c_out.ravel() ** 2, 1 - (1 - abar) / (abar * 0.49 + 1 - abar), rtol=1e-4)
