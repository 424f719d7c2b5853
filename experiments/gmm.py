"""When is the class decided? Gaussian mixtures, where every number has an exact answer.

    python -m experiments.gmm                       # the paper's 1-D figure: points at -8, -4, 6, 8
    python -m experiments.gmm --spec mixture.json   # any mixture, any dimension

Writes into --out: summary.json, curves.npz, entropy_rate.png, entropy.png,
posterior_paths.png, density.png. See the README for the schema.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import enable_compilation_cache

OUTPUTS = ("summary.json", "curves.npz", "entropy_rate.png", "entropy.png", "posterior_paths.png", "density.png")

PAPER_SPEC: dict[str, Any] = {
    "means": [[-8.0], [-4.0], [6.0], [8.0]],
    "stds": [0.0, 0.0, 0.0, 0.0],
    "weights": [0.25, 0.25, 0.25, 0.25],
    "decisions": {
        "all four": [[0], [1], [2], [3]],
        "{-8,-4} vs {6,8}": [[0, 1], [2, 3]],
        "-8 vs -4": [[0], [1]],
        "6 vs 8": [[2], [3]],
        "-8 vs rest": [[0], [1, 2, 3]],
        "-4 vs rest": [[1], [0, 2, 3]],
        "6 vs rest": [[2], [0, 1, 3]],
        "8 vs rest": [[3], [0, 1, 2]],
    },
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run depends on; the CLI builds it."""

    spec: dict
    out: Path = Path("results/gmm")
    num_samples: int = 2000  # trajectories per class, for each Monte Carlo estimator
    steps: int = 1000
    schedule: str = "linear"
    variance: str = "small"
    seed: int = 0
    bandwidth: float = 0.01  # entropy-rate smoothing of the Monte Carlo curves, in t/T
    num_resamples: int = 200
    num_blocks: int = 32
    paths_per_class: int = 4
    save_every: int = 0  # > 0: also write every trajectory, every n-th step, to trajectories.npz
    overwrite: bool = False
    progress: bool = True


# --- spec ------------------------------------------------------------------------------------

