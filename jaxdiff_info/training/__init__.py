"""Training the class-conditional U-Net, checkpoints that resume exactly, and loading them back.

The objective is the eps-prediction loss of Ho et al. (2020) on the DDPM linear schedule
(T = 1000), with the label dropped to the null class with probability 0.1 so that one
network gives both eps(x_t, t, k) and the unconditional eps(x_t, t, null). Adam with a
linear learning-rate warm-up and gradient clipping at global norm 1, and an EMA of the
weights, the ones used for sampling and analysis. Training is data parallel over every
device of every process; all its randomness comes from one "rbg" key in the state and the
data order is a function of (seed, step), so a resumed run continues bitwise as if it had
never stopped. Each module's docstring has the details.

Pieces, each usable on its own::

    state = init_state(net, config, mesh)          # TrainState: step, params, EMA, Adam, key
    train_step = make_train_step(net, config, mesh)
    state, metrics = train_step(state, batch)      # batch: {"images": uint8 (B,H,W,C), "labels": (B,)}
    train(config)                                  # the whole loop: data, checkpoints, samples
    model = load_checkpoint("checkpoints/tiny-shapes")   # LoadedModel, EMA params by default

Where things are:

==================  ==========================================================================
``config``          TrainConfig, PRESETS, EMA, DEFAULT_EMA, TRAJECTORY_FIELDS, the file names
                    (CONFIG_FILE, METRICS_FILE, SAMPLES_DIR), FORMAT, RNG_IMPL, DATA_SEED,
                    NUM_TRAIN_STEPS
``objective``       diffusion_loss, learning_rate, make_optimizer
``input_pipeline``  initialize_distributed, data_mesh, batch_indices, Batches (devices, data order)
``step``            TrainState, make_train_step, make_train_steps, init_state, abstract_state
``checkpoints``     RunInfo, read_run_info, LoadedModel, load_checkpoint, latest_step, config.json,
                    the orbax checkpoints, the checks of a training directory
``sampling``        sample (DDPM on ``tracking.generate``), the sample-grid figure
``loop``            train, TrainingInterrupted (SIGINT/SIGTERM), metrics.jsonl, the sample grids
==================  ==========================================================================

Each module imports only the ones above it in this table, never this package.
"""

from jaxdiff_info.training.config import (CONFIG_FILE, DATA_SEED, DEFAULT_EMA, EMA, FORMAT, METRICS_FILE,
                                          NUM_TRAIN_STEPS, PRESETS, RNG_IMPL, SAMPLES_DIR, TRAJECTORY_FIELDS,
                                          TrainConfig)
from jaxdiff_info.training.objective import diffusion_loss, learning_rate, make_optimizer
from jaxdiff_info.training.input_pipeline import Batches, batch_indices, data_mesh, initialize_distributed
from jaxdiff_info.training.step import (TrainState, abstract_state, init_state, make_train_step,
                                        make_train_steps)
from jaxdiff_info.training.checkpoints import (LoadedModel, RunInfo, latest_step, load_checkpoint,
                                               read_run_info)
from jaxdiff_info.training.sampling import sample
from jaxdiff_info.training.loop import TrainingInterrupted, train

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
    "sample",
    "train",
    "load_checkpoint",
    "read_run_info",
    "latest_step",
    "abstract_state",
    "NUM_TRAIN_STEPS",
    "CONFIG_FILE",
    "METRICS_FILE",
    "SAMPLES_DIR",
    "FORMAT",
    "RNG_IMPL",
    "DATA_SEED",
    "EMA",
    "DEFAULT_EMA",
    "TRAJECTORY_FIELDS",
]
