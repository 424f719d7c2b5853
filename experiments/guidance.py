"""Generate a mixture without some of its classes: Dynamic Negative Guidance against negative
prompting and the exact answer.

    python -m experiments.guidance                             # the paper's points, without 6
    python -m experiments.guidance --spec experiments/specs/square_2d.json --remove 0,2
    python -m experiments.guidance --checkpoint checkpoints/tiny-digits --remove 1   # a trained model
    python -m experiments.guidance decisions --weights 0,0.5,1,2,4    # how CFG moves the decisions

Writes into --out: summary.json, samples.npz, density.png (samples.png with --checkpoint: the
metrics judged by a classifier, experiments.guidance_images), class_fractions.png,
guidance_paths.png; the decisions command: experiments.guidance_decisions. See the README.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments import cli, enable_compilation_cache
from experiments.cli import Parser, report_written, run_command
from experiments.gmm import FIXED_BYTES, PAPER_SPEC, component_name, mixture_summary, build_problem, load_spec
from experiments.guidance_images import METHODS as IMAGE_METHODS
from experiments.guidance_images import OUTPUTS as IMAGE_OUTPUTS

OUTPUTS = ("summary.json", "samples.npz", "density.png", "class_fractions.png", "guidance_paths.png")
METHODS = ("dng", "dng_published", "negative", "exact")
SCALED = ("dng", "dng_published", "negative")
DEFAULT_SCALES = {"dng": (1.0,), "dng_published": (1.0,), "negative": (1.0, 2.0, 4.0, 8.0)}
PAPER_REMOVE = ("6",)
FLOOR_REPLICATES = 20
REFERENCE_SIZE = 2000  # exact draws the energy distance (d > 1) is taken against, at least

POSTERIOR = ("the tracked P(C | x_t) is P(C | x_t, ..., x_T) of the online classifier with the unguided class "
             "kernels N(mu(x_t, eps_k), sigma_t^2), evaluated on the guided path: the posterior of the unguided "
             "model, not of the guided path law; {kind}")
KIND = {"state (exact kernel)": "here the class kernels are exact reverse kernels (DDPM beta~_t, point classes), so it "
                                "is the state posterior P(C | x_t) of the mixture, up to the start x_T ~ N(0, I)",
        "state (DDPM approximation)": "here it approximates the state posterior P(C | x_t) of the mixture as well as "
                                      "the Gaussian DDPM kernel approximates the reverse chain"}
METRICS = {
    "forbidden_fraction": "mean over the samples of the exact P(C | x_0), read at alpha_bar = 1 - 1e-4",
    "class_fractions": "mean exact P(k | x_0) per remaining class, renormalised over the remaining classes",
    "kl_to_target_bits": "KL(class fractions || q) in bits, q_k = pi_k / (1 - pi_C)",
    "note": "where classes overlap, exact draws of p(x | not C) have a forbidden fraction and a KL above 0 "
            "themselves (the exact P(C | x_0) of a remaining class's sample is not 0): compare with method 'exact'",
    "ci95": "2.5-97.5 percentiles of 'bootstrap' resamples of the samples",
    "distance_floor": "the mean of distance_to_target over {n} sets of exact draws of p(x | not C) of the same size, "
                      "and their 2.5-97.5 percentile range",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything one run depends on; the CLI builds it."""

    spec: dict | None
    remove: tuple[str, ...] = PAPER_REMOVE
    methods: tuple[str, ...] = METHODS
    scales: tuple[tuple[str, tuple[float, ...]], ...] = tuple(DEFAULT_SCALES.items())
    out: Path = Path("results/guidance")
    num_samples: int = 2000
    steps: int = 1000
    seed: int = 0
    num_resamples: int = 200
    max_ratio: float | None = None
    published_prior: float | None = None
    temperature: float = 1.0
    offset: float = 0.0
    p_min: float = 1e-6
    p_max: float = 0.99
    overwrite: bool = False
    progress: bool = True
    checkpoint: Path | None = None  # a trained network in place of the mixture (experiments.guidance_images)
    data_dir: Path = Path("data")


# --- input --------------------------------------------------------------------------------------

