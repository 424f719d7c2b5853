"""One training step, compiled, and the state it updates.

Each step draws a batch's timesteps, noise, label drops, flips and dropout from the key in
the state, takes one optimiser step on ``diffusion_loss`` and updates the EMA of the
weights, the ones used for sampling and analysis (decay min(ema, (1 + s) / (10 + s)) at
step s).

Randomness. All training randomness comes from that one key, split once per step. It is an
"rbg" key (``jax.random.key(seed, impl="rbg")``): with the default threefry keys, XLA on the
CPU compiles the random draws of a training step (the dropout masks above all) very slowly,
and rbg keys still give the same numbers however the batch is sharded, so one device and
eight agree.

With a mesh (``input_pipeline.data_mesh``), the batch is sharded along its "data" axis and
the state replicated; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff_info import unet
from jaxdiff_info.data import random_flip, to_model_range
from jaxdiff_info.schedule import linear_schedule
from jaxdiff_info.training.config import NUM_TRAIN_STEPS, RNG_IMPL, TrainConfig
from jaxdiff_info.training.input_pipeline import _replicated
from jaxdiff_info.training.objective import diffusion_loss, learning_rate, make_optimizer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training step reads and writes.

    step: () int32, steps taken. params, ema_params: nnx.State (float32). opt_state: optax
    state of ``make_optimizer``. rng: the training key (rbg), split once per step.
    """

    step: jax.Array
    params: nnx.State
    ema_params: nnx.State
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class _StepSettings:
    """The part of a TrainConfig a compiled step depends on (hashable, for caching)."""

    lr: float
    warmup: int
    grad_clip: float
    ema: float
    label_dropout: float
    flip: bool
    bf16: bool

    @classmethod
    def of(cls, config: TrainConfig) -> "_StepSettings":
        return cls(float(config.lr), int(config.warmup), float(config.grad_clip), float(config.ema_decay),
                   float(config.label_dropout), bool(config.flip), bool(config.bf16))


def _train_step(state: TrainState, batch: dict, *, net: unet.UNetConfig, s: _StepSettings):
    """One optimiser step on a batch {"images": uint8 (B, H, W, C), "labels": int (B,)}."""
    schedule = linear_schedule(NUM_TRAIN_STEPS)
    tx = make_optimizer(s.lr, s.warmup, s.grad_clip)
    rng, key = jax.random.split(state.rng)
    k_flip, k_loss = jax.random.split(key)
    x_0 = to_model_range(batch["images"])
    if s.flip:
        x_0 = random_flip(k_flip, x_0)
    loss, grads = jax.value_and_grad(diffusion_loss)(
        state.params, net, schedule, k_loss, x_0, batch["labels"],
        label_dropout=s.label_dropout, compute_dtype=jnp.bfloat16 if s.bf16 else None)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = jnp.minimum(s.ema, (1.0 + state.step) / (10.0 + state.step))
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": jnp.asarray(learning_rate(s.lr, s.warmup)(state.step), jnp.float32)}
    return TrainState(state.step + 1, params, ema_params, opt_state, rng), metrics


@functools.lru_cache(maxsize=32)
def _compiled_step(net: unet.UNetConfig, s: _StepSettings, mesh: Mesh | None, fused: bool):
    step = functools.partial(_train_step, net=net, s=s)
    fn = (lambda state, batches: jax.lax.scan(step, state, batches)) if fused else step
    if mesh is None:
        return jax.jit(fn, donate_argnums=0)
    data = NamedSharding(mesh, PartitionSpec(None, "data") if fused else PartitionSpec("data"))
    rep = _replicated(mesh)
    return jax.jit(fn, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def make_train_step(net: unet.UNetConfig, config: TrainConfig, mesh: Mesh | None = None):
    """Compiled ``train_step(state, batch) -> (state, metrics)``; the state is donated.

    batch: {"images": uint8 (B, H, W, C), "labels": int32 (B,)}; metrics: loss, grad_norm
    (before clipping), lr. With a mesh, the batch is sharded along "data" and the state
    replicated. Compiled functions are cached per (net, settings, mesh).
    """
    return _compiled_step(net, _StepSettings.of(config), mesh, False)


def make_train_steps(net: unet.UNetConfig, config: TrainConfig, mesh: Mesh | None = None):
    """Compiled ``train_steps(state, batches) -> (state, metrics)``: n steps in one lax.scan.

    batches: {"images": (n, B, H, W, C), "labels": (n, B)}; metrics have a leading axis n.
    """
    return _compiled_step(net, _StepSettings.of(config), mesh, True)


@functools.lru_cache(maxsize=32)
def _compiled_init(net: unet.UNetConfig, s: _StepSettings, mesh: Mesh | None):
    def init(seed):
        k_params, k_train = jax.random.split(jax.random.key(seed, impl=RNG_IMPL))
        params = unet.init_params(net, k_params)
        opt_state = make_optimizer(s.lr, s.warmup, s.grad_clip).init(params)
        return TrainState(jnp.zeros((), jnp.int32), params, params, opt_state, k_train)

    if mesh is None:
        return jax.jit(init)
    return jax.jit(init, out_shardings=_replicated(mesh))


def init_state(net: unet.UNetConfig, config: TrainConfig, mesh: Mesh | None = None) -> TrainState:
    """Step 0: parameters from ``config.seed``, EMA = parameters, fresh Adam state, the key."""
    return _compiled_init(net, _StepSettings.of(config), mesh)(config.seed)


def abstract_state(net: unet.UNetConfig, config: TrainConfig, mesh: Mesh) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, no allocation."""
    shapes = jax.eval_shape(_compiled_init(net, _StepSettings.of(config), None), config.seed)
    rep = _replicated(mesh)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), shapes)

