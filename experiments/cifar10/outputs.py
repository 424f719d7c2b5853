"""What `python -m experiments.cifar10 analyze` writes and prints: the output folder (process 0
of a multi-process run stages, the others write nowhere), summary.json, curves.npz and the
figures of one analysis, and the I-MMSE cross-check line."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def output_folder(out: Path, names, overwrite: bool):
    """Where a run writes: the stage folder of `out` for `names` (`results.staged_outputs`) in
    process 0, a private temporary folder, removed afterwards, in the other processes of a
    multi-process run (they compute the same results and write none)."""
    import contextlib
    import tempfile

    from jaxdiff_info import distributed, results

    if distributed.is_primary():
        return results.staged_outputs(out, names, overwrite)

    @contextlib.contextmanager
    def private():
        with tempfile.TemporaryDirectory(prefix="jaxdiff-info-") as folder:
            yield Path(folder)

    return private()


def print_immse(summary: dict) -> None:
    """The I-MMSE cross-check at the class label, one line per source of x_0."""
    for source, entry in summary.get("immse", {}).items():
        if not isinstance(entry, dict) or "class_label" not in entry:
            continue
        row = entry["class_label"]
        lo, hi = row["half_time_difference_ci95"]
        below = row.get("immse_entropy_below_zero_until_time")
        why = "Monte Carlo noise: exact denoisers" if "reference" in summary else "inconsistent denoisers"
        print(f"  online vs {entry['estimator']:<11s} max |dH| {row['max_abs_entropy_difference_bits']:.3f} bits at "
              f"t/T {row['max_abs_entropy_difference_time']:.2f}; half time {row['half_time_difference']:+.3f} "
              f"(95% CI {lo:+.3f} to {hi:+.3f})"
              + (f"; I-MMSE H < 0 ({why}) below t/T {below:.2f}" if below is not None else ""))

def write_outputs(out: Path, result, settings: dict, extra: dict | None = None) -> dict:
    """summary.json, curves.npz and the figures of one analysis (`jaxdiff_info.analysis.Analysis`);
    extra: {prefix: Curves} also written to curves.npz (e.g. the references' curves)."""
    from jaxdiff_info import plots, results
    from jaxdiff_info.analysis import immse_differences

    curves = result.estimators()
    class_names = list(result.class_names)
    summary = {**settings, "posterior": {name: c.posterior for name, c in curves.items()},  # every estimator's
               "sampler": result.sampler, "class_names": class_names, "estimators": list(curves),
               "methods": results.methods(curves),
               "problems": [results.problem_summary(i, curves) for i in range(len(result.curves.problems))]}
    cross = immse_differences(result)
    if cross:
        summary["immse"] = cross
    if result.class_curves is not None:
        cc = result.class_curves
        summary["classes"] = [
            {"name": name, "index": k, "time": np.round(cc.time, 6).tolist(),
             "entropy_bits": np.round(cc.entropy_bits[k], 6).tolist(),
             "entropy_rate": np.round(cc.entropy_rate[k], 6).tolist(),
             "peak_time": round(float(cc.peak_time[k]), 6),
             "peak_time_ci95": np.round(cc.peak_time_ci95[k], 6).tolist(),
             "half_time": round(float(cc.half_time[k]), 6),
             "half_time_ci95": np.round(cc.half_time_ci95[k], 6).tolist()}
            for k, name in enumerate(class_names)]
    results.write_json(out / "summary.json", summary)
    arrays = {"time": result.time, "prior_entropy_bits": result.curves.prior_entropy_bits,
              "problem_names": np.array(result.curves.names), "mean_posterior": result.mean_posterior,
              "paths/log_posterior": result.paths, "paths/classes": result.path_classes, "x_0": result.x_0,
              "snapshots/t": np.array([s[0] for s in result.snapshots]),
              "snapshots/x_t": np.stack([s[1] for s in result.snapshots]),
              "snapshots/x0_hat": np.stack([s[2] for s in result.snapshots]),
              **results.curves_arrays(curves)}
    for prefix, c in (extra or {}).items():
        arrays.update({prefix + k: v for k, v in results.curves_arrays({"online": c}).items()})
    if result.class_curves is not None:
        arrays.update({f"classes/{k}": v for k, v in results.curves_arrays({"online": result.class_curves}).items()})
    results.write_npz(out / "curves.npz", arrays)

    num_train = settings.get("schedule", {}).get("train_steps", len(result.time))
    n = settings.get("num_samples_per_class")
    title = (f"{settings.get('model', 'model')}; {result.sampler}; {settings.get('generation', '')} generation, "
             f"{n} trajectories per class, {len(result.time)} steps")
    # a network's I-MMSE can leave every scale where its denoisers are inconsistent: the axes follow the others
    consistent = [name for name, c in curves.items() if c.posterior != "state (network denoisers)"]
    figures = {
        "entropy_rate.png": plots.curves_figure(curves, "entropy_rate", title, scale_by=consistent),
        "posterior_heatmap.png": plots.posterior_heatmap_figure(result.time, result.mean_posterior, class_names,
                                                                title, result.posterior),
        "posterior_paths.png": plots.snapshot_paths_figure(
            result.time, result.paths, result.path_classes, result.snapshots, class_names, num_train),
    }
    if "immse" in summary:
        figures["class_information.png"] = plots.class_information_figure(
            curves, class_names, f"information about the class per class, online classifier against I-MMSE; {title}",
            log_prior=result.log_prior)
    if result.class_curves is not None:
        figures["class_entropy_rate.png"] = plots.class_curves_figure(result.class_curves, title)
    else:  # unconditional: the class label's curve only
        figures["class_entropy_rate.png"] = plots.curves_figure(curves, "entropy_rate", title, select=[0])
    for name, fig in figures.items():
        results.save_figure(fig, out / name)
        plots.plt.close(fig)
    return summary