def resolve_classes(tokens: Sequence[str], names: Sequence[str]) -> list[int]:
    """Class indices from tokens that are indices or names ('index:N' or 'name:X' where a token
    could be either); ValueError, one line, for anything else."""
    listing = ", ".join(f"{k} ({n})" for k, n in enumerate(names))
    found: list[int] = []
    for token in tokens:
        prefix, sep, rest = token.partition(":")
        kind, value = (prefix, rest) if sep and prefix in ("index", "name") else (None, token)
        by_name = [k for k, n in enumerate(names) if n == value] if kind != "index" else []
        by_index = []
        if kind != "name":
            try:
                i = int(value)
            except ValueError:
                i = None
            if i is not None and 0 <= i < len(names):
                by_index = [i]
            elif kind == "index":
                raise ValueError(f"--remove {token}: there is no class index {value}; the classes are {listing}")
        if by_name and by_index and by_name[0] != by_index[0]:
            raise ValueError(f"--remove {token} is ambiguous: class index {value} ({names[by_index[0]]}) or the class "
                             f"named {value} (index {by_name[0]}); write index:{value} or name:{value}")
        if not (by_name or by_index):
            raise ValueError(f"--remove {token}: there is no class of that name or index; the classes are {listing}")
        found.append((by_name or by_index)[0])
    return sorted(set(found))


def scales_of(config: Config) -> dict[str, tuple[float, ...]]:
    """The scales of each scaled method, validated (lam for DNG, w for negative prompting)."""
    scales = dict(config.scales)
    for method, values in scales.items():
        for s in values:
            if not (math.isfinite(s) and s >= 0):
                raise ValueError(f"--scales: the {method} scale must be a finite number >= 0, got {s:g}")
        if not values:
            raise ValueError(f"--scales: no scale for {method}")
    return scales


def npz_key(method: str, scale: float | None, default: bool) -> str:
    return method if default or scale is None else f"{method}/{scale:g}"


# --- the run --------------------------------------------------------------------------------------

