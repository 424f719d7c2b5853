"""The U-Net of `jaxdiff_info.unet` written in PyTorch, for `benchmarks/train_speed.py`.

Same architecture, same parameter names (module tree ``conv_in``, ``down[i][j].res.conv1``,
``mid``, ``up``, ``upsample``, ... as in the Flax NNX model), same parameter count, and
`load_jax_params` copies the parameters of the JAX model in, after which both compute the
same function (checked by `check_against_jax`). Layout is NCHW here (PyTorch's native
layout, the one its oneDNN convolutions are tuned for) against NHWC in JAX; the conversion
is done at the boundary (`nhwc_to_nchw`) and in the parameter copy.

Correspondence of the layers:

* ``nnx.Conv`` 3x3, SAME     -> ``nn.Conv2d(padding=1)``; kernel (kh, kw, cin, cout) ->
  (cout, cin, kh, kw).
* ``Downsample`` (3x3, stride 2, SAME = TensorFlow padding: 0 before, 1 after) ->
  ``F.pad(x, (0, 1, 0, 1))`` then ``nn.Conv2d(stride=2, padding=0)``.
* ``nnx.Linear`` on channels ("nin": shortcut, q, k, v, proj_out) -> ``nn.Conv2d`` 1x1, as
  in the PyTorch ports of DDPM; kernel (cin, cout) -> (cout, cin, 1, 1).
* ``nnx.Linear`` on vectors (timestep MLP, temb_proj) -> ``nn.Linear``; kernel transposed.
* ``nnx.GroupNorm(epsilon=1e-6)`` -> ``nn.GroupNorm(eps=1e-6)``; ``scale`` -> ``weight``.
* ``nnx.Embed`` -> ``nn.Embedding``.

Not ported: the NaN output for out-of-range labels (the benchmark only draws valid labels)
and the bfloat16 ``compute_dtype``. This module imports torch and is never imported by the
library or its tests (torch is the optional ``bench`` extra).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# Parameter counts of jaxdiff_info.unet.count_params, asserted in `build`.
EXPECTED_PARAMS = {
    # config: (total, without the class embedding)
    "ddpm": (35_751_939, 35_746_307),
    "tiny": (281_459, 280_755),
}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim): frequencies 10000^{-i/(dim/2 - 1)}, sines then cosines (as in JAX)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=t.device)
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _nin(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, temb_dim, *, dropout, num_groups):
        super().__init__()
        self.norm1 = _norm(cin, num_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = _norm(cout, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = _nin(cin, cout) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, c, *, num_groups):
        super().__init__()
        self.norm = _norm(c, num_groups)
        self.q = _nin(c, c)
        self.k = _nin(c, c)
        self.v = _nin(c, c)
        self.proj_out = _nin(c, c)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W)
        k = self.k(h).reshape(B, C, H * W)
        v = self.v(h).reshape(B, C, H * W)
        w = torch.bmm(q.transpose(1, 2), k) * C**-0.5          # (B, HW_i, HW_j)
        w = torch.softmax(w, dim=-1)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)  # sum_j w_ij v_jc
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # TensorFlow SAME for stride 2


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Block(nn.Module):
    def __init__(self, cin, cout, temb_dim, *, attn, dropout, num_groups):
        super().__init__()
        self.res = ResBlock(cin, cout, temb_dim, dropout=dropout, num_groups=num_groups)
        self.attn = AttnBlock(cout, num_groups=num_groups) if attn else None

    def forward(self, x, temb):
        h = self.res(x, temb)
        return h if self.attn is None else self.attn(h)


class UNet(nn.Module):
    """eps_theta(x_t, t, k): (B, C, H, W), (B,), (B,) -> (B, C, H, W), NCHW."""

    def __init__(self, config):
        """``config``: a `jaxdiff_info.unet.UNetConfig` (only its fields are read)."""
        super().__init__()
        c = self.config = config
        temb_dim = 4 * c.ch

        def block(cin, cout, attn):
            return Block(cin, cout, temb_dim, attn=attn, dropout=c.dropout,
                         num_groups=c.num_groups)

        self.temb_dense0 = nn.Linear(c.ch, temb_dim)
        self.temb_dense1 = nn.Linear(temb_dim, temb_dim)
        self.class_embed = nn.Embedding(c.num_classes + 1, temb_dim)

        self.conv_in = nn.Conv2d(c.channels, c.ch, 3, padding=1)
        skip_ch, cur, res = [c.ch], c.ch, c.image_size
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(c.ch_mult):
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                blocks.append(block(cur, c.ch * mult, res in c.attn_resolutions))
                cur = c.ch * mult
                skip_ch.append(cur)
            self.down.append(blocks)
            if level != len(c.ch_mult) - 1:
                self.downsample.append(Downsample(cur))
                skip_ch.append(cur)
                res //= 2

        self.mid = nn.ModuleList([block(cur, cur, True), block(cur, cur, False)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.ch_mult))):
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                blocks.append(block(cur + skip_ch.pop(), c.ch * mult, res in c.attn_resolutions))
                cur = c.ch * mult
            self.up.append(blocks)
            if level != 0:
                self.upsample.append(Upsample(cur))
                res *= 2
        assert not skip_ch

        self.norm_out = _norm(cur, c.num_groups)
        self.conv_out = nn.Conv2d(cur, c.channels, 3, padding=1)

    def forward(self, x, t, k):
        c = self.config
        temb = timestep_embedding(t, c.ch)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb))) + self.class_embed(k)

        hs = [self.conv_in(x)]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                hs.append(blk(hs[-1], temb))
            if level < len(self.downsample):
                hs.append(self.downsample[level](hs[-1]))

        h = hs[-1]
        for blk in self.mid:
            h = blk(h, temb)

        for i, blocks in enumerate(self.up):
            for blk in blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), temb)
            if i < len(self.upsample):
                h = self.upsample[i](h)
        assert not hs
        h = self.conv_out(F.silu(self.norm_out(h)))
        if c.sigma_data is None:
            return h
        # the preconditioned output of jaxdiff_info.unet.preconditioning
        abar = _alpha_bar(x.device)[t - 1].view(-1, 1, 1, 1)
        s2, v = abar * c.sigma_data**2, 1.0 - abar
        return torch.sqrt(v) / (s2 + v) * x + torch.sqrt(s2 / (s2 + v)) * h


def _alpha_bar(device) -> torch.Tensor:
    """alpha_bar_t, t = 1..1000, of the DDPM linear schedule (betas 1e-4 to 0.02)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(device=device, dtype=torch.float32)


