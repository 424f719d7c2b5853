"""The settings of a training run, and the constants every part of the training package shares.

``TrainConfig`` holds everything one run depends on (the CLI builds it, ``TrainConfig.preset``
fills in the PRESETS of a model config); TRAJECTORY_FIELDS are the settings a resumed run must
keep. The file names of a training directory, the config.json format, the key
implementation and the dataset seed are fixed here, with ``_one_line``, the exception
summary of every error message of the package.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff_info import unet
from jaxdiff_info.data import DATASETS, IMAGE_SHAPES, MIRROR_SAFE

NUM_TRAIN_STEPS = unet.TRAIN_STEPS  # T of the DDPM linear schedule the model is trained on
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
FORMAT = "jaxdiff_info.training/1"
RNG_IMPL = "rbg"  # jax.random key implementation of all training randomness (see step.py)
DATA_SEED = 0  # the shapes dataset is generated from this seed, whatever the training seed

# EMA decay per model config; any other config gets DEFAULT_EMA.
EMA = {"ddpm": 0.9999}
DEFAULT_EMA = 0.999

# Settings per model config for `TrainConfig.preset` and the CLI. ddpm: Ho et al. (2020),
# CIFAR-10. tiny: a run on shapes sized for two CPU cores, which train it at about 80 images/s
# when idle: 3000 steps at batch 16 take about 10 minutes, and the samples' background
# temperature (the coarse attribute) follows the class from about step 1000 on (README). On the
# 8x8 digits the same 3000 steps take about 2 minutes and give legible digits of every class.
PRESETS: dict[str, dict[str, Any]] = {
    "ddpm": dict(steps=800_000, batch_size=128, lr=2e-4, warmup=5000, save_every=10_000,
                 steps_per_call=1, log_every=100, sample_steps=100),
    "tiny": dict(steps=3000, batch_size=16, lr=2e-3, warmup=100, save_every=1000,
                 steps_per_call=1, log_every=50, sample_steps=50),
}

# The settings that change what is computed: a run resumes only with the same values.
TRAJECTORY_FIELDS = ("seed", "batch_size", "lr", "warmup", "grad_clip", "ema", "label_dropout",
                     "flip", "bf16", "num_examples")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (the CLI builds it).

    model: a name of ``unet.CONFIGS`` (or, with ``unet`` given, the name to record for it); a
      named config is sized for the dataset's images (``net``): 32x32x3, or 8x8x1 for digits.
    dataset: "cifar10", "shapes" or "digits" (its train split; ``num_examples`` keeps the first
      ones).
    checkpoint_dir: where checkpoints, config.json, metrics.jsonl and samples/ go
      (None: checkpoints/<model>-<dataset>).
    steps: total optimiser steps; batch_size: global batch, divisible by the device count.
    lr, warmup: Adam's learning rate, reached linearly over the first ``warmup`` steps.
    grad_clip: global-norm clipping of the gradients.
    ema: EMA decay of the weights (None: 0.9999 for ddpm, 0.999 otherwise); the decay in
      use at step s is min(ema, (1 + s) / (10 + s)), so that short runs get a useful EMA.
    label_dropout: probability of replacing a label by the null class.
    flip: random horizontal flips (None: the dataset's ``data.MIRROR_SAFE``, off for digits,
      whose mirror images are no digits). bf16: bfloat16 compute, float32 master weights.
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
    flip: bool | None = None
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
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.unet is None:
            unet.get_config(self.model)  # ValueError naming the choices
            try:
                self.net
            except ValueError as e:
                raise ValueError(f"model {self.model!r} does not fit the {self.dataset} images of "
                                 f"{IMAGE_SHAPES[self.dataset]} ({e})") from None
        elif not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty name for the given UNetConfig")
        if self.flip is None:
            object.__setattr__(self, "flip", MIRROR_SAFE[self.dataset])
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
        """The network's UNetConfig: ``unet``, else the named config with the image size and
        channels of the dataset (the same ch_mult: tiny halves 8x8 digits to 4x4 and 2x2)."""
        if self.unet is not None:
            return self.unet
        size, _, channels = IMAGE_SHAPES[self.dataset]
        return dataclasses.replace(unet.get_config(self.model), image_size=size, channels=channels)

    @property
    def ema_decay(self) -> float:
        return self.ema if self.ema is not None else EMA.get(self.model, DEFAULT_EMA)

    def settings(self) -> dict[str, Any]:
        """The training settings as JSON (config.json's "training"), with the EMA resolved."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("model", "dataset", "unet", "checkpoint_dir", "data_dir")}
        out["ema"] = self.ema_decay
        return out


def _one_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message on one line of at most ``limit`` characters, for error messages."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."

