"""Generate with a trained class-conditional network without some of its classes, and judge the
samples by a classifier that is not the diffusion model:

    python -m experiments.guidance --checkpoint checkpoints/tiny-digits --remove 1

A network has no exact p(x | not C), so the metrics of the mixtures give way to judged ones:
scikit-learn's LogisticRegression fitted on the checkpoint's training images (flattened pixels in
[-1, 1]) labels every sample; the forbidden fraction is the share it labels as a removed class,
the class balance the shares of the remaining classes among the rest (with their KL to the
renormalised prior), and the distance a Fréchet distance to the held-out images of the remaining
classes, in the judge's logits and (for small images) in pixels, with a floor from two halves of
those held-out images. Writes into --out: summary.json, samples.npz, samples.png,
class_fractions.png, guidance_paths.png.
"""

from __future__ import annotations

import sys

import numpy as np

from experiments import cli

OUTPUTS = ("summary.json", "samples.npz", "samples.png", "class_fractions.png", "guidance_paths.png")
METHODS = ("unguided", "dng", "dng_published", "negative")
FLOOR_REPLICATES = 20
BATCH = 256  # trajectories per network call

POSTERIOR = ("the tracked P(C | x_t) is P(C | x_t, ..., x_T) of the online classifier with the unguided class "
             "kernels N(mu(x_t, eps_k), sigma_t^2), evaluated on the guided path: the posterior of the unguided "
             "model, not of the guided path law; with a network it approximates the state posterior P(C | x_t) of "
             "the model as far as its Gaussian reverse steps approximate the reverse of its forward chain")
METRICS = {
    "judge": "scikit-learn LogisticRegression (lbfgs, C = 1, multinomial) on the flattened pixels in [-1, 1] of the "
             "checkpoint dataset's training split; its held_out_accuracy is on the test split",
    "forbidden_fraction": "the fraction of samples the judge labels as a removed class",
    "class_fractions": "the fraction of each remaining class among the samples the judge labels as a remaining class",
    "kl_to_target_bits": "KL(class fractions || q) in bits, q_k = pi_k / (1 - pi_C), pi the training split's class "
                         "frequencies (the prior the tracker starts from)",
    "frechet_distance_judge_logits": "Fréchet distance between Gaussians fitted to the judge's K logits of the "
                                     "samples and of the held-out test images of the remaining classes (not FID: no "
                                     "Inception network)",
    "frechet_distance_pixels": "the same in pixel space (images of at most {max_dim} pixel values)",
    "matched": "the same distance at the floor's sizes: a random half-size subset of the samples against the "
               "other half of the held-out images, mean over the floor's splits (comparable with the floor)",
    "floor": "the distance between two random halves of the held-out images of the remaining classes, mean over "
             "{n} splits and their 2.5-97.5 percentile range: what real images of that size score",
    "held_out": "row 'held_out': the judged metrics of those held-out images themselves (the judge's own errors)",
    "ci95": "2.5-97.5 percentiles of 'bootstrap' resamples of the samples (the held-out reference fixed); for the KL "
            "and the distances, which resampling biases up, shifted down by the bootstrap's bias estimate "
            "(mean over resamples minus the value) and clipped at 0",
}


def _r(a, digits: int = 6):
    """Rounded, as JSON: null where a value is undefined (e.g. class fractions when every sample
    is judged to a removed class)."""
    a = np.round(np.asarray(a, np.float64), digits)
    return np.where(np.isfinite(a), a, None).tolist()


def check_methods(methods) -> None:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"--methods {bad[0]}: with --checkpoint there is no exact p(x | not C) (held-out images of "
                         f"the remaining classes stand in); choose from {', '.join(METHODS)}")


def _entry(method, scale, default, key, m, kept, extra) -> dict:
    entry = {
        "method": method, "scale": scale, "default_scale": default, "samples_key": key, **extra,
        "forbidden_fraction": _r(m.forbidden_fraction), "forbidden_fraction_ci95": _r(m.forbidden_fraction_ci95),
        "class_fractions": dict(zip(kept, _r(m.class_fractions))),
        "class_fractions_ci95": dict(zip(kept, _r(m.class_fractions_ci95))),
        "kl_to_target_bits": _r(m.kl_to_target_bits), "kl_to_target_bits_ci95": _r(m.kl_to_target_bits_ci95),
    }
    for space, (value, ci) in m.distances.items():
        entry[f"frechet_distance_{space}"] = _r(value)
        entry[f"frechet_distance_{space}_ci95"] = _r(ci)
    return entry