def count_params(model: nn.Module, *, include_class_embedding: bool = True) -> int:
    return sum(
        p.numel() for name, p in model.named_parameters()
        if include_class_embedding or not name.startswith("class_embed.")
    )


def build(config_name: str, config) -> UNet:
    """The PyTorch U-Net of ``config``, with its parameter count asserted against JAX's."""
    model = UNet(config)
    total = count_params(model)
    no_class = count_params(model, include_class_embedding=False)
    if config_name in EXPECTED_PARAMS:
        assert (total, no_class) == EXPECTED_PARAMS[config_name], (
            config_name, total, no_class, EXPECTED_PARAMS[config_name])
    return model


# --- parameter copy and layout conversion -----------------------------------------------

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def _torch_name(path) -> str:
    parts = []
    for p in path:
        key = getattr(p, "key", getattr(p, "idx", getattr(p, "name", None)))
        if key is None:
            raise ValueError(f"unexpected path entry {p!r}")
        if key == "value":  # nnx.Param / Variable wrapper
            continue
        parts.append(str(key))
    parts[-1] = _LEAF_NAMES[parts[-1]]
    return ".".join(parts)


def load_jax_params(model: UNet, params) -> None:
    """Copy the parameters of the JAX model (``jaxdiff_info.unet.init_params``) into ``model``.

    Every PyTorch parameter must receive exactly one JAX leaf of matching (converted) shape.
    """
    import jax

    named = dict(model.named_parameters())
    seen = set()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _torch_name(path)
        if name not in named:
            raise KeyError(f"JAX parameter {jax.tree_util.keystr(path)} -> {name}: no such torch parameter")
        target = named[name]
        value = np.asarray(leaf, dtype=np.float32)
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2 and isinstance(module, nn.Conv2d):
            value = value.T[:, :, None, None]
        elif value.ndim == 2 and isinstance(module, nn.Linear):
            value = value.T
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{name}: JAX shape {leaf.shape} -> {value.shape}, torch {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(value, np.float32, copy=True)))
        seen.add(name)
    missing = set(named) - seen
    if missing:
        raise KeyError(f"torch parameters without a JAX counterpart: {sorted(missing)}")