def run(config: Config) -> dict:
    """Sample with every method and scale, measure against p(x | not C), write the outputs
    (all together, `results.staged_outputs`), and return the summary."""
    if config.checkpoint is not None:
        from experiments import guidance_images

        return guidance_images.run(config, scales_of(config), resolve_classes)
    import jax
    from tqdm import tqdm

    import jaxdiff_info as jdi
    from jaxdiff_info import api, guidance, guidance_plots, mixture, plots, removal, results
    from jaxdiff_info.schedule import make_schedule

    mix, _ = build_problem(config.spec)
    names = [component_name(mix, k) for k in range(mix.num_classes)]
    remove = resolve_classes(config.remove, names)
    mask = guidance.removal_mask(remove, mix.num_classes)
    if not 0 < float(np.asarray(mix.class_weights)[mask].sum()) < 1:
        raise ValueError("--remove: the removed classes have weight 0, or the remaining ones do")
    scales = scales_of(config)
    options = dict(max_ratio=config.max_ratio, prior=config.published_prior, temperature=config.temperature,
                   offset=config.offset, p_min=config.p_min, p_max=config.p_max)
    plans = {m: guidance.Guidance(m, **options) for m in config.methods if m in SCALED}
    cli.check_memory("--steps", config.steps, lambda steps: bytes_needed(mix, 2, steps), minimum=2)
    cli.check_memory("--num-samples", config.num_samples, lambda n: bytes_needed(mix, n, config.steps))
    schedule = make_schedule("linear", config.steps)
    sampler = jdi.Sampler("ddpm", "small")
    runs = [(m, s, i == 0) for m in config.methods if m in SCALED
            for i, s in enumerate(scales.get(m, DEFAULT_SCALES[m]))]

    with results.staged_outputs(config.out, OUTPUTS, config.overwrite) as out:
        cm, shift = mixture.centred(mix)
        eps = mixture.eps_fn(schedule)
        key_run, key_exact, key_ref, key_floor, key_boot = jax.random.split(jax.random.key(config.seed), 5)
        n = config.num_samples
        reference = None if mix.dim == 1 else removal.sample_target(mix, mask, key_ref, max(n, REFERENCE_SIZE))
        kind = KIND[api.posterior_kind(mix, sampler)]
        bar = tqdm(total=len(runs) + 1, unit="run", desc="guidance", disable=not config.progress, file=sys.stderr)
        progress = cli.with_checkpoint(bar.update)
        entries, samples, paths = [], {}, {}
        for i, (method, scale, default) in enumerate(runs):
            bar.set_postfix_str(f"{method} {scale:g}")
            g = plans[method]
            done = guidance.sample(eps, cm, schedule, sampler, key_run, remove, num=n, shape=(mix.dim,),
                                   log_prior=cm.class_log_weights, guidance=g, scale=scale, batch_size=4096)
            x_0 = np.asarray(done.x_0, np.float64) + shift
            if not np.all(np.isfinite(x_0)):
                raise FloatingPointError(f"non-finite samples from {method} at scale {scale:g}; use a smaller --scales value")
            key = npz_key(method, scale, default)
            samples[key], paths[key] = x_0, done
            m = removal.removal_metrics(mix, mask, x_0, jax.random.fold_in(key_boot, i), reference=reference,
                                        num_resamples=config.num_resamples)
            scale_stats = np.asarray(done.effective_scale)
            entries.append(_entry(method, scale, default, key, m, names, mask, g.describe(scale),
                                  POSTERIOR.format(kind=kind), sampler.describe()) | {
                "max_effective_scale": _r(scale_stats[:, 2].max()),
                "mean_removed_probability_at_end": _r(np.asarray(done.removed_probability)[-1])})
            progress(1)
        if "exact" in config.methods:
            bar.set_postfix_str("exact")
            x_0 = removal.sample_target(mix, mask, key_exact, n)
            samples["exact"] = x_0
            m = removal.removal_metrics(mix, mask, x_0, jax.random.fold_in(key_boot, len(runs)), reference=reference,
                                        num_resamples=config.num_resamples)
            entries.append(_entry("exact", None, True, "exact", m, names, mask,
                                  "exact draws of p(x | not C), the mixture of the remaining classes renormalised",
                                  "none: no guidance, no tracker", "none (direct draws of x_0)"))
        floor, floor_ci = removal.distance_floor(mix, mask, n, key_floor, reference=reference,
                                                 replicates=FLOOR_REPLICATES)
        progress(1)
        bar.close()

        kept = [names[k] for k in range(len(names)) if not mask[k]]
        summary = {
            "mixture": mixture_summary(config.spec, mix),
            "class_names": names,
            "removed": {"classes": remove, "names": [names[k] for k in remove],
                        "prior_weight": _r(np.asarray(mix.class_weights, np.float64)[mask].sum())},
            "target": {"classes": kept, "class_weights": _r(removal.target_weights(mix, mask))},
            "schedule": {"name": "linear", "steps": config.steps},
            "sampler": sampler.describe(),
            "num_samples": n,
            "seed": config.seed,
            "metrics": {**METRICS, "distance_to_target": removal.DISTANCE_1D if mix.dim == 1 else
                        f"{removal.DISTANCE_DD} ({reference.shape[0]} of them)",
                        "distance_floor": METRICS["distance_floor"].format(n=FLOOR_REPLICATES)},
            "bootstrap": config.num_resamples,
            "distance_floor": _r(floor), "distance_floor_ci95": _r(floor_ci),
            "results": [e | {"distance_floor": _r(floor)} for e in entries],
        }
        results.write_json(out / "summary.json", summary)
        results.write_npz(out / "samples.npz", samples)
        time_grid = np.asarray(schedule.time)[::-1]  # generation order
        figures = {
            "density.png": guidance_plots.density_figure(mix, mask, samples, names),
            "class_fractions.png": guidance_plots.fractions_figure(entries, kept, removal.target_weights(mix, mask)),
            "guidance_paths.png": guidance_plots.paths_figure(time_grid, paths, names, remove),
        }
        for name, fig in figures.items():
            results.save_figure(fig, out / name)
            plots.plt.close(fig)
        cli.checkpoint()
        return summary


def _r(a, digits: int = 6):
    """Rounded, as JSON: null where a value is undefined (e.g. class fractions when every sample
    is judged to a removed class)."""
    a = np.round(np.asarray(a, np.float64), digits)
    return np.where(np.isfinite(a), a, None).tolist()


def _entry(method, scale, default, key, m, names, mask, guidance_text, posterior_text, kernel) -> dict:
    kept = [names[k] for k in range(len(names)) if not mask[k]]
    return {
        "method": method, "scale": scale, "default_scale": default, "samples_key": key,
        "guidance": guidance_text, "posterior": posterior_text, "kernel": kernel,
        "forbidden_fraction": _r(m.forbidden_fraction), "forbidden_fraction_ci95": _r(m.forbidden_fraction_ci95),
        "class_fractions": dict(zip(kept, _r(m.class_fractions))),
        "class_fractions_ci95": dict(zip(kept, _r(m.class_fractions_ci95))),
        "kl_to_target_bits": _r(m.kl_to_target_bits), "kl_to_target_bits_ci95": _r(m.kl_to_target_bits_ci95),
        "distance_to_target": _r(m.distance_to_target), "distance_to_target_ci95": _r(m.distance_to_target_ci95),
    }


