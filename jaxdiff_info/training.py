"""Training the class-conditional U-Net, checkpoints that resume exactly, and loading them back.

The objective is the eps-prediction loss of Ho et al. (2020), with the class label replaced
by the null label with probability p (0.1) so that one network gives both the conditional
eps(x_t, t, k) and the unconditional eps(x_t, t, null):

    t ~ Uniform{1..T},  eps ~ N(0, I),  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    L(theta) = E || eps - eps_theta(x_t, t, k) ||^2      (mean over pixels and the batch)

on the DDPM linear schedule (T = 1000), x_0 in [-1, 1] NHWC, flipped left-right at random.
Adam with a linear learning-rate warm-up and gradient clipping at global norm 1, and an EMA
of the weights, the ones used for sampling and analysis.

Pieces, each usable on its own::

    state = init_state(net, config, mesh)          # TrainState: step, params, EMA, Adam, key
    train_step = make_train_step(net, config, mesh)
    state, metrics = train_step(state, batch)      # batch: {"images": uint8 (B,H,W,C), "labels": (B,)}
    train(config)                                  # the whole loop: data, checkpoints, samples
    model = load_checkpoint("checkpoints/tiny-shapes")   # LoadedModel, EMA params by default

Devices. Training is data parallel over every device of every process: a Mesh over
``jax.devices()`` with one axis "data"; each batch is sharded along it and the state is
replicated, and XLA inserts the gradient all-reduce. For several hosts, start one process
per host with the usual environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID; or a Slurm or Open MPI launch of more than one task):
``initialize_distributed`` then starts ``jax.distributed`` before anything else, and each
process feeds its own slice of every global batch. The checkpoint directory must then be
on a file system that every process sees.

Randomness. All training randomness (timesteps, noise, label drop, flips, dropout) comes
from one key in the state, split once per step. It is an "rbg" key
(``jax.random.key(seed, impl="rbg")``): with the default threefry keys, XLA on the CPU
compiles the random draws of a training step (the dropout masks above all) very slowly,
and rbg keys still give the same numbers however the batch is sharded, so one device and
eight agree. The data order is a pure function of (seed, step): epoch e visits the images
in the order of the permutation ``numpy.random.default_rng((seed, e))``, in batches,
dropping the remainder.

Checkpoints (orbax ``CheckpointManager``) hold the step, the parameters, their EMA, the
optimiser state and the key; with the data order a function of the step, a resumed run
continues exactly as if it had never stopped (bitwise, for the same ``steps_per_call`` and
devices). Orbax writes each checkpoint into a temporary folder and renames it when it is
complete, so a half-written checkpoint never counts. Next to the checkpoints,
``config.json`` records the model (its config name and every UNetConfig field), the dataset
(class names and decision problems) and the training settings, so that another program
can rebuild the network (``load_checkpoint``); ``metrics.jsonl`` gets one line per
``log_every`` steps; ``samples/step_XXXXXXX.png`` is a grid of EMA samples, one row per
class, at every checkpoint.

Stopping. On SIGINT (Ctrl-C) or SIGTERM, ``train`` finishes the call in flight, saves a
checkpoint (without a sample grid) and raises ``TrainingInterrupted``; the CLI then exits with
status 130 or 143 (128 + the signal's number). A second signal acts as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdiff_info import unet
from jaxdiff_info.data import DATASETS, Dataset, load_dataset, random_flip, to_model_range
from jaxdiff_info.schedule import (Sampler, Schedule, alpha_bar_at, eps_to_x0, linear_schedule, respace,
                                  reverse_step, x0_to_eps)

__all__ = [
    "TrainConfig",
    "PRESETS",
    "TrainState",
    "TrainingInterrupted",
    "LoadedModel",
    "RunInfo",
    "diffusion_loss",
    "make_optimizer",
    "learning_rate",
    "init_state",
    "make_train_step",
    "make_train_steps",
    "batch_indices",
    "Batches",
    "data_mesh",
    "initialize_distributed",
    "ancestral_sample",
    "sample",
    "train",
    "load_checkpoint",
    "read_run_info",
    "latest_step",
]

NUM_TRAIN_STEPS = unet.TRAIN_STEPS  # T of the DDPM linear schedule the model is trained on
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
FORMAT = "jaxdiff_info.training/1"
RNG_IMPL = "rbg"
DATA_SEED = 0  # the shapes dataset is generated from this seed, whatever the training seed

# EMA decay per model config; any other config gets DEFAULT_EMA.
EMA = {"ddpm": 0.9999}
DEFAULT_EMA = 0.999

# Settings per model config for `TrainConfig.preset` and the CLI. ddpm: Ho et al. (2020),
# CIFAR-10. tiny: a run on shapes sized for two CPU cores, which train it at about 80 images/s
# when idle: 3000 steps at batch 16 take about 10 minutes, and the samples' background
# temperature (the coarse attribute) follows the class from about step 1000 on (README).
PRESETS: dict[str, dict[str, Any]] = {
    "ddpm": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, save_every=10_000,
                 steps_per_call=1, log_every=100, sample_steps=100),
    "tiny": dict(steps=3000, batch_size=16, lr=2e-3, warmup=100, save_every=1000,
                 steps_per_call=1, log_every=50, sample_steps=50),
}

# The settings that change what is computed: a run resumes only with the same values.
TRAJECTORY_FIELDS = ("seed", "batch_size", "lr", "warmup", "grad_clip", "ema", "label_dropout",
                     "flip", "bf16", "num_examples")


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (the CLI builds it).

    model: a name of ``unet.CONFIGS`` (or, with ``unet`` given, the name to record for it).
    dataset: "cifar10" or "shapes" (its train split; ``num_examples`` keeps the first ones).
    checkpoint_dir: where checkpoints, config.json, metrics.jsonl and samples/ go
      (None: checkpoints/<model>-<dataset>).
    steps: total optimiser steps; batch_size: global batch, divisible by the device count.
    lr, warmup: Adam's learning rate, reached linearly over the first ``warmup`` steps.
    grad_clip: global-norm clipping of the gradients.
    ema: EMA decay of the weights (None: 0.9999 for ddpm, 0.999 otherwise); the decay in
      use at step s is min(ema, (1 + s) / (10 + s)), so that short runs get a useful EMA.
    label_dropout: probability of replacing a label by the null class.
    flip: random horizontal flips. bf16: bfloat16 compute, float32 master weights.
    save_every, keep: a checkpoint every ``save_every`` steps and at the end; keep the last
      ``keep``. steps_per_call: training steps fused into one compiled call (lax.scan).
    log_every: steps per metrics.jsonl line. samples_per_class, sample_steps: the sample grid
      written at each checkpoint (0 samples: none), with a DDPM sampler of that many steps.
    unet: a UNetConfig to use instead of ``unet.CONFIGS[model]``.
    """

    model: str = "ddpm"
    dataset: str = "cifar10"
    checkpoint_dir: Path | None = None
    data_dir: Path = Path("data")
    steps: int = 800_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000
    grad_clip: float = 1.0
    ema: float | None = None
    label_dropout: float = 0.1
    flip: bool = True
    bf16: bool = False
    seed: int = 0
    num_examples: int | None = None
    save_every: int = 10_000
    keep: int = 3
    steps_per_call: int = 1
    log_every: int = 100
    samples_per_class: int = 8
    sample_steps: int = 100
    unet: unet.UNetConfig | None = None

    def __post_init__(self):
        if self.checkpoint_dir is None:
            object.__setattr__(self, "checkpoint_dir", Path("checkpoints") / f"{self.model}-{self.dataset}")
        object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.unet is None:
            unet.get_config(self.model)  # ValueError naming the choices
        elif not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty name for the given UNetConfig")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        for name, low in (("steps", 1), ("batch_size", 1), ("warmup", 0), ("seed", 0), ("save_every", 1),
                          ("keep", 1), ("steps_per_call", 1), ("log_every", 1), ("samples_per_class", 0),
                          ("sample_steps", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.sample_steps > NUM_TRAIN_STEPS:
            raise ValueError(f"sample_steps must be at most {NUM_TRAIN_STEPS}, got {self.sample_steps}")
        if self.num_examples is not None and (isinstance(self.num_examples, bool) or self.num_examples < 1):
            raise ValueError(f"num_examples must be >= 1 (or None for the whole split), got {self.num_examples}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")

    @classmethod
    def preset(cls, model: str, dataset: str = "shapes", **overrides) -> "TrainConfig":
        """The PRESETS settings of a model config (ddpm's for any other name), then overrides."""
        return cls(model=model, dataset=dataset, **{**PRESETS.get(model, PRESETS["ddpm"]), **overrides})

    @property
    def net(self) -> unet.UNetConfig:
        """The network's UNetConfig."""
        return self.unet if self.unet is not None else unet.get_config(self.model)

    @property
    def ema_decay(self) -> float:
        return self.ema if self.ema is not None else EMA.get(self.model, DEFAULT_EMA)

    def settings(self) -> dict[str, Any]:
        """The training settings as JSON (config.json's "training"), with the EMA resolved."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("model", "dataset", "unet", "checkpoint_dir", "data_dir")}
        out["ema"] = self.ema_decay
        return out


# ----------------------------------------------------------------------------
# The objective and one step
# ----------------------------------------------------------------------------


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
    prediction = unet.apply(net, params, x_t, t, k, dropout_key=k_dropout, compute_dtype=compute_dtype)
    return jnp.mean((prediction - eps) ** 2)


def learning_rate(lr: float, warmup: int) -> optax.Schedule:
    """lr * min(1, (n + 1) / warmup) for the n-th update (n = 0, 1, ...); constant if warmup = 0."""
    if warmup == 0:
        return optax.constant_schedule(lr)
    return lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)


def make_optimizer(lr: float, warmup: int, grad_clip: float) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (betas 0.9, 0.999, eps 1e-8) with the warm-up schedule."""
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(learning_rate(lr, warmup)))


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


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


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


