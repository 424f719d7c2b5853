"""The figures of guidance runs (python -m experiments.guidance and its decisions command):
the samples against the exact p(x | not C) of a mixture, image samples per method, the class
fractions, the tracked P(C | x_t) and the effective scale along the paths, and how
classifier-free guidance moves the decisions (entropy, rate, peak and half-entropy times per w)."""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from jaxdiff_info import mixture, removal
from jaxdiff_info.curves import Curves
from jaxdiff_info.plots import TIME_LABEL, plt


def first_coordinate(mix: mixture.GaussianMixture) -> mixture.GaussianMixture:
    """The first coordinate's marginal, itself a 1-D mixture."""
    var0 = np.asarray(mix.stds, np.float64) ** 2
    if mix.basis is not None:
        var0 = var0 + np.sum(np.asarray(mix.spectrum, np.float64) * np.asarray(mix.basis, np.float64)[:, 0, :] ** 2, -1)
    return mixture.GaussianMixture(mix.means[:, :1], jnp.asarray(np.sqrt(var0), jnp.float32), mix.log_weights)


def density_figure(mix, mask, samples, names):
    """Per method (default scale): a histogram of the samples against the target's exact mass
    per bin, F(b_{i+1}) - F(b_i) over the bin width (point components included)."""
    first = first_coordinate(mix)
    target = removal.without_classes(first, mask)
    means = np.asarray(first.means)[:, 0]
    spread = 4.0 * float(np.asarray(first.stds).max()) + 2.0
    lo, hi = means.min() - spread, means.max() + spread
    bins = np.linspace(lo, hi, 161)
    exact = np.diff(removal.mixture_cdf(target, bins)) / np.diff(bins)
    keys = [k for k in samples if "/" not in k]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7.5, 1.9 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        x = samples[key][:, 0]
        outside = int(np.sum((x < lo) | (x > hi)))
        ax.hist(np.clip(x, lo, hi), bins=bins, weights=np.full(x.size, 1.0 / (x.size * np.diff(bins)[0])),
                color="tab:blue", alpha=0.6, label="samples")
        ax.stairs(exact, bins, color="black", lw=1.0, label="p(x | not C), exact")
        for k in np.flatnonzero(mask):
            ax.axvline(float(np.asarray(mix.means)[k, 0]), color="tab:red", ls=":", lw=1.0)
        note = f"; {outside} of {x.size} outside the axis (clipped to its ends)" if outside else ""
        ax.set_title(f"{key}{note}", fontsize=9)
        ax.set_yscale("symlog", linthresh=1e-2)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("x_0" if mix.dim == 1 else "first coordinate of x_0")
    removed = ", ".join(names[k] for k in np.flatnonzero(mask))
    fig.suptitle(f"samples without {removed} (red: removed class means)", fontsize=10)
    fig.tight_layout()
    return fig