def bytes_needed(mix, num_samples: int, steps: int) -> int:
    """A generous estimate of a run's peak memory: per trajectory every class eps, the reverse
    means and the state (4 (K + 1) d + 2 K float32, twice for intermediates), the bootstrap's
    weights (200 float64 per sample), for d > 1 the energy distance's N x N distances, and 4 KB
    per step (the schedule and each run's per-step curves; measured: 2.8 KB)."""
    K, d, n = mix.num_classes, mix.dim, num_samples
    per = 2 * 4 * (4 * (K + 1) * d + 2 * K + 4) + 8 * 200
    pairwise = 8 * 2 * max(n, REFERENCE_SIZE) ** 2 if d > 1 else 0
    return FIXED_BYTES + n * per + pairwise + 4096 * steps


# --- CLI ------------------------------------------------------------------------------------------

PROG = "python -m experiments.guidance"


def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for value in values or () for v in value.split(",") if v.strip()]


def _parse_scales(values: Sequence[str] | None, p: Parser) -> dict[str, tuple[float, ...]]:
    scales = dict(DEFAULT_SCALES)
    for value in values or ():
        method, sep, numbers = value.rpartition("=")
        targets = [method] if sep else list(SCALED)
        if sep and method not in SCALED:
            p.error(f"--scales {value}: {method!r} takes no scale; scaled methods: {', '.join(SCALED)}")
        try:
            parsed = tuple(float(x) for x in numbers.split(",") if x.strip())
        except ValueError:
            p.error(f"--scales {value}: not a comma list of numbers")
        if not parsed:
            p.error(f"--scales {value}: no numbers")
        for s in parsed:
            if not (math.isfinite(s) and s >= 0):
                p.error(f"--scales {value}: a guidance scale (lam or w) must be a finite number >= 0, got {s:g}")
        scales.update({m: parsed for m in targets})
    return scales


def model_spec(p: Parser, a) -> dict | None:
    """The mixture of --spec (the paper's points without it), or None for --checkpoint; --spec
    and --checkpoint together, or a bad spec, end the parse with a one-line error."""
    if a.checkpoint is not None and a.spec is not None:
        p.error("--checkpoint and --spec: give one model, a network or a mixture")
    try:
        return None if a.checkpoint is not None else PAPER_SPEC if a.spec is None else load_spec(a.spec)
    except ValueError as e:
        p.error(str(e))