# ----------------------------------------------------------------------------
# Devices and data
# ----------------------------------------------------------------------------


def initialize_distributed() -> bool:
    """Start ``jax.distributed`` when the environment describes a multi-process job.

    Explicitly, with JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; or by JAX's own detection under Slurm (SLURM_NTASKS > 1) or Open MPI
    (OMPI_COMM_WORLD_SIZE > 1). Otherwise nothing happens. Must run before any JAX
    computation. Returns whether JAX runs distributed.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    try:
        if env.get("JAX_COORDINATOR_ADDRESS"):
            try:
                num_processes, process_id = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
            except (KeyError, ValueError):
                raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                                 "to integers too (or unset it for a single-process run)") from None
            jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], num_processes, process_id)
        elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
            jax.distributed.initialize()
        else:
            return False
    except RuntimeError as e:
        raise ValueError(f"cannot start jax.distributed ({_one_line(e)}); it must start before any JAX "
                         "computation") from None
    return True


def data_mesh(devices=None) -> Mesh:
    """A 1-D Mesh with axis "data" over ``devices`` (default: every device of every process)."""
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ("data",))


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """(batch_size,) indices of the images of global batch ``step``.

    Epoch e = step // (N // B) visits the images in the order of
    ``numpy.random.default_rng((seed, e)).permutation(N)``; the last N mod B are skipped.
    """
    per_epoch = num_examples // batch_size
    epoch, i = divmod(int(step), per_epoch)
    return _permutation(seed, epoch, num_examples)[i * batch_size:(i + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


class Batches:
    """The global batches of a run, as arrays sharded along the mesh's "data" axis.

    ``batches(step, n)`` gives the n consecutive batches starting at ``step``, stacked:
    {"images": uint8 (n, B, H, W, C), "labels": int32 (n, B)}; ``batches.one(step)`` a single
    one without the leading axis. Each process builds only its own rows of each batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, mesh: Mesh):
        self.images, self.labels = dataset.images, dataset.labels
        self.batch_size, self.seed, self.mesh = batch_size, seed, mesh
        processes = jax.process_count()
        self.rows = slice(jax.process_index() * batch_size // processes,
                          (jax.process_index() + 1) * batch_size // processes)

    def _indices(self, step: int, n: int) -> np.ndarray:
        return np.stack([batch_indices(self.seed, s, len(self.labels), self.batch_size)
                         for s in range(step, step + n)])

    def _put(self, array: np.ndarray, spec: PartitionSpec, global_shape) -> jax.Array:
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), array, global_shape)

    def __call__(self, step: int, n: int) -> dict[str, jax.Array]:
        idx = self._indices(step, n)[:, self.rows]
        spec = PartitionSpec(None, "data")
        return {"images": self._put(self.images[idx], spec, (n, self.batch_size) + self.images.shape[1:]),
                "labels": self._put(self.labels[idx], spec, (n, self.batch_size))}

    def one(self, step: int) -> dict[str, jax.Array]:
        idx = self._indices(step, 1)[0, self.rows]
        spec = PartitionSpec("data")
        return {"images": self._put(self.images[idx], spec, (self.batch_size,) + self.images.shape[1:]),
                "labels": self._put(self.labels[idx], spec, (self.batch_size,))}


