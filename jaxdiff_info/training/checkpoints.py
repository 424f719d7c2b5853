"""The files of a training directory: config.json, the orbax checkpoints, and loading them back.

Checkpoints (orbax ``CheckpointManager``) hold the step, the parameters, their EMA, the
optimiser state and the key; with the data order a function of the step, a resumed run
continues exactly as if it had never stopped (bitwise, for the same ``steps_per_call`` and
devices). Orbax writes each checkpoint into a temporary folder and renames it when it is
complete, so a half-written checkpoint never counts. Next to the checkpoints,
``config.json`` records the model (its config name and every UNetConfig field), the dataset
(class names and decision problems) and the training settings, so that another program
can rebuild the network (``load_checkpoint``). ``_check_directory`` decides, before
anything is written, whether a run may use a directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxdiff_info import unet
from jaxdiff_info.data import Dataset
from jaxdiff_info.training.config import (CONFIG_FILE, FORMAT, METRICS_FILE, NUM_TRAIN_STEPS, RNG_IMPL, SAMPLES_DIR,
                                          TRAJECTORY_FIELDS, TrainConfig, _one_line)
from jaxdiff_info.training.input_pipeline import _replicated, data_mesh
from jaxdiff_info.training.step import TrainState


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
    params: nnx.State  # EMA weights unless use_ema=False; replicated on every device (of every process)
    step: int
    dataset: str
    num_train_steps: int
    class_names: tuple[str, ...]
    decision_problems: dict[str, list[list[int]]]
    label_dropout: float = 0.1  # the training's; 0: the null class was never trained

    @property
    def has_null(self) -> bool:
        """Whether eps(x_t, t, null) was trained (label dropout > 0)."""
        return self.label_dropout > 0


def load_checkpoint(checkpoint_dir: str | os.PathLike, *, step: int | None = None,
                    use_ema: bool = True) -> LoadedModel:
    """The network of a training directory: its config (from config.json) and weights.

    step: which checkpoint (default the latest); use_ema: the EMA weights (default) or the
    raw ones. The parameters are restored replicated on every device of every process (under
    jax.distributed, all processes must call it), whatever devices wrote them. ValueError, one
    line, when the directory, config.json or the checkpoint is missing or unreadable.
    """
    import orbax.checkpoint as ocp

    directory = Path(checkpoint_dir)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file, not a training directory; pass the --checkpoint-dir used for "
                         f"training (a folder with config.json)")
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
        mesh = data_mesh()  # every device of every process: one process, or all of a jax.distributed job
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
                       class_names=info.class_names, decision_problems=info.decision_problems,
                       label_dropout=float(info.training.get("label_dropout", 0.1)))


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
        same_name = (info.config_name, info.dataset) == (config.model, config.dataset) and info.config != net
        theirs = f"model {info.config_name!r}{' (other fields)' if same_name else ''} on {info.dataset}"
        raise ValueError(f"{directory} holds a run of {theirs}, not model {config.model!r} on {config.dataset}; "
                         f"choose another --checkpoint-dir (nothing was written)")
    if latest is None and _checkpointed(directory, info):
        raise ValueError(f"{directory} holds a run that saved checkpoints (its {METRICS_FILE} or sample grids say so), "
                         f"but none is left: choose another --checkpoint-dir, or remove {directory} to train from "
                         f"step 0 there")
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


def _checkpointed(directory: Path, info: RunInfo) -> bool:
    """Whether the run of `directory` wrote a checkpoint: a sample grid (one per checkpoint), or
    a metrics line at or past its first save (save_every, or its last step)."""
    if any((directory / SAMPLES_DIR).glob("step_*.png")):
        return True
    first_save = min(info.training.get("save_every") or 0, info.training.get("steps") or 0)
    try:
        lines = (directory / METRICS_FILE).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        try:
            if first_save and json.loads(line)["step"] >= first_save:
                return True
        except (ValueError, KeyError, TypeError):
            continue
    return False