def samples_figure(samples: Mapping[str, np.ndarray], forbidden: Mapping[str, np.ndarray], removed_names,
                   columns: int = 8, rows: int = 4):
    """Per method a grid of its first rows x columns image samples (N, H, W, C) in [-1, 1], a
    red frame on those the judge labels as a removed class (forbidden: (N,) bool); each title
    counts them among the samples shown and among all of the method's samples."""
    keys = list(samples)
    fig, axes = plt.subplots(1, len(keys), figsize=(2.3 * len(keys) * columns / rows * 0.55 + 0.5, 2.6),
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        x = np.clip((np.asarray(samples[key], np.float64) + 1.0) / 2.0, 0.0, 1.0)[:rows * columns]
        n, h, w, c = x.shape
        pad = 1
        tile = np.ones(((h + pad) * rows + pad, (w + pad) * columns + pad, c))
        for i in range(n):
            r, q = divmod(i, columns)
            tile[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
        ax.imshow(tile[..., 0] if c == 1 else tile, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        every = np.asarray(forbidden.get(key, np.zeros(len(samples[key]), bool)))
        flags = every[:n]
        for i in np.flatnonzero(flags):
            r, q = divmod(int(i), columns)
            ax.add_patch(plt.Rectangle((q * (w + pad) + pad - 1, r * (h + pad) + pad - 1), w + 1, h + 1,
                                       fill=False, edgecolor="red", lw=1.0))
        ax.set_title(f"{key}: {int(flags.sum())} of these {n} judged removed\n"
                     f"({int(every.sum())} of all {every.size}, {every.mean():.1%})", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"samples without {', '.join(removed_names)}; red frame: judged a removed class", fontsize=9)
    fig.tight_layout()
    return fig


def fractions_figure(entries, kept, q):
    """Class fractions of every method's samples over the remaining classes, against q_k."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(kept) + 0.5 * len(entries)), 3.4))
    width = 0.8 / (len(entries) + 1)
    x = np.arange(len(kept))
    ax.bar(x - 0.4 + 0.5 * width, q, width, color="white", edgecolor="black", label="target q_k")
    for i, e in enumerate(entries):
        f = np.array([e["class_fractions"][k] for k in kept], np.float64)
        ci = np.array([e["class_fractions_ci95"][k] for k in kept], np.float64)
        label = e["method"] if e["scale"] is None else f"{e['method']} {e['scale']:g}"
        ax.bar(x - 0.4 + (i + 1.5) * width, f, width, yerr=np.abs(ci.T - f), capsize=2,
               label=f"{label} (forbidden {e['forbidden_fraction']:.3f})")
    ax.set_xticks(x, kept)
    ax.set_xlabel("remaining class")
    ax.set_ylabel("fraction of samples")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig


def paths_figure(time_grid, paths, names, remove):
    """Tracked P(C | x_t) and the effective scale along the trajectories, generation right to left."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.0), sharex=True)
    for i, (key, run) in enumerate(paths.items()):
        color = f"C{i % 10}"
        top.plot(time_grid, np.asarray(run.removed_probability), color=color, lw=1.4, label=f"{key}: mean")
        p_paths = np.exp(np.asarray(run.path_log_posterior)[:, :, remove]).sum(-1)
        top.plot(time_grid, p_paths[:, :4], color=color, lw=0.5, alpha=0.5)
        stats = np.asarray(run.effective_scale)
        bottom.plot(time_grid, np.maximum(stats[:, 0], 1e-6), color=color, lw=1.4, label=f"{key}: mean")
        bottom.plot(time_grid, np.maximum(stats[:, 1], 1e-6), color=color, lw=1.0, ls="--", label=f"{key}: median")
    top.set_ylabel("tracked P(C | x_t, ..., x_T)")
    top.set_title(f"C = {{{', '.join(names[k] for k in remove)}}}; thin: single trajectories", fontsize=9)
    top.legend(fontsize=7, ncols=2)
    bottom.set_yscale("log")
    bottom.set_ylabel("effective scale  lam P/(1-P)  (w)")
    bottom.set_xlabel(TIME_LABEL)
    bottom.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return fig


def decisions_figure(curves: Mapping[float, Curves], class_curves: Mapping[float, Curves], label: str,
                     class_names: Sequence[str], title: str):
    """How classifier-free guidance w moves the decisions: H(Y | X_t) and its rate per w (the
    class label `label`, with 95% bands), and the peak and half-entropy times of the class
    label (black) and of each class's profile H_k against w, with 95% intervals."""
    fig, axes = plt.subplots(2, 2, figsize=(11.0, 7.0))
    weights = list(curves)
    for i, w in enumerate(weights):
        c = curves[w][label]
        color = plt.cm.viridis(i / max(len(weights) - 1, 1))
        for ax, y, band in ((axes[0, 0], c.entropy_bits, c.entropy_bits_ci95),
                            (axes[0, 1], c.entropy_rate, c.entropy_rate_ci95)):
            ax.plot(c.time, y, color=color, lw=1.3, label=f"w = {w:g}")
            if band is not None:
                ax.fill_between(c.time, band[:, 0], band[:, 1], color=color, alpha=0.2, lw=0)
    axes[0, 0].set_ylabel(f"H({label} | X_t), bits")
    axes[0, 1].set_ylabel("entropy rate dH/d(t/T), bits")
    for ax in axes[0]:
        ax.set_xlabel(TIME_LABEL)
        ax.legend(fontsize=7)
    x = np.arange(len(weights), dtype=float)
    for ax, field in ((axes[1, 0], "peak_time"), (axes[1, 1], "half_time")):
        spread = np.linspace(-0.25, 0.25, len(class_names)) if len(class_names) > 1 else np.zeros(1)
        for k, name in enumerate(class_names):
            values = np.array([getattr(class_curves[w], field)[k] for w in weights])
            ci = np.array([getattr(class_curves[w], f"{field}_ci95")[k] for w in weights])
            ax.errorbar(x + spread[k], values, yerr=np.abs(ci.T - values), fmt="o-", ms=3, lw=0.7, capsize=2,
                        color=f"C{k % 10}", label=f"class {name}")
        ci_label = [curves[w][label] for w in weights]
        values = np.array([getattr(c, field) for c in ci_label])
        ci = np.array([getattr(c, f"{field}_ci95") for c in ci_label])
        ax.errorbar(x, values, yerr=np.abs(ci.T - values), fmt="s-", ms=5, lw=2.0, capsize=3, color="black",
                    label=label)
        ax.set_xticks(x, [f"{w:g}" for w in weights])
        ax.set_xlabel("classifier-free guidance w")
        ax.set_ylabel(("peak t/T of the entropy rate" if field == "peak_time" else "half-entropy t/T")
                      + " (0: never halves)" * (field == "half_time"))
        ax.legend(fontsize=6, ncols=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
