"""The training loop: data, steps, metrics, checkpoints and sample grids of a whole run.

``train(config)`` resumes from the latest checkpoint of ``config.checkpoint_dir`` (or starts
at step 0), then writes, next to the checkpoints, ``metrics.jsonl`` (one line per
``log_every`` steps) and ``samples/step_XXXXXXX.png`` (a grid of EMA samples, one row per
class, at every checkpoint).

Stopping. On SIGINT (Ctrl-C) or SIGTERM, ``train`` finishes the call in flight, saves a
checkpoint (without a sample grid) and raises ``TrainingInterrupted``; the progress bar says so
meanwhile, and the CLI then prints one line and exits with status 130 or 143 (128 + the
signal's number). A second signal acts as usual.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdiff_info.data import load_dataset
from jaxdiff_info.training.checkpoints import _check_directory, _manager, _restore, _run_json, _save
from jaxdiff_info.training.config import CONFIG_FILE, DATA_SEED, METRICS_FILE, RNG_IMPL, SAMPLES_DIR, TrainConfig
from jaxdiff_info.training.input_pipeline import Batches, data_mesh, initialize_distributed
from jaxdiff_info.training.sampling import _sample_grid_figure, sample
from jaxdiff_info.training.step import TrainState, abstract_state, init_state, make_train_step, make_train_steps


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint of ``state``."""

    def __init__(self, signum: int, state: TrainState, checkpoint_dir: Path):
        self.signum, self.state, self.checkpoint_dir = signum, state, checkpoint_dir
        self.step = int(state.step)
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {self.step}; a checkpoint is in "
                         f"{checkpoint_dir}; run the same command again to resume")


class _StopOnSignal:
    """Remembers a SIGINT or SIGTERM instead of dying; a second one acts as usual. On the first,
    `notify(message)` says that the run is stopping (the progress bar's status; on a terminal
    without one, a line that the CLI's last line then replaces)."""

    def __init__(self, notify=None):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._notify = notify

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        self._restore()
        if self._notify is not None:
            self._notify(f"{signal.Signals(signum).name}: finishing the step, saving a checkpoint (again: abort)")

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


def _append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines after ``step``, the checkpoint a run starts from (lines of a run killed
    after its last checkpoint, or before its first: step 0)."""
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
    """samples/step_XXXXXXX.png: ``samples_per_class`` EMA samples of every class, the same noise at
    every step. Every process samples (the arrays span all devices); only the primary one writes."""
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
    try:
        if primary:
            directory.mkdir(parents=True, exist_ok=True)
            results.write_json(directory / CONFIG_FILE, _run_json(config, dataset))
            _truncate_metrics(directory / METRICS_FILE, latest or 0)
        manager = _manager(directory, config.keep, create=True)
    except OSError as e:
        raise ValueError(f"cannot write checkpoints to {directory}: {e.strerror or e}; choose another "
                         f"--checkpoint-dir") from None

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

    def notify(message: str) -> None:
        if not bar.disable:
            bar.set_description(f"{bar.desc}; {message}")
        elif primary and sys.stderr.isatty():
            sys.stderr.write(f"\r{message}")  # the CLI's last line goes over it
            sys.stderr.flush()

    try:
        with _StopOnSignal(notify) as stop:
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
