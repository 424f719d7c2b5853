"""When does a trained image model decide its class? `python -m experiments.cifar10 analyze`.

For every class, N trajectories are generated with the trained model; the online Bayesian
classifier tracks P(k | x_t) for all K classes along them, in the same compiled loop as for
mixtures (jaxdiff_info.tracking). Writes into --out: summary.json (the mixture experiment's
schema, plus "classes"), curves.npz, class_entropy_rate.png, entropy_rate.png,
posterior_paths.png, posterior_heatmap.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

OUTPUTS = ("summary.json", "curves.npz", "class_entropy_rate.png", "entropy_rate.png",
           "posterior_paths.png", "posterior_heatmap.png")


@dataclasses.dataclass(frozen=True)
class AnalyzeConfig:
    """Everything one analysis depends on; the CLI builds it."""

    checkpoint: Path
    out: Path = Path("results/cifar10")
    samples_per_class: int = 64
    steps: int | None = None  # None: every step of the model's training schedule
    variance: str = "large"
    clip_x0: bool = True
    generation: str = "conditional"
    guidance: float = 0.0
    batch_size: int | None = None  # trajectories per network call (None: all at once)
    use_ema: bool = True
    checkpoint_step: int | None = None
    seed: int = 0
    bandwidth: float = 0.02
    num_resamples: int = 200
    paths_per_class: int = 2
    num_snapshots: int = 6
    overwrite: bool = False
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class Analysis:
    """What `analyze` measured (host arrays). curves: per decision problem, estimator "online";
    class_curves: H(Y | X_t) of the trajectories of each class (None when unconditional);
    mean_posterior (T, K', K): P(k | x_t) averaged over the trajectories of each generating
    class; paths: log P(k | x_t) (T, M, K) of M recorded trajectories of classes path_classes;
    snapshots: list of (t, x_t (M, ...), predicted x_0 (M, ...))."""

    time: np.ndarray
    problems: tuple
    prior_entropy_bits: np.ndarray
    curves: Any
    class_curves: Any
    mean_posterior: np.ndarray
    paths: np.ndarray
    path_classes: np.ndarray
    snapshots: list
    x_0: np.ndarray
    sampler: str


def analyze(
    eps_fn: Callable,
    params: Any,
    schedule,
    *,
    num_classes: int,
    problems: Sequence,
    shape: tuple[int, ...],
    samples_per_class: int,
    key,
    variance: str = "large",
    clip_x0: float | None = None,
    generation: str = "conditional",
    guidance: float = 0.0,
    batch_size: int | None = None,
    bandwidth: float = 0.02,
    num_resamples: int = 200,
    paths_per_class: int = 2,
    num_snapshots: int = 6,
    progress: Callable[[int], None] | None = None,
) -> Analysis:
    """Generate and track; any class-conditional eps(params, x_t, t, k), k = num_classes null.

    The weights of the classes are taken equal (the model was trained on balanced classes).
    """
    import jax
    import jax.numpy as jnp

    from jaxdiff_info import curves as C
    from jaxdiff_info import decisions, estimators
    from jaxdiff_info.schedule import Sampler, eps_to_x0
    from jaxdiff_info.tracking import Tracker

    if samples_per_class < 2:
        raise ValueError(f"--samples-per-class must be >= 2 (for confidence intervals), got {samples_per_class}")
    if generation not in ("conditional", "unconditional"):
        raise ValueError(f"unknown generation {generation!r}; choose conditional or unconditional")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    K = num_classes
    sampler = Sampler("ddpm", variance, clip_x0=clip_x0)
    tracker = Tracker(eps_fn, schedule, sampler, K, guidance=guidance, batch_size=batch_size)
    unconditional = generation == "unconditional"
    weights = np.full(K, 1.0 / K)
    log_prior = jnp.log(jnp.asarray(weights, jnp.float32))
    membership = decisions.membership(problems, K)
    problem_weights = decisions.class_weights(problems, weights)
    prior = decisions.prior_entropy_bits(problems, weights)
    time_grid = np.asarray(schedule.time)

    if unconditional:
        blocks = estimators.make_blocks(1, samples_per_class * K)
        generating = np.full(blocks.per_class, K)
        block_weights = np.ones((len(problems), 1))
    else:
        blocks = estimators.make_blocks(K, samples_per_class)
        generating = blocks.classes
        block_weights = problem_weights
    n_paths = min(paths_per_class, samples_per_class)
    path_index = np.concatenate([np.flatnonzero(generating == c)[:n_paths] for c in np.unique(generating)])
    per_group = blocks.per_class

    def record(x, log_post):
        mean_post = blocks.sums(jnp.exp(log_post)).sum(axis=1) / per_group  # (groups, K)
        return log_post[path_index], mean_post

    snapshot_every = max(1, -(-schedule.num_steps // max(num_snapshots - 1, 1)))
    predict_x0 = jax.jit(lambda p, x, t, c: jax.vmap(
        lambda xi, ci: eps_to_x0(xi, eps_fn(p, xi, schedule.timesteps[t - 1], ci), schedule.alpha_bar[t - 1]))(x, c))
    snapshots = []

    def snapshot(t, state):
        x = state.x[jnp.asarray(path_index)]
        x0 = x if t == 0 else predict_x0(params, x, t, jnp.asarray(generating[path_index]))
        snapshots.append((t, np.asarray(x), np.asarray(x0)))

    sharding = _trajectory_sharding(len(generating))
    run = estimators.online_block_sums(
        tracker, params, log_prior, shape, membership, blocks, key, record=record, chunk=snapshot_every,
        progress=progress, unconditional=unconditional, after_chunk=snapshot, sharding=sharding)
    paths, mean_post = run.paths
    key_boot = jax.random.fold_in(key, 7)
    curves = C.curves_from_blocks(key_boot, time_grid, run.block_sums, blocks.counts, block_weights, bandwidth,
                                  num_resamples)
    class_curves = None
    if not unconditional:
        label = next(i for i, p in enumerate(problems) if sorted(map(len, p.groups)) == [1] * K)
        per_class = np.repeat(run.block_sums[..., label:label + 1], K, axis=-1)  # (T, K, B, K)
        class_curves = C.curves_from_blocks(jax.random.fold_in(key, 8), time_grid, per_class, blocks.counts,
                                            np.eye(K), bandwidth, num_resamples)
    return Analysis(time_grid, tuple(problems), prior, curves, class_curves, mean_post, paths,
                    generating[path_index], snapshots, run.x_0, sampler.describe())


def _trajectory_sharding(num: int):
    """Data-parallel over all local devices when the trajectories split evenly."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) < 2 or num % len(devices):
        return None
    return NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))