def run(config, scales: dict, resolve_classes) -> dict:
    """The --checkpoint run of `experiments.guidance` (config: its Config)."""
    import jax
    from tqdm import tqdm

    import jaxdiff_info as jdi
    from jaxdiff_info import guidance, guidance_plots, plots, removal, results, training, unet
    from jaxdiff_info.analysis import IMAGE_SAMPLER
    from jaxdiff_info.data import load_dataset, to_model_range

    check_methods(config.methods)
    model = training.load_checkpoint(config.checkpoint)
    if not model.has_null:
        raise ValueError(f"{config.checkpoint} has no null class (trained with label dropout 0): generating without "
                         "a class needs the unconditional eps(x_t, t, null); train with label dropout > 0")
    names = list(model.class_names)
    K = model.config.num_classes
    remove = resolve_classes(config.remove, names)
    mask = guidance.removal_mask(remove, K)
    if not 2 <= config.steps <= model.num_train_steps:
        raise ValueError(f"--steps must be >= 2 and <= {model.num_train_steps} (the model's schedule has only "
                         f"{model.num_train_steps} steps), got {config.steps}")
    train = load_dataset(model.dataset, config.data_dir, split="train", seed=training.DATA_SEED)
    test = load_dataset(model.dataset, config.data_dir, split="test", seed=training.DATA_SEED)
    counts = np.bincount(train.labels, minlength=K).astype(np.float64)
    prior = counts / counts.sum()
    q = prior[~mask] / prior[~mask].sum()
    kept = [names[k] for k in range(K) if not mask[k]]
    judge = removal.fit_judge((to_model_range(train.images), train.labels),
                              (to_model_range(test.images), test.labels), K)
    held = to_model_range(test.images[~mask[test.labels]])
    pixels = int(np.prod(held.shape[1:])) <= removal.PIXEL_FRECHET_MAX_DIM

    def features(x):
        out = {"judge_logits": judge.logits(x)}
        if pixels:
            out["pixels"] = np.asarray(x, np.float64).reshape(len(x), -1)
        return out

    reference = features(held)
    train_schedule = jdi.linear_schedule(model.num_train_steps)
    schedule = train_schedule if config.steps == model.num_train_steps else jdi.respace(train_schedule, config.steps)
    sampler = IMAGE_SAMPLER
    shape = (model.config.image_size, model.config.image_size, model.config.channels)
    runs = [(m, None, True) for m in config.methods if m == "unguided"]
    runs += [(m, s, i == 0) for m in config.methods if m != "unguided" for i, s in enumerate(scales[m])]
    options = dict(max_ratio=config.max_ratio, prior=config.published_prior, temperature=config.temperature,
                   offset=config.offset, p_min=config.p_min, p_max=config.p_max)

    with results.staged_outputs(config.out, OUTPUTS, config.overwrite) as out:
        eps = unet.make_eps_fn(model.config)
        key_run, key_floor, key_boot = jax.random.split(jax.random.key(config.seed), 3)
        n = config.num_samples
        bar = tqdm(total=len(runs) + 1, unit="run", desc="guidance", disable=not config.progress, file=sys.stderr)
        progress = cli.with_checkpoint(bar.update)
        entries, samples, paths, forbidden = [], {}, {}, {}
        for i, (method, scale, default) in enumerate(runs):
            bar.set_postfix_str(method if scale is None else f"{method} {scale:g}")
            g = guidance.Guidance("none" if method == "unguided" else method, **options)
            done = guidance.sample(eps, model.params, schedule, sampler, key_run, remove, num=n, shape=shape,
                                   log_prior=np.log(prior), guidance=g, scale=scale or 0.0, batch_size=BATCH)
            x_0 = np.asarray(done.x_0, np.float32)
            if not np.all(np.isfinite(x_0)):
                raise FloatingPointError(f"non-finite samples from {method} at scale {scale}; use a smaller --scales value")
            key = method if default or scale is None else f"{method}/{scale:g}"
            labels = judge.labels(x_0)
            samples[key], paths[key], forbidden[key] = x_0, done, mask[labels]
            m = removal.judged_metrics(labels, features(x_0), reference, mask, q, jax.random.fold_in(key_boot, i),
                                       config.num_resamples)
            floor = removal.held_out_floor(features(x_0), reference, key_floor, FLOOR_REPLICATES)
            stats = np.asarray(done.effective_scale)
            entries.append(_entry(method, scale, default, key, m, kept, {
                "guidance": g.describe(scale or 0.0), "posterior": POSTERIOR, "kernel": sampler.describe()}) | {
                **{f"frechet_distance_{s}_matched": _r(f["matched"]) for s, f in floor.items()},
                **{f"frechet_distance_{s}_matched_range": _r(f["matched_range"]) for s, f in floor.items()},
                "max_effective_scale": _r(stats[:, 2].max()),
                "mean_removed_probability_at_end": _r(np.asarray(done.removed_probability)[-1])})
            progress(1)
        held_labels = judge.labels(held)
        m = removal.judged_metrics(held_labels, reference, reference, mask, q, jax.random.fold_in(key_boot, len(runs)),
                                   config.num_resamples)
        floor = removal.held_out_floor(reference, reference, key_floor, FLOOR_REPLICATES)
        entries.append(_entry("held_out", None, True, None, m, kept, {
            "guidance": f"held-out {model.dataset} test images of the remaining classes ({len(held)})",
            "posterior": "none: no generation", "kernel": "none"}) | {
            **{f"frechet_distance_{s}": _r(f["floor"]) for s, f in floor.items()},
            **{f"frechet_distance_{s}_ci95": _r(f["floor_range"]) for s, f in floor.items()}})
        progress(1)
        bar.close()
        summary = {
            "model": {"checkpoint": str(config.checkpoint), "step": model.step, "config": model.config_name,
                      "dataset": model.dataset, "train_steps": model.num_train_steps},
            "class_names": names,
            "removed": {"classes": remove, "names": [names[k] for k in remove], "prior_weight": _r(prior[mask].sum())},
            "target": {"classes": kept, "class_weights": _r(q)},
            "prior": {"class_weights": _r(prior), "source": "the class frequencies of the training split"},
            "schedule": {"steps": schedule.num_steps, "train_steps": model.num_train_steps},
            "sampler": sampler.describe(),
            "num_samples": n,
            "seed": config.seed,
            "judge": {"held_out_accuracy": _r(judge.accuracy), "num_train": judge.num_train,
                      "num_test": judge.num_test},
            "held_out": {"num_images": len(held),
                         "floor": {s: {"distance": _r(f["floor"]), "range": _r(f["floor_range"]),
                                       "sizes": f["sizes"]} for s, f in floor.items()}},
            "metrics": {k: v.format(max_dim=removal.PIXEL_FRECHET_MAX_DIM, n=FLOOR_REPLICATES)
                        for k, v in METRICS.items()},
            "bootstrap": config.num_resamples,
            "results": entries,
        }
        results.write_json(out / "summary.json", summary)
        results.write_npz(out / "samples.npz", samples)
        time_grid = np.asarray(schedule.time)[::-1]  # generation order
        figures = {
            "samples.png": guidance_plots.samples_figure({k: v for k, v in samples.items() if "/" not in k}, forbidden,
                                                         [names[k] for k in remove]),
            "class_fractions.png": guidance_plots.fractions_figure(entries, kept, q),
            "guidance_paths.png": guidance_plots.paths_figure(time_grid, {k: v for k, v in paths.items()
                                                                          if k != "unguided"}, names, remove),
        }
        for name, fig in figures.items():
            results.save_figure(fig, out / name)
            plots.plt.close(fig)
        cli.checkpoint()
        return summary


def print_summary(summary: dict) -> None:
    spaces = list(summary["held_out"]["floor"])
    floors = ", ".join(f"{s} {f['distance']:.4g}" for s, f in summary["held_out"]["floor"].items())
    print(f"  without {', '.join(summary['removed']['names'])}; judge accuracy "
          f"{summary['judge']['held_out_accuracy']:.3f} on held-out images; Fréchet floor (two halves of "
          f"held-out images): {floors}")
    for e in summary["results"]:
        label = e["method"] if e["scale"] is None else f"{e['method']} {e['scale']:g}"
        dist = "  ".join(f"FD {s} {e[f'frechet_distance_{s}']:.4g}"
                         + (f" (matched {e[f'frechet_distance_{s}_matched']:.4g})"
                            if f"frechet_distance_{s}_matched" in e else "") for s in spaces)
        kl = "undefined" if e["kl_to_target_bits"] is None else f"{e['kl_to_target_bits']:.4f} bits"
        print(f"  {label:<20s} forbidden {e['forbidden_fraction']:.4f}  KL {kl}  {dist}")