# ----------------------------------------------------------------------------
# Sampling (the grids written at each checkpoint)
# ----------------------------------------------------------------------------


def ancestral_sample(eps_fn: Callable, schedule: Schedule, sampler: Sampler, key: jax.Array, x_T: jax.Array,
                     *, clip: bool = False) -> jax.Array:
    """x_0 from x_T by the reverse steps of ``schedule``, from step S down to 1.

    eps_fn(x_t, t) -> eps with t the model's timestep of the step (``schedule.timesteps``);
    x_{t-1} = mean(x_t, eps) + sigma_t z (``schedule.reverse_step``). With ``clip``, eps is
    replaced by the eps of the prediction of x_0 clipped to [-1, 1] (Ho et al.'s sampler).
    Any batch shape: x_T and eps_fn's output share it.
    """

    def step(x, inputs):
        i, k = inputs  # i = S..1 indexes the schedule
        eps = eps_fn(x, schedule.timesteps[i - 1])
        if clip:
            abar = schedule.alpha_bar[i - 1]
            eps = x0_to_eps(x, jnp.clip(eps_to_x0(x, eps, abar), -1.0, 1.0), abar)
        return reverse_step(schedule, k, i, x, eps, sampler), None

    S = schedule.num_steps
    x_0, _ = jax.lax.scan(step, x_T, (jnp.arange(S, 0, -1), jax.random.split(key, S)))
    return x_0


