"""Train a class-conditional U-Net on CIFAR-10, shapes or digits: `python -m experiments.cifar10 train`.

    python -m experiments.cifar10 train --config tiny --dataset shapes     # ~10-30 minutes on 2 CPU cores
    python -m experiments.cifar10 train --config tiny --dataset digits     # scikit-learn's 8x8 digits
    python -m experiments.cifar10 train --config ddpm --dataset cifar10    # Ho et al. (2020), on GPUs

Checkpoints go to --checkpoint-dir (default checkpoints/<config>-<dataset>). Running the same
command again resumes from the latest checkpoint there, exactly where it stopped; settings
not given on the command line are then taken from that run. A directory holding another
model or dataset is refused. Ctrl-C or SIGTERM: the current step finishes, a checkpoint is
saved, and the exit status is 130 (SIGINT) or 143 (SIGTERM). Bad input: one line on stderr,
exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments import cli
from experiments.cli import run_command

PROG = "python -m experiments.cifar10 train"

# The TrainConfig fields set by flags of the same name; unset, they come from the resumed run,
# else from the model config's preset (training.PRESETS), else TrainConfig's defaults.
SETTINGS = ("steps", "batch_size", "lr", "warmup", "grad_clip", "ema", "label_dropout", "seed", "num_examples",
            "save_every", "keep", "steps_per_call", "log_every", "samples_per_class", "sample_steps", "flip", "bf16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jaxdiff_info import training, unet
    from jaxdiff_info.data import DATASETS

    def preset(name: str) -> str:
        """The per-config defaults of a setting, for its help."""
        return "default: " + ", ".join(f"{model} {values[name]:g}" for model, values in training.PRESETS.items())

    base = training.TrainConfig
    p.add_argument("--config", choices=list(unet.CONFIGS), default=None,
                   help="model config, sized for the dataset's images (default: the resumed run's, else tiny)")
    p.add_argument("--dataset", choices=list(DATASETS), default=None,
                   help="training data (default: the resumed run's, else shapes)")
    p.add_argument("--checkpoint-dir", type=cli.folder, default=None,
                   help="checkpoints, config.json, metrics.jsonl, samples/ (default checkpoints/<config>-<dataset>)")
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="where the CIFAR-10 archive is (or is downloaded to) (default %(default)s)")
    p.add_argument("--steps", type=int, help=f"total training steps ({preset('steps')})")
    p.add_argument("--batch-size", type=int,
                   help=f"global batch, a multiple of the device count ({preset('batch_size')})")
    p.add_argument("--lr", type=float, help=f"Adam learning rate after the warm-up ({preset('lr')})")
    p.add_argument("--warmup", type=int, help=f"steps of linear learning-rate warm-up ({preset('warmup')})")
    p.add_argument("--grad-clip", type=float, help=f"clip gradients to this global norm (default {base.grad_clip:g})")
    p.add_argument("--ema", type=float, help=f"EMA decay of the weights (default: ddpm {training.EMA['ddpm']:g}, "
                                             f"others {training.DEFAULT_EMA:g})")
    p.add_argument("--label-dropout", type=float,
                   help=f"probability of training on the null label (default {base.label_dropout:g})")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default on; off for digits, whose mirror images are no digits)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 compute with float32 master weights (default off)")
    p.add_argument("--seed", type=int, help="seed of the initialisation, the noise and the data order (default 0)")
    p.add_argument("--num-examples", type=int, help="train on the first N images only (default: all)")
    p.add_argument("--save-every", type=int, help=f"steps between checkpoints ({preset('save_every')})")
    p.add_argument("--keep", type=int, help=f"checkpoints to keep (default {base.keep})")
    p.add_argument("--steps-per-call", type=int,
                   help=f"training steps fused in one compiled call ({preset('steps_per_call')})")
    p.add_argument("--log-every", type=int, help=f"steps per line of metrics.jsonl ({preset('log_every')})")
    p.add_argument("--samples-per-class", type=int,
                   help=f"images per class in the sample grid of each checkpoint (default {base.samples_per_class}; "
                        f"0: none)")
    p.add_argument("--sample-steps", type=int,
                   help=f"DDPM steps of those samples ({preset('sample_steps')})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(a: argparse.Namespace):
    """The TrainConfig: explicit flags, else the resumed run's settings, else the preset."""
    from jaxdiff_info import training, unet

    directory = a.checkpoint_dir or Path("checkpoints") / f"{a.config or 'tiny'}-{a.dataset or 'shapes'}"
    stored = training.read_run_info(directory)
    model = a.config or (stored.config_name if stored else "tiny")
    dataset = a.dataset or (stored.dataset if stored else "shapes")
    custom = None
    if stored and model == stored.config_name and model not in unet.CONFIGS:
        custom = stored.config  # a run of a config that is not in unet.CONFIGS: its own fields
    values = dict(training.PRESETS.get(model, training.PRESETS["ddpm"]))
    if stored:
        values.update({k: v for k, v in stored.training.items() if k in SETTINGS})
    values.update({k: getattr(a, k) for k in SETTINGS if getattr(a, k) is not None})
    return training.TrainConfig(model=model, dataset=dataset, checkpoint_dir=directory,
                                data_dir=a.data_dir, unet=custom, **values)


def run_from_args(a: argparse.Namespace) -> int:
    """The CLI: 0 when done, 2 (one line on stderr, nothing written) on bad input, 130/143 on a signal."""
    from jaxdiff_info import distributed, training

    start = time.perf_counter()

    def command():
        config = config_from_args(a)
        if distributed.initialize():  # (train would start it; here first, to filter its fatal errors)
            distributed.one_line_fatal_errors()
        return config, training.train(config, progress=not a.no_progress)

    try:
        status, result = run_command(PROG, command)
    except training.TrainingInterrupted as e:
        clear = "\r\x1b[K" if sys.stderr.isatty() else ""  # over the "finishing the step" status line
        print(f"{clear}{PROG}: {e}", file=sys.stderr)
        return 128 + e.signum
    if status:
        return status
    config, state = result
    step = int(state.step)
    print(f"trained {config.model} on {config.dataset} to step {step} in {time.perf_counter() - start:.0f} s; "
          f"checkpoints in {config.checkpoint_dir}/")
    grid = Path(config.checkpoint_dir) / training.SAMPLES_DIR / f"step_{step:07d}.png"
    if grid.exists():
        print(f"samples: {grid}")
    return 0
