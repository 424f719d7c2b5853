"""How classifier-free guidance moves the decisions: the class label's entropy and entropy rate,
and each class's profile, under eps_k + w (eps_k - eps_null) for several w, on a mixture or a
trained network.

    python -m experiments.guidance decisions                       # the paper's points at -8, -4, 6, 8
    python -m experiments.guidance decisions --spec mixture.json --weights 0,1,4
    python -m experiments.guidance decisions --checkpoint checkpoints/tiny-digits --steps 100

Every w runs the online classifier along class-conditional trajectories of the guided kernels
(`jaxdiff_info.online_curves` with guidance=w, same seed for every w); for w > 0 the tracker's
P(k | x_t, ..., x_T) is the posterior under the guided path law (posterior "path"), not the
state posterior P(k | x_t) of the unguided model. Writes into --out: summary.json, curves.npz,
decisions.png.
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

PROG = "python -m experiments.guidance decisions"
OUTPUTS = ("summary.json", "curves.npz", "decisions.png")
DEFAULT_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0)
POSTERIOR_NOTE = ("w = 0: the tracker's P(k | x_t, ..., x_T) is the state posterior of the model (exactly for a "
                  "mixture of points with sigma_t^2 = beta~_t, else approximately, posterior as given); w > 0: the "
                  "class kernels are the guided ones, eps_k + w (eps_k - eps_null), and the tracked posterior is the "
                  "posterior of the guided path law (posterior 'path'): which guided class generated the path, not "
                  "P(k | x_t) of the unguided model. The times move because the question changes with w as well as "
                  "because the samples do")


@dataclasses.dataclass(frozen=True)
class Config:
    spec: dict | None = None  # a mixture (None with checkpoint)
    checkpoint: Path | None = None
    weights: tuple[float, ...] = DEFAULT_WEIGHTS
    samples_per_class: int = 256
    steps: int = 1000
    seed: int = 0
    num_resamples: int = 200
    out: Path = Path("results/guidance_decisions")
    overwrite: bool = False
    progress: bool = True


def _r(a, digits: int = 6):
    return np.round(np.asarray(a, np.float64), digits).tolist()


def _times(c, index: int) -> dict:
    """Peak and half-entropy times of row `index` of curves c, with their 95% intervals."""
    return {"peak_time": _r(c.peak_time[index]), "peak_time_ci95": _r(c.peak_time_ci95[index]),
            "half_time": _r(c.half_time[index]), "half_time_ci95": _r(c.half_time_ci95[index])}


def _model(config: Config):
    """(model, problems, schedule, sampler, class names, description, settings) of the run."""
    import jaxdiff_info as jdi
    from experiments.gmm import build_problem, component_name, mixture_summary

    if config.checkpoint is None:
        from jaxdiff_info.api import DEFAULT_SAMPLER

        mix, problems = build_problem(config.spec)
        if config.steps < 21:
            raise ValueError(f"--steps must be >= 21 for the linear schedule, got {config.steps}")
        check_memory(config, mix, len(problems))
        names = [component_name(mix, k) for k in range(mix.num_classes)]
        return (mix, problems, jdi.linear_schedule(config.steps), DEFAULT_SAMPLER, names, "mixture",
                {"mixture": mixture_summary(config.spec, mix)})
    from jaxdiff_info import decisions, training, unet
    from jaxdiff_info.analysis import IMAGE_SAMPLER

    model = training.load_checkpoint(config.checkpoint)
    if not model.has_null and any(w != 0 for w in config.weights):
        raise ValueError(f"{config.checkpoint} has no null class (trained with label dropout 0): classifier-free "
                         "guidance needs the unconditional eps(x_t, t, null); use --weights 0 or another checkpoint")
    if not 2 <= config.steps <= model.num_train_steps:
        raise ValueError(f"--steps must be >= 2 and <= {model.num_train_steps} (the model's schedule has only "
                         f"{model.num_train_steps} steps), got {config.steps}")
    check_memory(config, model.config, unet.count_params(model.params))
    K = model.config.num_classes
    shape = (model.config.image_size, model.config.image_size, model.config.channels)
    network = jdi.Network(unet.make_eps_fn(model.config), model.params, shape, K, has_null=model.has_null)
    train = jdi.linear_schedule(model.num_train_steps)
    schedule = train if config.steps == model.num_train_steps else jdi.respace(train, config.steps)
    problems = [decisions.class_label(K, "class")]
    description = f"{model.config_name} on {model.dataset}, step {model.step}"
    return (network, problems, schedule, IMAGE_SAMPLER, list(model.class_names), description,
            {"model": {"checkpoint": str(config.checkpoint), "step": model.step, "config": model.config_name,
                       "dataset": model.dataset, "train_steps": model.num_train_steps}})


def check_memory(config: Config, model, size: int) -> None:
    """ValueError, one line, if the run cannot fit in the memory available (the largest --steps or
    --samples-per-class that does): for a mixture (`size`: its number of problems) the estimate of
    python -m experiments.gmm, for a network (`size`: its parameters) that of analyze, every class
    and the null class in each call."""
    from experiments import gmm
    from experiments.cifar10 import analyze
    from jaxdiff_info import mixture

    if isinstance(model, mixture.GaussianMixture):
        def needed(samples_per_class: int, steps: int = config.steps) -> int:
            return gmm.bytes_needed(model.num_classes, model.dim, size, samples_per_class, steps,
                                    num_components=model.num_components, num_resamples=config.num_resamples)

        cli.check_memory("--steps", config.steps, lambda steps: needed(2, steps), minimum=2)
    else:
        def needed(samples_per_class: int) -> int:
            return analyze.bytes_needed(model, size, samples_per_class, None, model.num_classes + 1, 2)
    cli.check_memory("--samples-per-class", config.samples_per_class, needed, minimum=2)


def run(config: Config) -> dict:
    """Online curves and per-class curves for every w; the outputs all together or nothing."""
    import jax
    from tqdm import tqdm

    import jaxdiff_info as jdi
    from jaxdiff_info import analysis, guidance_plots, plots, results
    from jaxdiff_info import curves as curves_lib
    from jaxdiff_info import mixture as gmm

    model, problems, schedule, sampler, names, description, settings = _model(config)
    mixture = isinstance(model, gmm.GaussianMixture)
    label = next(p.name for p in problems if sorted(map(len, p.groups)) == [1] * len(names))
    key = jax.random.key(config.seed)
    with results.staged_outputs(config.out, OUTPUTS, config.overwrite) as out:
        bar = tqdm(total=schedule.num_steps * len(config.weights), unit="step", desc="decisions",
                   disable=not config.progress, file=sys.stderr)
        progress = cli.with_checkpoint(bar.update)
        by_w, per_class = {}, {}
        for w in config.weights:
            bar.set_postfix_str(f"w {w:g}")
            if mixture:
                c = jdi.online_curves(model, problems, schedule, samples_per_class=config.samples_per_class, key=key,
                                      sampler=sampler, guidance=w, num_resamples=config.num_resamples,
                                      progress=progress)
                pc = curves_lib.class_curves(c, label, names, jax.random.fold_in(key, 8))
            else:
                a = analysis.analyze_model(model, schedule, problems, samples_per_class=config.samples_per_class,
                                           key=key, sampler=sampler, guidance=w, class_names=names,
                                           num_resamples=config.num_resamples, immse=False, num_snapshots=2,
                                           progress=progress)
                c, pc = a.curves, a.class_curves
            by_w[w], per_class[w] = c, pc
        bar.close()
        entries = []
        base = by_w.get(0.0)
        for w in config.weights:
            c, pc = by_w[w], per_class[w]
            entry = {"guidance": w, "posterior": c.posterior, "method": c.method,
                     "problems": [{"name": p.name, **_times(c, i)} for i, p in enumerate(c.problems)],
                     "classes": [{"name": n, **_times(pc, k)} for k, n in enumerate(names)]}
            if base is not None and w != 0.0:
                i = c.index(label)
                entry["class_label_shift_vs_unguided"] = {
                    f: _r(getattr(c, f)[i] - getattr(base, f)[i]) for f in ("peak_time", "half_time")}
            entries.append(entry)
        summary = {
            **settings,
            "class_names": names,
            "class_label": label,
            "weights": list(config.weights),
            "guidance": "classifier-free: every class kernel uses eps_k + w (eps_k - eps_null)",
            "schedule": {"steps": schedule.num_steps},
            "sampler": sampler.describe(),
            "num_samples_per_class": config.samples_per_class,
            "seed": config.seed,
            "bootstrap": config.num_resamples,
            "posterior_note": POSTERIOR_NOTE,
            "shift_note": "class_label_shift_vs_unguided: the class label's time at w minus at w = 0, same seed; "
                          "positive is toward t = T (decided earlier in generation)",
            "results": entries,
            "problems": [results.problem_summary(i, {f"w={w:g}": by_w[w] for w in config.weights})
                         for i in range(len(problems))],
        }
        results.write_json(out / "summary.json", summary)
        arrays = {}
        for w in config.weights:
            arrays.update(results.curves_arrays({f"w={w:g}": by_w[w], f"w={w:g}/per_class": per_class[w]}))
        results.write_npz(out / "curves.npz", arrays)
        title = (f"{description}: classifier-free guidance, {config.samples_per_class} trajectories per class, "
                 f"{schedule.num_steps} steps, {sampler.describe()}; w > 0: posterior of the guided path law")
        fig = guidance_plots.decisions_figure(by_w, per_class, label, names, title)
        results.save_figure(fig, out / "decisions.png")
        plots.plt.close(fig)
        cli.checkpoint()
        return summary


def parse_args(argv: Sequence[str] | None) -> Config:
    from experiments.guidance import model_spec

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=str, default=None,
                   help="mixture JSON, as for python -m experiments.gmm (default: the paper's points at -8, -4, 6, 8)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a training directory of python -m experiments.cifar10 train in place of a mixture "
                        "(default: none, a mixture)")
    p.add_argument("--weights", type=str, default=",".join(f"{w:g}" for w in DEFAULT_WEIGHTS),
                   help="comma list of guidance weights w >= 0")
    p.add_argument("--samples-per-class", type=int, default=Config.samples_per_class,
                   help="trajectories per class and weight")
    p.add_argument("--steps", type=int, default=Config.steps,
                   help="diffusion steps T (linear schedule; with --checkpoint respaced from the model's)")
    p.add_argument("--seed", type=int, default=Config.seed, help="seed of every random draw (the same for every w)")
    p.add_argument("--bootstrap", type=cli.resamples, default=Config.num_resamples, help="bootstrap resamples")
    p.add_argument("--out", type=cli.folder, default=Config.out, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    spec = model_spec(p, a)
    try:
        weights = tuple(float(x) for x in a.weights.split(",") if x.strip())
    except ValueError:
        p.error(f"--weights {a.weights}: not a comma list of numbers")
    if not weights:
        p.error("--weights: name at least one weight")
    bad = [w for w in weights if not (math.isfinite(w) and w >= 0)]
    if bad:
        p.error(f"--weights: a guidance weight must be a finite number >= 0, got {bad[0]:g}")
    if len(set(weights)) != len(weights):
        p.error(f"--weights {a.weights}: a weight is repeated")
    if a.samples_per_class < 2:
        p.error(f"--samples-per-class must be >= 2 (for confidence intervals), got {a.samples_per_class}")
    return Config(spec=spec, checkpoint=a.checkpoint, weights=weights, samples_per_class=a.samples_per_class,
                  steps=a.steps, seed=a.seed, num_resamples=a.bootstrap, out=a.out, overwrite=a.overwrite,
                  progress=not a.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    enable_compilation_cache()
    start = time.perf_counter()
    status, summary = run_command(PROG, lambda: run(config), out=config.out, outputs=OUTPUTS)
    if status:
        return status
    report_written(OUTPUTS, config.out, start)
    for e in summary["results"]:
        p = next(q for q in e["problems"] if q["name"] == summary["class_label"])
        lo, hi = p["half_time_ci95"]
        plo, phi = p["peak_time_ci95"]
        print(f"  w {e['guidance']:<4g} {summary['class_label']}: peak t/T {p['peak_time']:.3f} ({plo:.3f}-{phi:.3f}), "
              f"half-entropy t/T {p['half_time']:.3f} ({lo:.3f}-{hi:.3f}); posterior {e['posterior']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