@functools.lru_cache(maxsize=8)
def _compiled_sampler(net: unet.UNetConfig, num_steps: int, variance: str, clip: bool, bf16: bool):
    schedule = respace(linear_schedule(NUM_TRAIN_STEPS), num_steps)
    sampler = Sampler("ddpm", variance)
    dtype = jnp.bfloat16 if bf16 else None

    def run(params, key, labels):
        k_init, k_steps = jax.random.split(key)
        x_T = jax.random.normal(k_init, (labels.shape[0], net.image_size, net.image_size, net.channels))
        eps_fn = lambda x, t: unet.apply(net, params, x, jnp.broadcast_to(t, labels.shape), labels,
                                         compute_dtype=dtype)
        return jnp.clip(ancestral_sample(eps_fn, schedule, sampler, k_steps, x_T, clip=clip), -1.0, 1.0)

    return jax.jit(run)


def sample(net: unet.UNetConfig, params: nnx.State, key: jax.Array, labels: jax.Array, *,
           num_steps: int = 100, variance: str = "small", clip: bool = True, bf16: bool = False) -> jax.Array:
    """Class-conditional samples x_0 (N, H, W, C) in [-1, 1] for labels (N,).

    DDPM ancestral sampling on ``num_steps`` steps respaced from the training schedule
    (``schedule.respace``), sigma_t^2 = beta~_t ("small") or beta_t ("large"). With ``clip``
    (as in Ho et al.'s sampler), each step uses the posterior mean given the prediction of
    x_0 clipped to [-1, 1], i.e. the eps of that clipped prediction.
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


# ----------------------------------------------------------------------------
# config.json and checkpoints
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What config.json says about a run."""

    config_name: str
    config: unet.UNetConfig
    dataset: str
    class_names: tuple[str, ...]
    decision_problems: dict[str, list[list[int]]]
    num_train_steps: int
    training: dict[str, Any]


