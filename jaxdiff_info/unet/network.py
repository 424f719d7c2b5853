"""The U-Net's layers and modules in Flax NNX (Ho et al., 2020, Appendix B), and the output
preconditioning."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff_info.layers import Conv, Dropout, GroupNorm, Linear, add_bias
from jaxdiff_info.schedule import alpha_bar_at, linear_schedule
from jaxdiff_info.unet.config import TRAIN_STEPS, UNetConfig

# --- Layers --------------------------------------------------------------------------

# DDPM initialisation: variance scaling with fan_avg and a uniform distribution
# for every kernel, zero biases; the last layer of every residual branch and
# the output convolution start at zero, so the residual branches and the
# output are zero at initialisation.
_default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zero_init = nnx.initializers.zeros_init()


def _conv3x3(cin, cout, *, rngs, strides=1, kernel_init=_default_init):
    return Conv(
        cin, cout, (3, 3), strides=strides, padding="SAME",
        kernel_init=kernel_init, rngs=rngs,
    )


def _nin(cin, cout, *, rngs, kernel_init=_default_init):
    """1x1 convolution ("network in network"), a dense layer on channels."""
    return Linear(cin, cout, kernel_init=kernel_init, rngs=rngs)


def _group_norm(c, num_groups, *, rngs):
    # Statistics are always taken in float32, also under a bfloat16 compute dtype.
    return GroupNorm(c, num_groups=num_groups, epsilon=1e-6,
                     dtype=jnp.float32, rngs=rngs)


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of timesteps, (B,) -> (B, dim), float32.

    Frequencies 10000^{-i/(dim/2 - 1)}, i = 0..dim/2-1; sines then cosines.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class ResBlock(nnx.Module):
    """h = x + conv(drop(swish(GN(conv(swish(GN(x))) + W swish(temb)))))."""

    fast_backward: bool = False

    def __init__(self, cin: int, cout: int, temb_dim: int, *, dropout: float,
                 num_groups: int, rngs: nnx.Rngs):
        self.norm1 = _group_norm(cin, num_groups, rngs=rngs)
        self.conv1 = _conv3x3(cin, cout, rngs=rngs)
        self.temb_proj = nnx.Linear(temb_dim, cout, kernel_init=_default_init, rngs=rngs)
        self.norm2 = _group_norm(cout, num_groups, rngs=rngs)
        self.dropout = Dropout(dropout)
        self.conv2 = _conv3x3(cout, cout, kernel_init=_zero_init, rngs=rngs)
        self.shortcut = _nin(cin, cout, rngs=rngs) if cin != cout else None

    def __call__(self, x, temb, rngs: nnx.Rngs | None):
        """x: (B, H, W, cin), temb: (B, temb_dim) -> (B, H, W, cout)."""
        h = self.conv1(nnx.swish(self.norm1(x)))
        temb = self.temb_proj(nnx.swish(temb))
        h = add_bias(h, temb) if self.fast_backward else h + temb[:, None, None, :]
        h = nnx.swish(self.norm2(h))
        h = self.dropout(h, deterministic=rngs is None, rngs=rngs)
        h = self.conv2(h)
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, c: int, *, num_groups: int, rngs: nnx.Rngs):
        self.norm = _group_norm(c, num_groups, rngs=rngs)
        self.q = _nin(c, c, rngs=rngs)
        self.k = _nin(c, c, rngs=rngs)
        self.v = _nin(c, c, rngs=rngs)
        self.proj_out = _nin(c, c, kernel_init=_zero_init, rngs=rngs)

    def __call__(self, x):
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, H * W, C)
        k = self.k(h).reshape(B, H * W, C)
        v = self.v(h).reshape(B, H * W, C)
        logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32)
        w = jax.nn.softmax(logits * C**-0.5, axis=-1)  # float32
        h = jnp.einsum("bij,bjc->bic", w.astype(v.dtype), v).reshape(B, H, W, C)
        return x + self.proj_out(h)


class Downsample(nnx.Module):
    """3x3 convolution with stride 2: (B, H, W, C) -> (B, H/2, W/2, C).

    SAME padding as in TensorFlow: one row and column of zeros at the bottom
    and right only.
    """

    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv = _conv3x3(c, c, strides=2, rngs=rngs)

    def __call__(self, x):
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then 3x3 convolution: (B, H, W, C) -> (B, 2H, 2W, C)."""

    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.conv = _conv3x3(c, c, rngs=rngs)

    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Block(nnx.Module):
    """A residual block, followed by self-attention at attention resolutions."""

    def __init__(self, cin, cout, temb_dim, *, attn: bool, dropout, num_groups, rngs):
        self.res = ResBlock(cin, cout, temb_dim, dropout=dropout,
                            num_groups=num_groups, rngs=rngs)
        self.attn = AttnBlock(cout, num_groups=num_groups, rngs=rngs) if attn else None

    def __call__(self, x, temb, rngs):
        h = self.res(x, temb, rngs)
        return h if self.attn is None else self.attn(h)


# --- The U-Net -----------------------------------------------------------------------


