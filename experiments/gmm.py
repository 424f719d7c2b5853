"""When is the class decided? Gaussian mixtures, where every number has an exact answer.

    python -m experiments.gmm                       # the paper's 1-D figure: points at -8, -4, 6, 8
    python -m experiments.gmm --spec mixture.json   # any mixture, any dimension

Writes into --out: summary.json, curves.npz, entropy_rate.png, entropy.png,
posterior_paths.png, density.png. See the README for the schema.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments import cli, enable_compilation_cache
from experiments.cli import Parser, describe_times, report_written, run_command

OUTPUTS = ("summary.json", "curves.npz", "entropy_rate.png", "entropy.png", "posterior_paths.png", "density.png")
OPTIONAL_OUTPUTS = ("trajectories.npz",)  # with --save-every

SPEC_KEYS = ("means", "stds", "covs", "weights", "classes", "decisions")
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
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read spec {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"spec {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None
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

    unknown = set(spec) - set(SPEC_KEYS)
    if unknown:
        raise ValueError(f"spec has unknown keys {sorted(unknown)}; allowed: {', '.join(SPEC_KEYS)}")
    if "means" not in spec:
        raise ValueError("spec needs 'means': a list of component means (numbers for 1-D, lists for d-D)")
    if "covs" in spec and "stds" in spec:
        raise ValueError("spec gives both 'stds' and 'covs': one covariance per component, isotropic or full")

    mix = mixture.make_mixture(spec["means"], spec.get("stds"), spec.get("weights"), covs=spec.get("covs"),
                               classes=spec.get("classes"))
    mixture.check_class_weights(mix)
    k = mix.num_classes
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
    """Compute every estimator, write the result files, and return the summary.

    The files go into a stage folder beside config.out, created before the computation and
    moved into place when all are written (`results.staged_outputs`).
    """
    import jax
    from tqdm import tqdm

    import jaxdiff_info as jdi
    from jaxdiff_info import plots, results
    from jaxdiff_info.schedule import make_schedule

    mix, problems = build_problem(config.spec)
    sampler = jdi.Sampler("ddpm", config.variance)
    if config.bandwidth < 0 or not np.isfinite(config.bandwidth):
        raise ValueError(f"--bandwidth must be a finite number >= 0, got {config.bandwidth}")
    if config.save_every < 0:
        raise ValueError(f"--save-every must be >= 0, got {config.save_every}")
    if isinstance(config.num_samples, bool) or int(config.num_samples) != config.num_samples or config.num_samples < 2:
        raise ValueError(f"the number of samples per class must be an integer >= 2 (the bootstrap intervals need two), "
                         f"got {config.num_samples}")
    check_memory(config)
    schedule = make_schedule(config.schedule, config.steps)
    with results.staged_outputs(config.out, summary_outputs(config), config.overwrite,
                                replaces=OPTIONAL_OUTPUTS) as out:
        K = mix.num_classes
        time_grid = np.asarray(schedule.time)
        key_fmc, key_online, key_boot = jax.random.split(jax.random.key(config.seed), 3)
        mc = dict(samples_per_class=config.num_samples, bandwidth=config.bandwidth, num_resamples=config.num_resamples,
                  num_blocks=config.num_blocks)

        curves: dict[str, jdi.Curves] = {}
        bar = tqdm(total=3 * config.steps + (config.steps if mix.dim == 1 else 0), unit="step",
                   desc="gmm", disable=not config.progress, file=sys.stderr)
        if mix.dim == 1:
            bar.set_postfix_str("exact (quadrature)")
            curves["exact"] = jdi.exact_curves(mix, problems, schedule)
            bar.update(config.steps)

        bar.set_postfix_str("forward Monte Carlo")
        curves["forward_mc"] = jdi.forward_mc_curves(mix, problems, schedule, key=key_fmc,
                                                     bootstrap_key=jax.random.fold_in(key_boot, 0), **mc)
        bar.update(config.steps)

        bar.set_postfix_str("online classifier")
        saved: list = []

        def save(t, state):
            saved.append((t, np.asarray(state.x), np.asarray(state.log_posterior)))

        online = jdi.online_curves(
            mix, problems, schedule, key=key_online, sampler=sampler, bootstrap_key=jax.random.fold_in(key_boot, 1),
            paths_per_class=config.paths_per_class, record_x=True, batch_size=2048,
            chunk=config.save_every or max(1, config.steps // 20), progress=cli.with_checkpoint(bar.update),
            after_chunk=save if config.save_every else None, **mc)
        curves["online"] = online
        if online.exact_state is not None:  # the exact P(k | x_t) at the same x_t: the size of the path effect
            curves["online_state"] = online.exact_state

        bar.set_postfix_str("I-MMSE (denoising errors)")
        # a key of its own (folded, not split off, so the other estimators' draws stay as they were)
        curves["immse"] = jdi.immse_curves(mix, problems, schedule, key=jax.random.fold_in(jax.random.key(config.seed), 3),
                                           bootstrap_key=jax.random.fold_in(key_boot, 2), **mc)
        bar.update(config.steps)
        bar.close()
        run = online.trajectories
        paths_x = run.path_x[..., 0]  # (T, M): the first coordinate of the recorded paths
        path_classes = run.classes[run.path_index]

        for name, c in curves.items():
            for field in ("entropy_bits", "entropy_rate"):
                if not np.all(np.isfinite(getattr(c, field))):
                    raise FloatingPointError(f"non-finite {field} from the {name} estimator")

        summary = {
            "mixture": mixture_summary(config.spec, mix),
            "schedule": {"name": config.schedule, "steps": config.steps},
            "sampler": sampler.describe(),
            "num_samples_per_class": config.num_samples,
            "seed": config.seed,
            "rate_bandwidth": {name: c.rate_bandwidth for name, c in curves.items()},
            "estimators": list(curves),
            "methods": results.methods(curves),
            "posterior": {name: c.posterior for name, c in curves.items()},
            "problems": [results.problem_summary(i, curves) for i in range(len(problems))],
        }
        results.write_json(out / "summary.json", summary)
        results.write_npz(out / "curves.npz", {
            "time": time_grid,
            "prior_entropy_bits": online.prior_entropy_bits,
            "problem_names": np.array(online.names),
            "paths/x": paths_x, "paths/log_posterior": run.path_log_posterior, "paths/classes": path_classes,
            "mean_posterior": run.mean_posterior,
            "x_0": run.x_0, "x_0_classes": run.classes,
            **results.curves_arrays(curves),
            **{f"{name}/{field}": getattr(c, field) for name, c in curves.items()
               for field in ("class_information_bits", "class_information_bits_ci95")
               if getattr(c, field) is not None},
        })

        if saved:
            steps = np.array([t for t, _, _ in saved])
            results.write_npz(out / "trajectories.npz", {
                "t": steps, "time": np.where(steps > 0, time_grid[np.maximum(steps - 1, 0)], 0.0),
                "x": np.stack([x for _, x, _ in saved]), "log_posterior": np.stack([lp for _, _, lp in saved]),
                "classes": run.classes})

        class_names = [component_name(mix, k) for k in range(K)]
        title = (f"{_mixture_title(mix)}; online: {sampler.describe()}; {config.num_samples} trajectories per class "
                 f"(Monte Carlo estimators), {config.steps} steps")
        figures = {
            "entropy_rate.png": plots.curves_figure(curves, "entropy_rate", title),
            "entropy.png": plots.curves_figure(curves, "entropy_bits", title),
            "posterior_paths.png": plots.posterior_paths_figure(time_grid, run.path_log_posterior, path_classes,
                                                                run.mean_posterior, class_names, config.num_samples,
                                                                title, curves["online"].posterior),
            "density.png": _density_figure(mix, schedule, time_grid, paths_x, path_classes),
        }
        for name, fig in figures.items():
            results.save_figure(fig, out / name)
            plots.plt.close(fig)
        cli.checkpoint()  # a Ctrl-C lost in a finaliser: the results stay unmoved
        return summary


def mixture_summary(spec: dict, mix) -> dict:
    """The mixture as the spec gave it (component order of the spec), weights normalised."""
    weights = np.ones(len(spec["means"])) if spec.get("weights") is None else np.asarray(spec["weights"], np.float64)
    out = {"means": np.asarray(spec["means"], np.float64).tolist()}
    if "covs" in spec:
        out["covs"] = np.asarray(spec["covs"], np.float64).tolist()
    else:
        out["stds"] = np.zeros(len(weights)).tolist() if spec.get("stds") is None else np.asarray(spec["stds"], np.float64).tolist()
    out["weights"] = (weights / weights.sum()).tolist()
    out["classes"] = spec.get("classes") or [[k] for k in range(len(weights))]
    out["class_weights"] = np.asarray(mix.class_weights, np.float64).tolist()
    return out


def _mixture_title(mix) -> str:
    means = np.asarray(mix.means)
    parts = "components" if mix.singleton_classes else f"classes of {mix.num_components} components"
    full = ", full covariances" if mix.basis is not None else ""
    if means.shape[1] == 1 and mix.singleton_classes:
        return f"{mix.num_components} components at {', '.join(f'{m:g}' for m in means[:, 0])}"
    return f"{mix.num_classes} {parts} in d = {means.shape[1]}{full}"


def component_name(mix, k: int) -> str:
    m = np.asarray(mix.means[k])
    return f"{m[0]:g}" if m.shape[0] == 1 and mix.singleton_classes else f"class {k}"


def _density_figure(mix, schedule, time_grid, paths_x, path_classes):
    """Exact marginal density of the first coordinate of x_t (a 1-D mixture itself)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff_info import mixture, plots

    var0 = np.asarray(mix.stds, np.float64) ** 2  # the first coordinate's variance in each component
    if mix.basis is not None:
        var0 = var0 + np.sum(np.asarray(mix.spectrum, np.float64) * np.asarray(mix.basis, np.float64)[:, 0, :] ** 2, -1)
    first = mixture.GaussianMixture(mix.means[:, :1], jnp.asarray(np.sqrt(var0), jnp.float32), mix.log_weights)
    lo = min(float(jnp.min(first.means)), float(np.min(paths_x))) - 3.0
    hi = max(float(jnp.max(first.means)), float(np.max(paths_x))) + 3.0
    grid = np.linspace(lo, hi, 300)
    log_density = jax.jit(jax.vmap(lambda ab: jax.vmap(mixture.log_prob, (None, 0, None))(
        first, jnp.asarray(grid)[:, None], ab)))(schedule.alpha_bar)
    xlabel = "x_t" if mix.dim == 1 else "first coordinate of x_t"
    return plots.density_figure(time_grid, grid, np.asarray(log_density), paths_x, path_classes, xlabel)