def _run_json(config: TrainConfig, dataset: Dataset) -> dict:
    net = config.net
    return {
        "format": FORMAT,
        "model": {"name": config.model, "unet": dataclasses.asdict(net)},
        "dataset": {"name": config.dataset, "num_examples": len(dataset), "class_names": list(dataset.class_names),
                    "decision_problems": dataset.decision_problems},
        "schedule": {"name": "linear", "num_train_steps": NUM_TRAIN_STEPS},
        "training": config.settings(),
    }


def read_run_info(checkpoint_dir: str | os.PathLike) -> RunInfo | None:
    """The run described by <checkpoint_dir>/config.json; None when there is none.

    ValueError (one line) if it cannot be read or does not describe a run.
    """
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} ({_one_line(e)}); restore it or choose another directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupted (not JSON: {e.msg}, line {e.lineno}); restore it from a backup "
                         f"or choose another directory") from None
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
        fields = dict(meta["model"]["unet"])
        net = unet.UNetConfig(**fields)
        info = RunInfo(
            config_name=str(meta["model"]["name"]),
            config=net,
            dataset=str(meta["dataset"]["name"]),
            class_names=tuple(str(c) for c in meta["dataset"]["class_names"]),
            decision_problems={str(k): [[int(c) for c in g] for g in v]
                               for k, v in meta["dataset"]["decision_problems"].items()},
            num_train_steps=int(meta["schedule"]["num_train_steps"]),
            training=dict(meta["training"]),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else _one_line(e)
        raise ValueError(f"{path} is not a training config of this program ({what}); restore it or choose "
                         f"another directory") from None
    if len(info.class_names) != net.num_classes:
        raise ValueError(f"{path} is inconsistent: {len(info.class_names)} class names for a network of "
                         f"{net.num_classes} classes; restore it or choose another directory")
    return info


def _manager(directory: Path, keep: int | None = None, *, create: bool = False):
    import orbax.checkpoint as ocp

    policy = ocp.checkpoint_managers.LatestN(keep) if keep else None
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=create, cleanup_tmp_directories=create,
        enable_async_checkpointing=False)
    # orbax accepts absolute paths only; the CLI's default directory is relative
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def latest_step(checkpoint_dir: str | os.PathLike) -> int | None:
    """The last complete checkpoint's step in a directory (None: none, or no directory)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return None
    manager = _manager(directory)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def _save(manager, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    save = ocp.args.StandardSave
    manager.save(int(state.step), force=True, args=ocp.args.Composite(
        params=save(state.params), ema_params=save(state.ema_params), opt_state=save(state.opt_state),
        progress=save({"step": state.step, "rng": jax.random.key_data(state.rng)})))
    manager.wait_until_finished()


def _restore(manager, step: int, target: TrainState, directory: Path) -> TrainState:
    import orbax.checkpoint as ocp

    restore = ocp.args.StandardRestore
    key_data = jax.eval_shape(jax.random.key_data, target.rng)
    progress = {"step": target.step,
                "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=target.step.sharding)}
    _quiet_aborted_reads()
    try:
        r = manager.restore(step, args=ocp.args.Composite(
            params=restore(target.params), ema_params=restore(target.ema_params),
            opt_state=restore(target.opt_state), progress=restore(progress)))
        rng = jax.random.wrap_key_data(r["progress"]["rng"], impl=RNG_IMPL)
        state = TrainState(r["progress"]["step"], r["params"], r["ema_params"], r["opt_state"], rng)
    except Exception as e:  # orbax raises many kinds of errors for damaged files
        raise ValueError(f"the checkpoint of step {step} in {directory} is corrupted or unreadable "
                         f"({_one_line(e)}); delete {directory / str(step)} to resume from an earlier one") from None
    if int(state.step) != step:
        raise ValueError(f"the checkpoint of step {step} in {directory} holds step {int(state.step)}; it is "
                         f"corrupted: delete {directory / str(step)}")
    return state


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A trained network, ready for ``unet.apply(config, params, ...)``."""

    config: unet.UNetConfig
    config_name: str
    params: nnx.State  # EMA weights unless use_ema=False; replicated on the local devices
    step: int
    dataset: str
    num_train_steps: int
    class_names: tuple[str, ...]
    decision_problems: dict[str, list[list[int]]]


