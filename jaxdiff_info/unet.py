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

Layout is NHWC throughout.  Labels outside 0..num_classes give NaN output for
the examples that carry them (an error cannot be raised under ``jit``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff_info.layers import Conv, Dropout, GroupNorm, Linear, add_bias
from jaxdiff_info.schedule import alpha_bar_at, linear_schedule

__all__ = [
    "UNetConfig", "CONFIGS", "get_config", "UNet", "graphdef", "abstract_params", "init_params",
    "apply", "make_eps_fn", "count_params", "timestep_embedding", "preconditioning",
]

# T of the DDPM linear schedule the networks are trained on; a preconditioned network
# (``UNetConfig.sigma_data``) reads alpha_bar_t from it.
TRAIN_STEPS = 1000


# --- Configuration -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net.

    Attributes:
      ch: base channel width; the timestep embedding has width ``4 * ch``.
      ch_mult: channel multiplier per resolution level, from the input
        resolution downwards.
      num_res_blocks: residual blocks per level on the downsampling path (the
        upsampling path has one more).
      attn_resolutions: feature-map sizes at which self-attention follows
        each residual block.
      dropout: dropout rate inside the residual blocks (training only).
      num_classes: number of class labels; label ``num_classes`` is the null
        label.
      image_size: height and width of the (square) input.
      channels: number of image channels.
      num_groups: GroupNorm groups.
      sigma_data: None: the network's output is eps, as in Ho et al. A number: the output
        is preconditioned for data of this standard deviation per pixel,
        eps = c_skip(t) x_t + c_out(t) F(x_t, t, k) (``preconditioning``), so that the
        network learns the large-t part of the task (the image's colours, hence the
        class) as fast as the small-t part; the training loss is the same eps-MSE.
    """

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    dropout: float
    num_classes: int
    image_size: int = 32
    channels: int = 3
    num_groups: int = 32
    sigma_data: float | None = None

    def __post_init__(self):
        # Normalise sequences to tuples so that configs are hashable.
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(
            self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions)
        )
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by "
                f"2**{len(self.ch_mult) - 1}"
            )
        for width in {self.ch} | {self.ch * m for m in self.ch_mult}:
            if width % self.num_groups:
                raise ValueError(
                    f"channel width {width} is not divisible by "
                    f"num_groups={self.num_groups}"
                )

    @property
    def null_class(self) -> int:
        """Index of the null (unconditional) label."""
        return self.num_classes


CONFIGS: dict[str, UNetConfig] = {
    # Ho et al. (2020), CIFAR-10: 35.7M parameters without the class embedding.
    "ddpm": UNetConfig(
        ch=128,
        ch_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.1,
        num_classes=10,
    ),
    # A small network of the same form for CPU demos and tests, preconditioned
    # (sigma_data) and without dropout so that it learns the classes of the shapes
    # dataset within minutes on two CPU cores.
    "tiny": UNetConfig(
        ch=16,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        dropout=0.0,
        num_classes=10,
        num_groups=8,
        sigma_data=0.5,
    ),
}


def get_config(name: str) -> UNetConfig:
    """The named config of ``CONFIGS``."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; choose one of: {', '.join(CONFIGS)}"
        ) from None


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


# --- Functional interface ------------------------------------------------------------


@functools.lru_cache(maxsize=None)
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
    """
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