def parse_args(argv: Sequence[str] | None) -> Config:
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
               epilog=f"{PROG} decisions [...] runs the online classifier along classifier-free guided "
                      f"trajectories and reports how guidance moves each decision ({PROG} decisions --help)")
    p.add_argument("--spec", type=str, default=None,
                   help="mixture JSON, as for python -m experiments.gmm (default: the paper's points at -8, -4, 6, 8)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a training directory of python -m experiments.cifar10 train (with a null class) in place of "
                        "a mixture: samples judged by a logistic regression on its dataset (default: none, a mixture)")
    p.add_argument("--data-dir", type=Path, default=Config.data_dir,
                   help="with --checkpoint: where cifar10 is read from")
    p.add_argument("--remove", action="append", default=None, metavar="CLASSES",
                   help="classes to generate without: indices or names (the 1-D means, e.g. -8), comma list or "
                        "repeated; index:N or name:X where a token could be either "
                        "(default: 6 for the paper's points; required with --spec)")
    p.add_argument("--methods", type=str, default=None,
                   help=f"comma list of {', '.join(METHODS)} (default: all); with --checkpoint of "
                        f"{', '.join(IMAGE_METHODS)} (default: all)")
    p.add_argument("--scales", action="append", default=None, metavar="[METHOD=]S,S,...",
                   help="guidance scales: lam for dng and dng_published, w for negative; METHOD=... for one method, "
                        "else all three; repeatable (default: dng=1, dng_published=1, negative=1,2,4,8; the first "
                        "is the method's default scale)")
    p.add_argument("--num-samples", type=int, default=Config.num_samples, help="samples per method and scale")
    p.add_argument("--steps", type=int, default=Config.steps,
                   help="diffusion steps T (linear schedule; with --checkpoint respaced from the model's)")
    p.add_argument("--seed", type=int, default=Config.seed, help="seed of every random draw")
    p.add_argument("--bootstrap", type=cli.resamples, default=Config.num_resamples, help="bootstrap resamples")
    p.add_argument("--max-ratio", type=float, default=None,
                   help="dng: cap P/(1-P) at this value (default: none, the exact recursion)")
    p.add_argument("--published-prior", type=float, default=None,
                   help="dng_published: P(C) at t = T (default: the removed classes' prior weight; upstream 0.2)")
    p.add_argument("--temperature", type=float, default=Config.temperature, help="dng_published: temperature")
    p.add_argument("--offset", type=float, default=Config.offset, help="dng_published: offset per step")
    p.add_argument("--p-min", type=float, default=Config.p_min, help="dng_published: lower clamp of P(C)")
    p.add_argument("--p-max", type=float, default=Config.p_max, help="dng_published: upper clamp of P(C)")
    p.add_argument("--out", type=cli.folder, default=Config.out, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    allowed = METHODS if a.checkpoint is None else IMAGE_METHODS
    methods = tuple(dict.fromkeys(_split([a.methods if a.methods is not None else ",".join(allowed)])))
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        where = " with --checkpoint (no exact p(x | not C) there)" if a.checkpoint is not None else ""
        p.error(f"--methods: unknown method {unknown[0]!r}{where}; choose from {', '.join(allowed)}" if unknown
                else "--methods: name at least one method")
    spec = model_spec(p, a)
    if a.num_samples < 2:
        p.error(f"--num-samples must be >= 2, got {a.num_samples}")
    if a.steps < (2 if a.checkpoint is not None else 21):
        p.error(f"--steps must be >= 21 for the linear schedule, got {a.steps}")
    if a.max_ratio is not None and not (math.isfinite(a.max_ratio) and a.max_ratio > 0):
        p.error(f"--max-ratio must be a finite number > 0, got {a.max_ratio:g}")
    if not 0 < a.p_min < a.p_max < 1:
        p.error(f"--p-min and --p-max need 0 < p-min < p-max < 1, got {a.p_min:g} and {a.p_max:g}")
    if a.published_prior is not None and not 0 < a.published_prior < 1:
        p.error(f"--published-prior must be in (0, 1), got {a.published_prior:g}")
    if not (math.isfinite(a.temperature) and a.temperature > 0):
        p.error(f"--temperature must be a finite number > 0, got {a.temperature:g}")
    if not math.isfinite(a.offset):
        p.error(f"--offset must be a finite number, got {a.offset:g}")
    remove = tuple(_split(a.remove))
    if (a.spec is not None or a.checkpoint is not None) and not remove:
        p.error(f"--remove is required with {'--spec' if a.checkpoint is None else '--checkpoint'}: the classes to "
                "generate without")
    if a.remove is not None and not remove:
        p.error("--remove: name at least one class")
    return Config(spec=spec, remove=remove or PAPER_REMOVE, methods=methods,
                  scales=tuple(_parse_scales(a.scales, p).items()), out=a.out, num_samples=a.num_samples,
                  steps=a.steps, seed=a.seed, num_resamples=a.bootstrap, max_ratio=a.max_ratio,
                  published_prior=a.published_prior, temperature=a.temperature, offset=a.offset, p_min=a.p_min,
                  p_max=a.p_max, overwrite=a.overwrite, progress=not a.no_progress, checkpoint=a.checkpoint,
                  data_dir=a.data_dir)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["decisions"]:
        from experiments import guidance_decisions

        return guidance_decisions.main(argv[1:])
    config = parse_args(argv)
    enable_compilation_cache()
    start = time.perf_counter()
    outputs = OUTPUTS if config.checkpoint is None else IMAGE_OUTPUTS
    status, summary = run_command(PROG, lambda: run(config), out=config.out, outputs=outputs)
    if status:
        return status
    report_written(outputs, config.out, start)
    if config.checkpoint is not None:
        from experiments.guidance_images import print_summary

        print_summary(summary)
        return 0
    lo, hi = summary["distance_floor_ci95"]
    print(f"  without {', '.join(summary['removed']['names'])}; distance: {summary['metrics']['distance_to_target']}")
    print(f"  exact draws of the same size give {summary['distance_floor']:.4g} (95% range {lo:.4g} to {hi:.4g}): "
          f"a distance in that range cannot be told from exact sampling"
          + (", and the estimate, unbiased, can fall below 0" if lo < 0 else ""))
    for e in summary["results"]:
        label = e["method"] if e["scale"] is None else f"{e['method']} {e['scale']:g}"
        print(f"  {label:<20s} forbidden {e['forbidden_fraction']:.4f}  KL {e['kl_to_target_bits']:.4f} bits  "
              f"distance {e['distance_to_target']:.4g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