def load_checkpoint(checkpoint_dir: str | os.PathLike, *, step: int | None = None,
                    use_ema: bool = True) -> LoadedModel:
    """The network of a training directory: its config (from config.json) and weights.

    step: which checkpoint (default the latest); use_ema: the EMA weights (default) or the
    raw ones. The parameters are restored replicated on this process's devices, whatever
    devices wrote them. ValueError, one line, when the directory, config.json or the
    checkpoint is missing or unreadable.
    """
    import orbax.checkpoint as ocp

    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} does not exist; train a model first "
                         f"(python -m experiments.cifar10 train --checkpoint-dir {directory})")
    info = read_run_info(directory)
    if info is None:
        raise ValueError(f"{directory} has no {CONFIG_FILE}: it is not a training directory of "
                         f"python -m experiments.cifar10 train; pass the --checkpoint-dir used for training")
    manager = _manager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ValueError(f"{directory} holds no complete checkpoint yet; train longer (a checkpoint is "
                             f"written every save_every steps and at the end)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"{directory} has no checkpoint of step {step}; available: "
                             f"{', '.join(map(str, steps))}")
        mesh = data_mesh(jax.local_devices())
        rep = _replicated(mesh)
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                              unet.abstract_params(info.config))
        item = "ema_params" if use_ema else "params"
        _quiet_aborted_reads()
        try:
            params = manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(target)}))[item]
        except Exception as e:
            raise ValueError(f"the checkpoint of step {step} in {directory} is corrupted or unreadable "
                             f"({_one_line(e)}); pick another step or retrain") from None
    finally:
        manager.close()
    return LoadedModel(config=info.config, config_name=info.config_name, params=params, step=int(step),
                       dataset=info.dataset, num_train_steps=info.num_train_steps,
                       class_names=info.class_names, decision_problems=info.decision_problems)


