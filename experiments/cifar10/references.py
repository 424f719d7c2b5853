"""The exact reference models in `python -m experiments.cifar10 analyze`: analysing one on its
own (--reference gaussian|empirical --dataset NAME) and holding a trained network against
both (--checkpoint DIR --compare-references).

The references are built from the training split a network is trained on (the same images:
`training.DATA_SEED`, and for a checkpoint the number of examples its config.json records),
mapped to [-1, 1] (`jaxdiff_info.references`).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_reference(name: str, dataset: str, data_dir: Path, num_examples: int | None = None):
    """(mixture, image shape, class names, the dataset's decision problems, a description)
    of reference `name` of the training split of `dataset`. ValueError, one line, for an
    unknown reference or a dataset that cannot be loaded."""
    from jaxdiff_info import references, training
    from jaxdiff_info.data import DATASETS, load_dataset, to_model_range

    if name not in references.REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose one of {', '.join(references.REFERENCES)}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    data = load_dataset(dataset, data_dir, split="train", seed=training.DATA_SEED, num_examples=num_examples)
    images = to_model_range(data.images)
    mixture = references.make_reference(name, images, data.labels, data.num_classes)
    kind = ("full covariances" if mixture.complete else f"rank {mixture.rank} plus isotropic") \
        if name == "gaussian" else f"{mixture.num_components} training images"
    description = f"{name} reference of {dataset} ({data.num_classes} classes, {kind})"
    return mixture, tuple(images.shape[1:]), data.class_names, data.decision_problems, description


def checkpoint_examples(checkpoint: Path) -> int | None:
    """How many training images the run in `checkpoint` used (its config.json), or None."""
    try:
        meta = json.loads((Path(checkpoint) / "config.json").read_text())
        return int(meta["dataset"]["num_examples"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bytes_needed(mixture, samples_per_class: int, num_snapshots: int) -> int:
    """A generous estimate of a reference analysis' peak memory in bytes: per trajectory
    (N = C * samples_per_class) the component log-likelihoods and within-class weights (4 K),
    every class's eps and reverse means (3 (C + 1) d), x_t, noise and snapshots; the mixture
    three times (its padded class layout included); twice for intermediates; plus 0.5 GB."""
    K, C, d = mixture.num_components, mixture.num_classes, mixture.dim
    n = C * samples_per_class
    per_trajectory = 4 * K + 3 * (C + 1) * d + (6 + 2 * num_snapshots) * d
    model = 3 * K * d * (1 + mixture.rank)
    return 512 * 2**20 + 4 * (2 * n * per_trajectory + model)


def compare(network_result, reference_results: dict, label_index: int) -> dict:
    """summary.json's "references": for every reference, per problem and per class, how the
    network's online curves differ from the reference's (network minus reference)."""
    from jaxdiff_info import results

    from jaxdiff_info.curves import bootstrap_replicates

    out = {"difference_method": results.DIFFERENCE_METHOD}
    net, net_classes = network_result.curves, network_result.class_curves
    net_resamples = bootstrap_replicates(net)  # drawn once for every reference and row
    net_class_resamples = None if net_classes is None else bootstrap_replicates(net_classes)
    for name, (ref, description) in reference_results.items():
        entry = {"model": description, "posterior": ref.posterior,
                 "problems": [], "classes": []}
        pair = (net_resamples, bootstrap_replicates(ref.curves))
        for i, problem in enumerate(net.problems):
            entry["problems"].append({"name": problem.name, "peak_time": round(float(ref.curves.peak_time[i]), 6),
                                      "half_time": round(float(ref.curves.half_time[i]), 6),
                                      **results.curve_differences(net, ref.curves, i, replicates=pair)})
        if net_classes is not None and ref.class_curves is not None:
            pair = (net_class_resamples, bootstrap_replicates(ref.class_curves))
            for k, cls in enumerate(net_classes.names):
                entry["classes"].append({"name": cls, "peak_time": round(float(ref.class_curves.peak_time[k]), 6),
                                         "half_time": round(float(ref.class_curves.half_time[k]), 6),
                                         **results.curve_differences(net_classes, ref.class_curves, k,
                                                                     replicates=pair)})
        out[name] = entry
    out["label_problem"] = net.problems[label_index].name
    return out


def overlay_figure(network_result, reference_results: dict, label_index: int, network_description: str,
                   title: str):
    from jaxdiff_info import plots

    label = {"network": network_result.curves, **{n: r.curves for n, (r, _) in reference_results.items()}}
    classes = {"network": network_result.class_curves,
               **{n: r.class_curves for n, (r, _) in reference_results.items()}}
    descriptions = {"network": network_description, **{n: d for n, (_, d) in reference_results.items()}}
    return plots.reference_overlay_figure(label, classes, label_index, descriptions, title)


def print_comparison(summary: dict) -> None:
    """The differences at the class label, one line per reference."""
    refs = summary.get("references")
    if not refs:
        return
    for name in ("gaussian", "empirical"):
        if name not in refs:
            continue
        row = next(p for p in refs[name]["problems"] if p["name"] == refs["label_problem"])
        lo, hi = row["half_time_difference_ci95"]
        print(f"  network vs {name:<9s} max |dH| {row['max_abs_entropy_difference_bits']:.3f} bits at t/T "
              f"{row['max_abs_entropy_difference_time']:.2f}; half time {row['half_time_difference']:+.3f} "
              f"(95% CI {lo:+.3f} to {hi:+.3f})")


__all__ = ["bytes_needed", "checkpoint_examples", "compare", "load_reference",
           "overlay_figure", "print_comparison"]