def nhwc_to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy().transpose(0, 2, 3, 1)


def perturbed_params(config, *, seed: int = 0, scale: float = 0.02):
    """JAX parameters (rbg key: fast to compile on CPU) plus Gaussian noise of ``scale``.

    The zero-initialised layers (conv2 of every residual block, proj_out, conv_out) would
    make most of the network invisible in the output and in the gradients of everything but
    the last layer, so every parameter gets a little noise for the comparisons below.
    """
    import jax

    from jaxdiff_info import unet

    params = unet.init_params(config, jax.random.key(seed, impl="rbg"))
    rng = np.random.default_rng(seed + 1)
    return jax.tree.map(
        lambda leaf: leaf + scale * rng.standard_normal(leaf.shape).astype(np.float32), params)


def check_against_jax(config_name: str, *, batch: int = 4, seed: int = 0,
                      grads: bool = False) -> dict:
    """Compare the PyTorch port with the JAX model, same parameters, same random batch.

    Returns max |eps_jax - eps_torch| and max |eps_jax| of the forward pass (no dropout;
    labels include the null label), and with ``grads`` the max abs difference of the
    gradients of the MSE loss against a fixed target, over all parameters, and the max abs
    gradient.
    """
    import jax
    import jax.numpy as jnp

    from jaxdiff_info import unet

    config = unet.get_config(config_name)
    params = perturbed_params(config, seed=seed)
    rng = np.random.default_rng(seed)
    shape = (batch, config.image_size, config.image_size, config.channels)
    x = rng.standard_normal(shape).astype(np.float32)
    target = rng.standard_normal(shape).astype(np.float32)
    t = rng.integers(1, 1001, size=batch).astype(np.int32)
    k = rng.integers(0, config.num_classes + 1, size=batch).astype(np.int32)
    k[-1] = config.num_classes

    model = build(config_name, config)
    load_jax_params(model, params)
    model.eval()
    xt, tt, kt = nhwc_to_nchw(x), torch.from_numpy(t).long(), torch.from_numpy(k).long()
    out = {}
    if not grads:
        eps_jax = np.asarray(jax.jit(unet.apply, static_argnums=0)(config, params, x, t, k))
        with torch.no_grad():
            eps_torch = nchw_to_nhwc(model(xt, tt, kt))
    else:
        def loss_fn(p):
            eps = unet.apply(config, p, x, t, k)
            return jnp.mean((eps - target) ** 2), eps

        (_, eps_jax), g_jax = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
        eps_jax = np.asarray(eps_jax)
        eps_t = model(xt, tt, kt)
        F.mse_loss(eps_t, nhwc_to_nchw(target)).backward()
        eps_torch = nchw_to_nhwc(eps_t)
        g_torch = {name: p.grad.numpy() for name, p in model.named_parameters()}
        per_leaf = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(g_jax)[0]:
            name = _torch_name(path)
            gj, gt = np.asarray(leaf), g_torch[name]
            # bring the torch gradient into the JAX layout
            if leaf.ndim == 4:                                   # conv kernel
                gt = gt.transpose(2, 3, 1, 0)
            elif leaf.ndim == 2 and not name.startswith("class_embed."):
                gt = gt.reshape(gt.shape[0], -1).T               # Linear / 1x1 conv
            assert gt.shape == gj.shape, (name, gt.shape, gj.shape)
            d = float(np.max(np.abs(gj - gt)))
            per_leaf[name] = (d, float(np.max(np.abs(gj))))
        out.update(grad_max_abs_diff=max(d for d, _ in per_leaf.values()),
                   grad_max_abs=max(m for _, m in per_leaf.values()),
                   grad_per_leaf=per_leaf)
    assert np.all(np.isfinite(eps_jax)) and np.all(np.isfinite(eps_torch))
    out.update(eps_max_abs_diff=float(np.max(np.abs(eps_jax - eps_torch))),
               eps_max_abs=float(np.max(np.abs(eps_jax))))
    return out