def bytes_needed(num_classes: int, dim: int, num_problems: int, num_samples: int, steps: int = 1000,
                 save_every: int = 0, num_components: int | None = None, num_resamples: int = 200,
                 num_blocks: int = 32) -> int:
    """A generous estimate of a run's peak memory in bytes.

    Per trajectory (N = num_classes * num_samples of them for each Monte Carlo estimator),
    float32 entries: x_t, the noise and the next x_t (5 d over both estimators), log P(k | x_t)
    (3 K), the eps evaluations and reverse-step means per class and the forward draws'
    per-class terms (2 K d), P(z | x_t) of every problem over the classes and its entropy
    (2 P K + 2 P), and the component log-likelihoods and within-class posteriors (3 per
    component); twice that for the intermediates; with save_every, the saved x_t and
    log P(k | x_t), held twice. Per step, for each of the three estimators: the (T, K, B, P)
    block sums, the (R, T, K, P) bootstrap resamples and their curves (float32, 4 copies), and
    the T x T rate and smoothing operators (float64, cached and copied, and float32: 64 T^2
    bytes in all; measured 3.9 GB peak at T = 8000). Plus a fixed 0.5 GB for compilation.
    """
    K, d, P, T = num_classes, dim, num_problems, steps
    per_trajectory = 5 * d + 3 * K + 2 * K * d + 2 * P * K + 2 * P + 3 * (num_components or K)
    saved = (steps // save_every + 2) * (d + K) if save_every else 0
    per_step = 3 * 4 * (4 * num_resamples * K * P + 2 * K * num_blocks * P + 16 * K * P + 64)
    return FIXED_BYTES + 4 * K * num_samples * 2 * (per_trajectory + saved) + T * per_step + 64 * T * T


FIXED_BYTES = 512 * 2**20


def check_memory(config: Config) -> None:
    """ValueError, one line, if the run's arrays cannot fit in the memory available, with the
    largest --steps (at the fewest samples) or --num-samples that fits."""
    mix, problems = build_problem(config.spec)

    def needed(num_samples: int, steps: int) -> int:
        return bytes_needed(mix.num_classes, mix.dim, len(problems), num_samples, steps, config.save_every,
                            mix.num_components, config.num_resamples, config.num_blocks)

    cli.check_memory("--steps", config.steps, lambda steps: needed(2, steps), minimum=2)
    cli.check_memory("--num-samples", config.num_samples, lambda n: needed(n, config.steps))


def min_steps(schedule: str) -> int:
    """The fewest diffusion steps the named schedule takes (jaxdiff_info.schedule refuses fewer)."""
    from jaxdiff_info.schedule import make_schedule

    for steps in range(2, 1001):
        try:
            make_schedule(schedule, steps)
        except ValueError:
            continue
        return steps
    return 2


# --- CLI ---------------------------------------------------------------------------------

PROG = "python -m experiments.gmm"


def parse_args(argv: Sequence[str] | None) -> Config:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=str, default=None,
                   help='mixture JSON: {"means": [...], "stds": [...] or "covs": [[[...], ...], ...], "weights": [...], '
                        '"classes": [[components], ...], "decisions": {name: [[classes], ...]}} '
                        "(default: the paper's points at -8, -4, 6, 8 and its eight decision problems)")
    p.add_argument("--num-samples", type=int, default=Config.num_samples,
                   help="trajectories per class for each Monte Carlo estimator")
    p.add_argument("--steps", type=int, default=Config.steps, help="diffusion steps T")
    p.add_argument("--schedule", choices=["linear", "cosine"], default=Config.schedule, help="noise schedule")
    p.add_argument("--variance", choices=["small", "large"], default=Config.variance,
                   help="reverse-step variance: small = beta~_t (exact for point data), large = beta_t")
    p.add_argument("--seed", type=int, default=Config.seed, help="seed of every random draw")
    p.add_argument("--bandwidth", type=cli.finite_nonnegative, default=Config.bandwidth,
                   help="smoothing of the Monte Carlo entropy rates, in normalised time (0 = none)")
    p.add_argument("--bootstrap", type=cli.resamples, default=Config.num_resamples, help="bootstrap resamples")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="also write every online trajectory (x_t and log P(k | x_t)) every N-th step to "
                        "trajectories.npz (default: 0, off)")
    p.add_argument("--out", type=cli.folder, default=Config.out, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.num_samples < 2:
        p.error(f"--num-samples must be >= 2 (the bootstrap intervals need two per class), got {a.num_samples}")
    fewest = min_steps(a.schedule)
    if a.steps < fewest:
        p.error(f"--steps must be >= {fewest} for the {a.schedule} schedule, got {a.steps}")
    if a.save_every < 0:
        p.error(f"--save-every must be >= 0, got {a.save_every}")
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
    status, summary = run_command(PROG, lambda: run(config), out=config.out, outputs=summary_outputs(config))
    if status:
        return status
    report_written(summary_outputs(config), config.out, start)
    if _renormalised(config.spec):
        print("weights renormalised to sum to 1: " + ", ".join(f"{w:.6g}" for w in summary["mixture"]["weights"]))
    for problem in summary["problems"]:
        print(f"  {problem['name']:<22s} H(Z) = {problem['prior_entropy_bits']:.3f} bits")
        for est in summary["estimators"]:
            print(f"    {est:<12s} {describe_times(problem, est)}")
    return 0


def summary_outputs(config: Config) -> tuple[str, ...]:
    return OUTPUTS + (OPTIONAL_OUTPUTS if config.save_every else ())


def _renormalised(spec: dict) -> bool:
    """Whether the spec's weights (valid, the run having used them) did not sum to 1."""
    weights = spec.get("weights")
    return weights is not None and abs(float(np.sum(weights)) - 1.0) > 1e-6


if __name__ == "__main__":
    sys.exit(main())