# --- the CLI edge ----------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder written by `train`")
    p.add_argument("--samples-per-class", type=int, default=AnalyzeConfig.samples_per_class,
                   help="trajectories generated from each class (default %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps T, respaced from the model's schedule (default: all of them)")
    p.add_argument("--variance", choices=["small", "large"], default=AnalyzeConfig.variance,
                   help="reverse-step variance: large = beta_t (Ho et al. for CIFAR-10), small = beta~_t")
    p.add_argument("--no-clip", action="store_true",
                   help="do not clip the predicted x_0 to [-1, 1] in each step (Ho et al. clip; the tracker "
                        "uses whichever kernel generates)")
    p.add_argument("--generation", choices=["conditional", "unconditional"], default=AnalyzeConfig.generation,
                   help="generate from each class (per-class profiles) or from the null class")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance weight w (default 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="trajectories per network call (each call evaluates all K classes); default: all")
    p.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of their EMA")
    p.add_argument("--checkpoint-step", type=int, default=None, help="which saved step (default: the latest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bandwidth", type=float, default=AnalyzeConfig.bandwidth,
                   help="smoothing of the entropy rates in normalised time (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=AnalyzeConfig.num_resamples)
    p.add_argument("--out", type=Path, default=AnalyzeConfig.out)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def config_from_args(a: argparse.Namespace) -> AnalyzeConfig:
    return AnalyzeConfig(
        checkpoint=a.checkpoint, out=a.out, samples_per_class=a.samples_per_class, steps=a.steps,
        variance=a.variance, clip_x0=not a.no_clip, generation=a.generation, guidance=a.guidance, batch_size=a.batch_size,
        use_ema=not a.raw_weights, checkpoint_step=a.checkpoint_step, seed=a.seed, bandwidth=a.bandwidth,
        num_resamples=a.bootstrap, overwrite=a.overwrite, progress=not a.no_progress)


def run_from_args(a: argparse.Namespace) -> int:
    """The CLI: 0 on success, 2 (and one line on stderr) on bad input."""
    try:
        config = config_from_args(a)
        start = time.perf_counter()
        summary = run(config)
    except ValueError as e:
        print(f"python -m experiments.cifar10 analyze: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(OUTPUTS)} to {config.out}/ in {time.perf_counter() - start:.1f} s")
    for problem in summary["problems"]:
        ci = problem["peak_time_ci95"]["online"]
        half, half_ci = problem["half_time"]["online"], problem["half_time_ci95"]["online"]
        print(f"  {problem['name']:<24s} peak t/T {problem['peak_time']['online']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}),"
              f"  half of H resolved at t/T {half:.3f} (95% CI {half_ci[0]:.3f}-{half_ci[1]:.3f})")
    return 0


def run(config: AnalyzeConfig) -> dict:
    import jax
    from tqdm import tqdm

    from jaxdiff_info import decisions, results, training, unet
    from jaxdiff_info.schedule import linear_schedule, respace

    if config.samples_per_class < 2:
        raise ValueError(f"--samples-per-class must be >= 2, got {config.samples_per_class}")
    if config.steps is not None and config.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {config.steps}")
    model = training.load_checkpoint(config.checkpoint, step=config.checkpoint_step, use_ema=config.use_ema)
    train_schedule = linear_schedule(model.num_train_steps)
    schedule = train_schedule if config.steps in (None, model.num_train_steps) else respace(train_schedule, config.steps)
    out = results.prepare_output_dir(config.out, OUTPUTS, config.overwrite)

    K = model.config.num_classes
    class_names = list(model.class_names)
    problems = [decisions.make_problem("class", [[k] for k in range(K)], K)]
    problems += list(decisions.make_problems(model.decision_problems, K)) if model.decision_problems else []
    shape = (model.config.image_size, model.config.image_size, model.config.channels)
    bar = tqdm(total=schedule.num_steps, unit="step", desc="analyze", disable=not config.progress, file=sys.stderr)
    result = analyze(
        unet.make_eps_fn(model.config), model.params, schedule, num_classes=K, problems=problems, shape=shape,
        samples_per_class=config.samples_per_class, key=jax.random.key(config.seed), variance=config.variance,
        clip_x0=1.0 if config.clip_x0 else None, generation=config.generation, guidance=config.guidance, batch_size=config.batch_size,
        bandwidth=config.bandwidth, num_resamples=config.num_resamples, paths_per_class=config.paths_per_class,
        num_snapshots=config.num_snapshots, progress=bar.update)
    bar.close()
    summary = write_outputs(out, result, class_names, {
        "checkpoint": str(config.checkpoint), "checkpoint_step": model.step, "model_config": model.config_name,
        "dataset": model.dataset, "weights": "ema" if config.use_ema else "raw",
        "schedule": {"steps": schedule.num_steps, "train_steps": model.num_train_steps},
        "generation": config.generation, "guidance": config.guidance,
        "num_samples_per_class": config.samples_per_class, "seed": config.seed, "rate_bandwidth": config.bandwidth,
    })
    return summary


def write_outputs(out: Path, result: Analysis, class_names: Sequence[str], settings: dict) -> dict:
    """summary.json, curves.npz and the figures of one analysis."""
    from jaxdiff_info import plots, results

    curves = {"online": result.curves}
    summary = {**settings, "sampler": result.sampler, "class_names": list(class_names), "estimators": ["online"],
               "problems": [results.problem_summary(i, p, result.prior_entropy_bits[i], curves)
                            for i, p in enumerate(result.problems)]}
    if result.class_curves is not None:
        cc = result.class_curves
        summary["classes"] = [
            {"name": name, "index": k, "time": np.round(cc.time, 6).tolist(),
             "entropy_bits": np.round(cc.entropy_bits[:, k], 6).tolist(),
             "entropy_rate": np.round(cc.entropy_rate[:, k], 6).tolist(),
             "peak_time": round(float(cc.peak_time[k]), 6),
             "peak_time_ci95": np.round(cc.peak_time_ci95[:, k], 6).tolist(),
             "half_time": round(float(cc.half_time[k]), 6),
             "half_time_ci95": np.round(cc.half_time_ci95[:, k], 6).tolist()}
            for k, name in enumerate(class_names)]
    results.write_json(out / "summary.json", summary)
    arrays = {"time": result.time, "prior_entropy_bits": result.prior_entropy_bits,
              "problem_names": np.array([p.name for p in result.problems]), "mean_posterior": result.mean_posterior,
              "paths/log_posterior": result.paths, "paths/classes": result.path_classes, "x_0": result.x_0,
              "snapshots/t": np.array([s[0] for s in result.snapshots]),
              "snapshots/x_t": np.stack([s[1] for s in result.snapshots]),
              "snapshots/x0_hat": np.stack([s[2] for s in result.snapshots]),
              **results.curves_arrays(curves)}
    if result.class_curves is not None:
        arrays.update({f"classes/{k}": v for k, v in results.curves_arrays({"online": result.class_curves}).items()})
    results.write_npz(out / "curves.npz", arrays)

    num_train = settings.get("schedule", {}).get("train_steps", len(result.time))
    figures = {
        "entropy_rate.png": plots.curves_figure(result.problems, curves, "entropy_rate", "dH/d(t/T)  [bits]"),
        "posterior_heatmap.png": plots.posterior_heatmap_figure(result.time, result.mean_posterior, class_names),
        "posterior_paths.png": plots.snapshot_paths_figure(
            result.time, result.paths, result.path_classes, result.snapshots, class_names, num_train),
    }
    if result.class_curves is not None:
        figures["class_entropy_rate.png"] = plots.class_curves_figure(result.class_curves, class_names)
    else:
        figures["class_entropy_rate.png"] = plots.curves_figure(result.problems[:1], curves, "entropy_rate",
                                                                "dH/d(t/T)  [bits]")
    for name, fig in figures.items():
        results.save_figure(fig, out / name)
        plots.plt.close(fig)
    return summary