def _check_directory(directory: Path, config: TrainConfig) -> tuple[RunInfo | None, int | None]:
    """Whether and how a run may use ``directory``; (its config.json, its latest step).

    Refuses, before anything is written: a file; a non-empty folder that is not a training
    directory; checkpoints without config.json; another model or dataset; a resume with
    other trajectory settings (TRAJECTORY_FIELDS).
    """
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"checkpoint directory {directory} is a file; choose another --checkpoint-dir")
    if not directory.exists():
        return None, None
    info = read_run_info(directory)
    latest = latest_step(directory)
    if info is None:
        if latest is not None:
            raise ValueError(f"{directory} holds checkpoints but no {CONFIG_FILE}, so their model is unknown; "
                             f"restore {CONFIG_FILE} or choose another --checkpoint-dir")
        if any(directory.iterdir()):
            raise ValueError(f"{directory} is not empty and is not a training directory (no {CONFIG_FILE}); "
                             f"choose another --checkpoint-dir")
        return None, None
    net = config.net
    if (info.config_name, info.config, info.dataset) != (config.model, net, config.dataset):
        same_name = info.config_name == config.model and info.config != net
        theirs = f"model {info.config_name!r}{' (other fields)' if same_name else ''} on {info.dataset}"
        raise ValueError(f"{directory} holds a run of {theirs}, not model {config.model!r} on {config.dataset}; "
                         f"choose another --checkpoint-dir (nothing was written)")
    if latest is not None:
        ours = config.settings()
        changed = [f"{name} {info.training.get(name)!r} (now {ours[name]!r})" for name in TRAJECTORY_FIELDS
                   if info.training.get(name) != ours[name]]
        if changed:
            raise ValueError(f"{directory} was trained with {', '.join(changed)}; resume with the same settings "
                             f"or choose another --checkpoint-dir")
        if latest > config.steps:
            raise ValueError(f"{directory} is already at step {latest}, beyond steps={config.steps}; pass a "
                             f"larger number of steps to train further")
    return info, latest


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint of ``state``."""

    def __init__(self, signum: int, state: TrainState, checkpoint_dir: Path):
        self.signum, self.state, self.checkpoint_dir = signum, state, checkpoint_dir
        self.step = int(state.step)
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {self.step}; a checkpoint is in "
                         f"{checkpoint_dir}; run the same command again to resume")


class _StopOnSignal:
    """Remembers a SIGINT or SIGTERM instead of dying; a second one acts as usual."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self._restore()
        sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing the current step and saving a checkpoint "
                         f"(send it again to abort at once)\n")

    def _restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc):
        self._restore()
        return False

    def requested(self) -> bool:
        flag = self.signum is not None
        if jax.process_count() > 1:  # every process must stop at the same step
            from jax.experimental import multihost_utils

            flag = bool(np.any(multihost_utils.process_allgather(np.array(flag))))
            if flag and self.signum is None:
                self.signum = signal.SIGTERM
        return flag


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host."""
    return np.asarray(x.addressable_data(0))


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _quiet_aborted_reads() -> None:
    """Drop the noise of a failed orbax restore (installed before each restore, once per process).

    When one read of a restore fails, orbax closes its event loop while other reads are in
    flight; each then reports RuntimeError('Event loop is closed') as an unraisable exception,
    or, when it fails too, its own read error from a coroutine nobody awaits any more: a
    traceback on stderr around the one-line error we report. Exactly those are dropped.
    """
    previous = sys.unraisablehook
    if getattr(previous, "quiet_aborted_reads", False):
        return

    def hook(unraisable):
        e, obj = unraisable.exc_value, unraisable.object
        loop_closed = obj is None and isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        orphan_read = getattr(obj, "__name__", None) == "_read_array_index_and_device_put"
        if not (loop_closed or orphan_read):
            previous(unraisable)

    hook.quiet_aborted_reads = True
    sys.unraisablehook = hook


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after ``step`` (from a run killed after its last checkpoint)."""
    from jaxdiff_info import results

    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    results._atomic_write(path, "".join(line + "\n" for line in kept).encode())


def _write_samples(config: TrainConfig, state: TrainState, class_names, directory: Path, primary: bool) -> None:
    from jaxdiff_info import plots, results
    from jaxdiff_info.data import from_model_range

    net, M = config.net, config.samples_per_class
    labels = np.repeat(np.arange(net.num_classes), M)
    key = jax.random.fold_in(jax.random.key(config.seed, impl=RNG_IMPL), 1)  # the same noise at every step
    x = sample(net, state.ema_params, key, labels, num_steps=config.sample_steps, bf16=config.bf16)
    if not primary:
        return
    images = from_model_range(_host(x)).reshape(net.num_classes, M, *x.shape[1:])
    step = int(state.step)
    fig = _sample_grid_figure(images, class_names, f"step {step}: EMA weights, DDPM {config.sample_steps} steps")
    (directory / SAMPLES_DIR).mkdir(exist_ok=True)
    results.save_figure(fig, directory / SAMPLES_DIR / f"step_{step:07d}.png", dpi=150)
    plots.plt.close(fig)