class UNet(nnx.Module):
    """eps_theta(x_t, t, k): (B, H, W, C), (B,), (B,) -> (B, H, W, C)."""

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        temb_dim = 4 * c.ch
        block = functools.partial(Block, temb_dim=temb_dim, dropout=c.dropout,
                                  num_groups=c.num_groups, rngs=rngs)

        # Timestep and class embeddings.
        self.temb_dense0 = nnx.Linear(c.ch, temb_dim, kernel_init=_default_init, rngs=rngs)
        self.temb_dense1 = nnx.Linear(temb_dim, temb_dim, kernel_init=_default_init, rngs=rngs)
        self.class_embed = nnx.Embed(c.num_classes + 1, temb_dim,
                                     embedding_init=nnx.initializers.normal(1.0), rngs=rngs)

        # Downsampling path; skip_ch records the width of every skip connection.
        self.conv_in = _conv3x3(c.channels, c.ch, rngs=rngs)
        skip_ch, cur, res = [c.ch], c.ch, c.image_size
        down, downsample = [], []
        for level, mult in enumerate(c.ch_mult):
            blocks = []
            for _ in range(c.num_res_blocks):
                blocks.append(block(cur, c.ch * mult, attn=res in c.attn_resolutions))
                cur = c.ch * mult
                skip_ch.append(cur)
            down.append(nnx.List(blocks))
            if level != len(c.ch_mult) - 1:
                downsample.append(Downsample(cur, rngs=rngs))
                skip_ch.append(cur)
                res //= 2
        self.down = nnx.List(down)
        self.downsample = nnx.List(downsample)

        # Middle.
        self.mid = nnx.List([block(cur, cur, attn=True), block(cur, cur, attn=False)])

        # Upsampling path: num_res_blocks + 1 blocks per level, each consuming
        # one skip connection, concatenated on channels.
        up, upsample = [], []
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            blocks = []
            for _ in range(c.num_res_blocks + 1):
                cin = cur + skip_ch.pop()
                blocks.append(block(cin, c.ch * mult, attn=res in c.attn_resolutions))
                cur = c.ch * mult
            up.append(nnx.List(blocks))
            if level != 0:
                upsample.append(Upsample(cur, rngs=rngs))
                res *= 2
        assert not skip_ch
        self.up = nnx.List(up)
        self.upsample = nnx.List(upsample)

        # Output.
        self.norm_out = _group_norm(cur, c.num_groups, rngs=rngs)
        self.conv_out = _conv3x3(cur, c.channels, kernel_init=_zero_init, rngs=rngs)

    def embed(self, t, k):
        """Timestep plus class embedding, (B,), (B,) -> (B, 4 ch).

        Labels outside 0..num_classes give a NaN embedding (hence NaN eps)
        for that example only.
        """
        c = self.config
        temb = timestep_embedding(t, c.ch)
        temb = self.temb_dense1(nnx.swish(self.temb_dense0(temb)))
        valid = (k >= 0) & (k <= c.num_classes)
        kemb = self.class_embed(jnp.clip(k, 0, c.num_classes))
        kemb = jnp.where(valid[:, None], kemb, jnp.nan)
        return temb + kemb

    def __call__(self, x, t, k, *, rngs: nnx.Rngs | None = None):
        """x: (B, H, W, C) float, t: (B,) int, k: (B,) int -> eps (B, H, W, C) float32.

        Dropout is active iff ``rngs`` (with a ``dropout`` stream) is given.
        """
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.image_size, c.image_size, c.channels):
            raise ValueError(
                f"expected x of shape (B, {c.image_size}, {c.image_size}, "
                f"{c.channels}), got {x.shape}"
            )
        B = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (B,))
        k = jnp.broadcast_to(jnp.asarray(k), (B,))
        if not jnp.issubdtype(k.dtype, jnp.integer):
            raise TypeError(f"class labels must be integers, got {k.dtype}")

        temb = self.embed(t, k)

        hs = [self.conv_in(x)]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                hs.append(blk(hs[-1], temb, rngs))
            if level < len(self.downsample):
                hs.append(self.downsample[level](hs[-1]))

        h = hs[-1]
        for blk in self.mid:
            h = blk(h, temb, rngs)

        for i, blocks in enumerate(self.up):
            for blk in blocks:
                skip = hs.pop()
                h = blk(jnp.concatenate([h, skip.astype(h.dtype)], axis=-1), temb, rngs)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        assert not hs

        h = self.conv_out(nnx.swish(self.norm_out(h))).astype(jnp.float32)
        if c.sigma_data is None:
            return h
        c_skip, c_out = preconditioning(t, c.sigma_data)
        return c_skip * x.astype(jnp.float32) + c_out * h


def preconditioning(t: jax.Array, sigma_data: float) -> tuple[jax.Array, jax.Array]:
    """(c_skip, c_out) at timesteps t (B,) of the DDPM linear schedule, shaped (B, 1, 1, 1).

    With x_t = sqrt(abar_t) x_0 + sigma_t eps and x_0 of mean 0 and standard deviation
    ``sigma_data`` per pixel, c_skip x_t is the best linear prediction of eps from x_t and
    c_out the standard deviation of what it leaves:

        c_skip = sigma_t / (abar_t sigma_data^2 + sigma_t^2)
        c_out  = sqrt(abar_t) sigma_data / sqrt(abar_t sigma_data^2 + sigma_t^2)

    (Karras et al. 2022's preconditioning, written for eps on the variance-preserving
    process.) The network's raw output F then has unit scale at every t: nearly eps at small
    t, nearly -x_0 / sigma_data at large t, where a class shows as a per-image colour that
    eps-prediction alone leaves to tiny corrections of eps.
    """
    abar = alpha_bar_at(linear_schedule(TRAIN_STEPS), jnp.asarray(t))[:, None, None, None]
    s2, v = abar * sigma_data**2, 1.0 - abar
    return jnp.sqrt(v) / (s2 + v), jnp.sqrt(s2 / (s2 + v))