def load_spec(path: str | Path) -> dict:
    """Read a mixture spec JSON file; errors name the file and what is wrong."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"cannot read spec {path}: {e.strerror}") from None
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"spec {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"spec {path} must be a JSON object with keys means, stds, weights, decisions")
    return spec


def build_problem(spec: dict):
    """The mixture and decision problems of a spec (validated)."""
    from jaxdiff_info import decisions, mixture

    unknown = set(spec) - {"means", "stds", "weights", "decisions"}
    if unknown:
        raise ValueError(f"spec has unknown keys {sorted(unknown)}; allowed: means, stds, weights, decisions")
    if "means" not in spec:
        raise ValueError("spec needs 'means': a list of component means (numbers for 1-D, lists for d-D)")

    mix = mixture.make_mixture(spec["means"], spec.get("stds"), spec.get("weights"))
    k = mix.num_components
    groups = spec.get("decisions")
    if groups is None:
        problems = [decisions.class_label(k)] + ([decisions.one_vs_rest(j, k) for j in range(k)] if k > 2 else [])
    else:
        if not isinstance(groups, dict):
            raise ValueError("spec 'decisions' must be an object {name: [[classes of group 0], [group 1], ...]}")
        problems = decisions.make_problems(groups, k)
    return mix, tuple(problems)


# --- the run -------------------------------------------------------------------------------

def run(config: Config) -> dict:
    """Compute every estimator, write the result files, and return the summary."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from jaxdiff_info import curves as C
    from jaxdiff_info import decisions, estimators, mixture, plots, results
    from jaxdiff_info.schedule import Sampler, make_schedule
    from jaxdiff_info.tracking import Tracker

    mix, problems = build_problem(config.spec)
    schedule = make_schedule(config.schedule, config.steps)
    sampler = Sampler("ddpm", config.variance)
    blocks = estimators.make_blocks(mix.num_components, config.num_samples, config.num_blocks)
    if config.bandwidth < 0 or not np.isfinite(config.bandwidth):
        raise ValueError(f"--bandwidth must be a finite number >= 0, got {config.bandwidth}")
    if config.save_every < 0:
        raise ValueError(f"--save-every must be >= 0, got {config.save_every}")
    outputs = OUTPUTS + (("trajectories.npz",) if config.save_every else ())
    out = results.prepare_output_dir(config.out, outputs, config.overwrite)

    K = mix.num_components
    time_grid = np.asarray(schedule.time)
    weights = np.asarray(mix.weights, np.float64)
    membership = decisions.membership(problems, K)
    class_weights = decisions.class_weights(problems, weights)
    prior = decisions.prior_entropy_bits(problems, weights)
    key_fmc, key_online, key_boot = jax.random.split(jax.random.key(config.seed), 3)

    n_paths = min(config.paths_per_class, config.num_samples)
    path_index = (np.arange(K)[:, None] * config.num_samples + np.arange(n_paths)).ravel()
    path_classes = blocks.classes[path_index]

    def record(x, log_post):
        """Per step: a few paths (first coordinate and posterior) and the mean posterior per class."""
        mean_post = blocks.sums(jnp.exp(log_post)).sum(axis=1) / config.num_samples
        return x[path_index, 0], log_post[path_index], mean_post

    curves: dict[str, C.Curves] = {}
    bar = tqdm(total=2 * config.steps + (config.steps if mix.dim == 1 else 0), unit="step",
               desc="gmm", disable=not config.progress, file=sys.stderr)
    if mix.dim == 1:
        bar.set_postfix_str("exact (quadrature)")
        exact = estimators.quadrature_class_entropy(mix, schedule, membership)
        curves["exact"] = C.curves_from_profiles(time_grid, exact, class_weights)
        bar.update(config.steps)

    bar.set_postfix_str("forward Monte Carlo")
    fmc = estimators.forward_mc_block_sums(mix, schedule, membership, blocks, key_fmc)
    curves["forward_mc"] = C.curves_from_blocks(
        jax.random.fold_in(key_boot, 0), time_grid, fmc, blocks.counts, class_weights, config.bandwidth, config.num_resamples)
    bar.update(config.steps)

    bar.set_postfix_str("online classifier")
    tracker = Tracker(mixture.eps_fn(schedule, with_null=False), schedule, sampler, K, batch_size=2048)
    saved: list = []

    def save(t, state):
        saved.append((t, np.asarray(state.x), np.asarray(state.log_posterior)))

    online = estimators.online_block_sums(
        tracker, mix, mix.log_weights, (mix.dim,), membership, blocks, key_online,
        record=record, chunk=config.save_every or max(1, config.steps // 20), progress=bar.update,
        after_chunk=save if config.save_every else None)
    curves["online"] = C.curves_from_blocks(
        jax.random.fold_in(key_boot, 1), time_grid, online.block_sums, blocks.counts, class_weights, config.bandwidth,
        config.num_resamples)
    bar.close()
    paths_x, paths_log_post, mean_post = online.paths

    for name, c in curves.items():
        for field in ("entropy_bits", "entropy_rate"):
            if not np.all(np.isfinite(getattr(c, field))):
                raise FloatingPointError(f"non-finite {field} from the {name} estimator")

    summary = {
        "mixture": {
            "means": np.asarray(mix.means).tolist(),
            "stds": np.asarray(mix.stds).tolist(),
            "weights": weights.tolist(),
        },
        "schedule": {"name": config.schedule, "steps": config.steps},
        "sampler": sampler.describe(),
        "num_samples_per_class": config.num_samples,
        "seed": config.seed,
        "rate_bandwidth": {"exact": 0.0, "forward_mc": config.bandwidth, "online": config.bandwidth},
        "estimators": list(curves),
        "problems": [results.problem_summary(i, p, prior[i], curves) for i, p in enumerate(problems)],
    }
    results.write_json(out / "summary.json", summary)
    results.write_npz(out / "curves.npz", {
        "time": time_grid,
        "prior_entropy_bits": prior,
        "problem_names": np.array([p.name for p in problems]),
        "paths/x": paths_x, "paths/log_posterior": paths_log_post, "paths/classes": path_classes,
        "mean_posterior": mean_post,
        "x_0": online.x_0, "x_0_classes": blocks.classes,
        **results.curves_arrays(curves),
    })

    if saved:
        steps = np.array([t for t, _, _ in saved])
        results.write_npz(out / "trajectories.npz", {
            "t": steps, "time": np.where(steps > 0, time_grid[np.maximum(steps - 1, 0)], 0.0),
            "x": np.stack([x for _, x, _ in saved]), "log_posterior": np.stack([lp for _, _, lp in saved]),
            "classes": blocks.classes})

    class_names = [_component_name(mix, k) for k in range(K)]
    figures = {
        "entropy_rate.png": plots.curves_figure(problems, curves, "entropy_rate", "dH/d(t/T)  [bits]"),
        "entropy.png": plots.curves_figure(problems, curves, "entropy_bits", "H(Z | X_t)  [bits]"),
        "posterior_paths.png": plots.posterior_paths_figure(time_grid, paths_log_post, path_classes, mean_post, class_names),
        "density.png": _density_figure(mix, schedule, time_grid, paths_x, path_classes),
    }
    for name, fig in figures.items():
        results.save_figure(fig, out / name)
        plots.plt.close(fig)
    return summary


def _component_name(mix, k: int) -> str:
    m = np.asarray(mix.means[k])
    return f"{m[0]:g}" if m.shape[0] == 1 else f"class {k}"


def _density_figure(mix, schedule, time_grid, paths_x, path_classes):
    """Exact marginal density of the first coordinate of x_t (a 1-D mixture itself)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff_info import mixture, plots

    first = mixture.GaussianMixture(mix.means[:, :1], mix.stds, mix.log_weights)
    lo = min(float(jnp.min(first.means)), float(np.min(paths_x))) - 3.0
    hi = max(float(jnp.max(first.means)), float(np.max(paths_x))) + 3.0
    grid = np.linspace(lo, hi, 300)
    log_density = jax.jit(jax.vmap(lambda ab: jax.vmap(mixture.log_prob, (None, 0, None))(
        first, jnp.asarray(grid)[:, None], ab)))(schedule.alpha_bar)
    xlabel = "x_t" if mix.dim == 1 else "first coordinate of x_t"
    return plots.density_figure(time_grid, grid, np.asarray(log_density), paths_x, path_classes, xlabel)


# --- CLI ---------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv: Sequence[str] | None) -> Config:
    p = _Parser(prog="python -m experiments.gmm", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=str, default=None,
                   help='mixture JSON: {"means": [...], "stds": [...], "weights": [...], "decisions": {name: [[...], ...]}}; '
                        "default: the paper's points at -8, -4, 6, 8")
    p.add_argument("--num-samples", type=int, default=Config.num_samples,
                   help="trajectories per class for each Monte Carlo estimator (default %(default)s)")
    p.add_argument("--steps", type=int, default=Config.steps, help="diffusion steps T (default %(default)s)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default=Config.schedule)
    p.add_argument("--variance", choices=["small", "large"], default=Config.variance,
                   help="reverse-step variance: small = beta~_t (exact for point data), large = beta_t")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--bandwidth", type=float, default=Config.bandwidth,
                   help="smoothing of Monte Carlo entropy rates, in normalised time (0 = none; default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=Config.num_resamples, help="bootstrap resamples (default %(default)s)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also write every online trajectory (x_t and log P(k | x_t)) every N-th step to "
                        "trajectories.npz (default: off)")
    p.add_argument("--out", type=Path, default=Config.out, help="output folder (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {a.num_samples}")
    if a.steps < 2:
        p.error(f"--steps must be >= 2, got {a.steps}")
    if a.save_every < 0:
        p.error(f"--save-every must be >= 0, got {a.save_every}")
    if a.bootstrap < 1:
        p.error(f"--bootstrap must be >= 1, got {a.bootstrap}")
    try:
        spec = PAPER_SPEC if a.spec is None else load_spec(a.spec)
    except ValueError as e:
        p.error(str(e))
    return Config(spec=spec, out=a.out, num_samples=a.num_samples, steps=a.steps, schedule=a.schedule,
                  variance=a.variance, seed=a.seed, bandwidth=a.bandwidth, num_resamples=a.bootstrap,
                  save_every=a.save_every, overwrite=a.overwrite, progress=not a.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    enable_compilation_cache()
    start = time.perf_counter()
    try:
        summary = run(config)
    except ValueError as e:
        print(f"python -m experiments.gmm: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(OUTPUTS)} to {config.out}/ in {time.perf_counter() - start:.1f} s")
    for problem in summary["problems"]:
        peaks = ", ".join(f"{k} {v:.3f}" for k, v in problem["peak_time"].items())
        print(f"  {problem['name']:<22s} H(Z) = {problem['prior_entropy_bits']:.3f} bits, peak t/T: {peaks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