def train(config: TrainConfig, *, progress: bool = True) -> TrainState:
    """Train (or resume) the run of ``config``; returns the final state.

    Resumes from the latest checkpoint in ``config.checkpoint_dir`` when it holds a run of the
    same model and dataset (with the same trajectory settings); refuses other runs'
    directories with a ValueError, before writing anything. On SIGINT or SIGTERM, finishes
    the current call, saves a checkpoint and raises TrainingInterrupted. Status lines and
    the progress bar (loss, images/s) go to stderr, from process 0.
    """
    from tqdm.auto import tqdm

    from jaxdiff_info import results

    initialize_distributed()
    primary = jax.process_index() == 0
    echo = (lambda msg: tqdm.write(msg, file=sys.stderr)) if primary else (lambda msg: None)
    net = config.net
    directory = Path(config.checkpoint_dir)
    _, latest = _check_directory(directory, config)

    mesh = data_mesh()
    if config.batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; use a "
                         f"multiple of {mesh.size}")
    dataset = load_dataset(config.dataset, config.data_dir, split="train", seed=DATA_SEED,
                           num_examples=config.num_examples)
    if dataset.images.shape[1:] != (net.image_size, net.image_size, net.channels):
        raise ValueError(f"the {config.dataset} images are {dataset.images.shape[1:]}, but model {config.model!r} "
                         f"takes {(net.image_size, net.image_size, net.channels)}")
    if dataset.num_classes != net.num_classes:
        raise ValueError(f"{config.dataset} has {dataset.num_classes} classes, model {config.model!r} "
                         f"{net.num_classes}")
    if len(dataset) < config.batch_size:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than batch_size {config.batch_size}")

    if latest is not None:
        reader = _manager(directory)
        try:
            state = _restore(reader, latest, abstract_state(net, config, mesh), directory)
        finally:
            reader.close()
        echo(f"resuming from the checkpoint of step {latest} in {directory} (training to step {config.steps})")
    else:
        state = init_state(net, config, mesh)
    # Only now, with every check passed and the state in hand, is anything written.
    if primary:
        directory.mkdir(parents=True, exist_ok=True)
        results.write_json(directory / CONFIG_FILE, _run_json(config, dataset))
        if latest is not None:
            _truncate_metrics(directory / METRICS_FILE, latest)
    manager = _manager(directory, config.keep, create=True)

    batches = Batches(dataset, config.batch_size, config.seed, mesh)
    S = config.steps_per_call
    step_fn = make_train_steps(net, config, mesh) if S > 1 else make_train_step(net, config, mesh)
    step = int(state.step)
    saved = latest
    bar = tqdm(total=config.steps, initial=step, unit="step", desc=f"{config.model} on {config.dataset}",
               disable=not (progress and primary), file=sys.stderr, dynamic_ncols=True)
    pending: list[dict] = []  # metrics not yet logged
    last_log_step = step
    start = rate_time = time.perf_counter()
    rate_step = None  # images/s count from the end of the first call: compilation left out

    def flush():
        nonlocal pending, last_log_step, rate_step, rate_time
        if not pending:
            return
        host = [{k: _host(v).reshape(-1) for k, v in m.items()} for m in pending]
        merged = {k: np.concatenate([h[k] for h in host]) for k in host[0]}
        now = time.perf_counter()
        rate = None
        if rate_step is not None and step > rate_step:
            rate = (step - rate_step) * config.batch_size / (now - rate_time)
        record = {"step": step, "loss": float(merged["loss"].mean()), "grad_norm": float(merged["grad_norm"].mean()),
                  "lr": float(merged["lr"][-1]), "images_per_second": rate, "wall_time": now - start}
        if primary:
            _append_metrics(directory / METRICS_FILE, record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", **({"img/s": f"{rate:.0f}"} if rate else {}))
        pending, last_log_step = [], step
        if rate_step is not None:
            rate_step, rate_time = step, now

    def checkpoint(samples: bool = True):
        nonlocal saved
        flush()
        if saved == step:
            return
        _save(manager, state)
        saved = step
        if samples and config.samples_per_class:
            _write_samples(config, state, dataset.class_names, directory, primary)

    try:
        with _StopOnSignal() as stop:
            while step < config.steps:
                n = min(S - step % S, config.steps - step, config.save_every - step % config.save_every)
                batch = batches(step, n) if S > 1 else batches.one(step)
                state, metrics = step_fn(state, batch)
                if pending:  # at most one call in flight: the bar and a stop signal stay current
                    jax.block_until_ready(pending[-1])
                step += n
                pending.append(metrics)
                if rate_step is None:  # the first call, compiled: images/s count from here
                    jax.block_until_ready(metrics)
                    rate_step, rate_time = step, time.perf_counter()
                bar.update(n)
                if step - last_log_step >= config.log_every:
                    flush()
                if step % config.save_every == 0 or step == config.steps:
                    checkpoint()
                if stop.requested() and step < config.steps:  # no samples: a preempted job has little time
                    checkpoint(samples=False)
                    raise TrainingInterrupted(stop.signum, state, directory)
            flush()
            checkpoint()
    finally:
        bar.close()
        manager.close()
    return state
