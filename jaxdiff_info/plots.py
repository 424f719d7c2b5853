"""Figures (matplotlib, Agg backend): entropy-rate curves, posteriors along paths, densities."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff_info.curves import Curves  # noqa: E402

STYLE = {
    "exact": dict(color="black", lw=1.6, ls="-", label="exact (quadrature)"),
    "forward_mc": dict(color="tab:blue", lw=1.2, ls="--", label="forward Monte Carlo"),
    "online": dict(color="tab:red", lw=1.2, ls="-", label="online classifier"),
    "online_state": dict(color="tab:orange", lw=1.0, ls=":", label="exact P(k | x_t) on the online paths"),
    "immse": dict(color="tab:green", lw=1.2, ls="-.", label="I-MMSE (denoising errors)"),
    "immse_model": dict(color="tab:purple", lw=1.2, ls="--", label="I-MMSE on the model's own samples"),
}


def _grid(n: int, width: float = 3.6, height: float = 2.6):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharex=True)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


TIME_LABEL = "t/T  (generation runs from t/T = 1 to 0: right to left)"
RATE_LABEL = "dH/d(t/T)  [bits per unit t/T]"
ENTROPY_LABEL = "H(Z | X_t)  [bits]"


def posterior_line(curves: Mapping[str, Curves]) -> str:
    """One line saying which posterior each estimator's entropies are of (`Curves.posterior`),
    estimators of the same posterior together, as a figure's title says it."""
    by_posterior: dict[str, list[str]] = {}
    for name, c in curves.items():
        by_posterior.setdefault(c.posterior, []).append(STYLE.get(name, {}).get("label", name))
    return "posterior: " + "; ".join(f"{', '.join(names)}: {p}" for p, names in by_posterior.items())


def _suptitle(fig, *lines: str | None, fontsize: float = 9):
    """The figure's title from the lines given (empty ones left out), each wrapped to the
    figure's width; the title's Text, or None when there is none."""
    import textwrap

    lines = [line for line in lines if line]
    if not lines:
        return None
    chars = max(40, int(fig.get_figwidth() * 72 / (0.55 * fontsize)))
    return fig.suptitle("\n".join(textwrap.fill(line, chars) for text in lines for line in text.split("\n")),
                        fontsize=fontsize)


def _legend_below(fig, handles, labels, ncol: int, title=None, legend_title: str | None = None) -> None:
    """A legend centred under the panels: the figure grows by the legend's and the title's
    (the Text `title`) height, so that the panels keep theirs, and the panels are laid out
    above the legend. legend_title: a line heading the legend."""
    legend = fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False,
                        title=legend_title, title_fontsize=7)
    fig.canvas.draw()
    legend_in = legend.get_window_extent().height / fig.dpi + 0.08
    title_in = title.get_window_extent().height / fig.dpi + 0.1 if title is not None else 0.0
    height = fig.get_figheight() + legend_in + title_in
    fig.set_figheight(height)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))


def _clip_note(ax, lines: Sequence[tuple[str, np.ndarray]], top: float) -> None:
    """Limit the panel's y axis to `top` and say which curves leave it, and how far."""
    ax.set_ylim(top=top)
    off = [f"{label} leaves the axis (max {np.nanmax(y):.3g})" for label, y in lines if np.nanmax(y) > top]
    if off:
        ax.text(0.02, 0.97, "\n".join(off), transform=ax.transAxes, va="top", ha="left", fontsize=6,
                color="dimgrey")


def curves_figure(curves: Mapping[str, Curves], field: str, title: str | None = None,
                  select: Sequence[int] | None = None, scale_by: Sequence[str] | None = None):
    """One panel per decision problem (named as in the summary), every estimator overlaid
    with its 95% bootstrap band. field "entropy_rate": each estimator's peak time marked,
    with its 95% interval; field "entropy_bits": the prior H(Z) as a line. title: a line
    naming the mixture or model, the sampler and the number of trajectories; a line naming
    each estimator's posterior follows it. select: the problems to show, by index (default
    all). scale_by: the estimators whose curves set the y axis (default all); a curve of
    another that leaves it is named in the panel with its largest value."""
    first = next(iter(curves.values()))
    select = list(range(len(first.problems))) if select is None else list(select)
    fig, axes = _grid(len(select))
    rate = field == "entropy_rate"
    for i, ax in zip(select, axes):
        problem = first.problems[i]
        scaled, others = [], []
        for name, c in curves.items():
            if problem.name not in c.names:  # an estimator of some of the problems only (I-MMSE of a network)
                continue
            i = c.index(problem.name)
            style = {**STYLE.get(name, dict(label=name))}
            color = style.get("color")
            ax.plot(c.time, getattr(c, field)[i], **style)
            (scaled if scale_by is None or name in scale_by else others).append((style["label"], getattr(c, field)[i]))
            band = getattr(c, f"{field}_ci95")
            if band is not None:
                ax.fill_between(c.time, band[i, :, 0], band[i, :, 1], color=color, alpha=0.2, lw=0,
                                label=f"{style['label']}: 95% bootstrap band")
            if rate:
                ax.axvline(c.peak_time[i], color=color, lw=0.8, ls=":",
                           label=f"{style['label']}: peak t/T" + (" and its 95% CI" if c.peak_time_ci95 is not None
                                                                  else ""))
                if c.peak_time_ci95 is not None:
                    lo, hi = c.peak_time_ci95[i]
                    ax.axvspan(lo, hi, ymin=0.0, ymax=0.04, color=color, alpha=0.6, lw=0)
        if not rate:
            ax.axhline(first.prior_entropy_bits[i], color="grey", lw=0.8, ls="-.", label="prior H(Z)")
        if others and scaled:
            low, high = min(np.nanmin(y) for _, y in scaled), max(np.nanmax(y) for _, y in scaled)
            ax.set_ylim(bottom=min(0.0, low) - 0.05 * (high - low))
            _clip_note(ax, others, high + 0.1 * (high - min(0.0, low)))
        ax.set_title(problem.name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlabel(TIME_LABEL, fontsize=8)
        ax.set_ylabel(RATE_LABEL if rate else ENTROPY_LABEL, fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    heading = _suptitle(fig, title, posterior_line(curves))
    _legend_below(fig, handles, labels, ncol=min(len(labels), 4 if len(axes) > 2 else len(axes)), title=heading)
    return fig


def posterior_paths_figure(time: np.ndarray, log_posterior: np.ndarray, path_classes: np.ndarray,
                           mean_posterior: np.ndarray, class_names: Sequence[str], per_class: int | None = None,
                           title: str | None = None, posterior: str | None = None):
    """One panel per generating class: P(k | x_t) of that class along a few single
    trajectories (thin) and averaged over all of its trajectories (thick), for every k.

    log_posterior (T, M, K) for M recorded paths of classes path_classes (M,);
    mean_posterior (T, K, K): average P(k | x_t) over trajectories of class c, [t, c, k];
    per_class: the number of trajectories of each class behind the means; title: what was
    generated how; posterior: which posterior the tracked P(k | ...) is (`Curves.posterior`).
    """
    K = mean_posterior.shape[1]
    colors = plt.get_cmap("tab10" if K <= 10 else "tab20")
    fig, axes = _grid(K)
    for c, ax in enumerate(axes):
        for m in np.flatnonzero(path_classes == c):
            for k in range(K):
                ax.plot(time, np.exp(log_posterior[:, m, k]), color=colors(k % 20), lw=0.6, alpha=0.5)
        for k in range(K):
            ax.plot(time, mean_posterior[:, c, k], color=colors(k % 20), lw=2.0, label=class_names[k])
        ax.set_title(f"generated from {class_names[c]}", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(TIME_LABEL, fontsize=8)
        ax.set_ylabel("P(k | x_t)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    mean_of = f"mean over {per_class} trajectories" if per_class else "mean over all trajectories"
    handles += [plt.Line2D([], [], color="grey", lw=0.6), plt.Line2D([], [], color="grey", lw=2.0)]
    labels += ["thin: single trajectories", f"thick: {mean_of} of the class"]
    axes[-1].legend(handles, labels, fontsize=6, title="class k", title_fontsize=7, loc="upper left",
                    bbox_to_anchor=(1.02, 1.0))
    heading = "P(k | x_t, ..., x_T) of the online classifier along generated trajectories"
    if posterior:
        heading += f"; posterior: {posterior}"
    _suptitle(fig, title, heading)
    fig.tight_layout()
    return fig


def density_figure(time: np.ndarray, grid: np.ndarray, log_density: np.ndarray, paths: np.ndarray,
                   path_classes: np.ndarray, xlabel: str = "x_t"):
    """The diffusing density log p(x_t) (T, X) on (time, grid) as a heat map, with generated
    paths (T, M) coloured by class."""
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    density = np.exp(log_density - log_density.max(axis=1, keepdims=True))
    im = ax.imshow(density.T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
                   extent=(time[0], time[-1], grid[0], grid[-1]))
    fig.colorbar(im, ax=ax, label="p(x_t) / max over x_t at that t")
    for m in range(paths.shape[1]):
        ax.plot(time, paths[:, m], color=colors(int(path_classes[m]) % 10), lw=0.7, alpha=0.9)
    ax.set_xlabel(TIME_LABEL)
    ax.set_ylabel(xlabel)
    ax.set_title("p(x_t), normalised per time, with generated paths (coloured by class)")
    fig.tight_layout()
    return fig


def class_curves_figure(class_curves: Curves, title: str | None = None):
    """H(Y | X_t) and its rate over the trajectories of each class (`curves.class_curves`,
    "problems" named by class), with 95% bootstrap bands and each class's peak time."""
    names = class_curves.names
    K = len(names)
    colors = plt.get_cmap("tab10" if K <= 10 else "tab20")
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(12, 4.2))
    t = class_curves.time
    for k, name in enumerate(names):
        c = colors(k % 20)
        a0.plot(t, class_curves.entropy_bits[k], color=c, lw=1.3, label=name)
        a1.plot(t, class_curves.entropy_rate[k], color=c, lw=1.3, label=f"{name} (peak t/T {class_curves.peak_time[k]:.2f})")
        if class_curves.entropy_rate_ci95 is not None:
            a0.fill_between(t, *class_curves.entropy_bits_ci95[k].T, color=c, alpha=0.15, lw=0)
            a1.fill_between(t, *class_curves.entropy_rate_ci95[k].T, color=c, alpha=0.15, lw=0)
    a0.axhline(class_curves.prior_entropy_bits[0], color="grey", lw=0.8, ls="-.", label="prior H(Y)")
    a0.set_ylabel("H(Y | X_t) over trajectories of the class  [bits]")
    a1.set_ylabel(RATE_LABEL)
    for ax in (a0, a1):
        ax.set_xlabel(TIME_LABEL)
        ax.grid(alpha=0.3)
    a0.legend(fontsize=6, ncol=2, title="shaded: 95% bootstrap bands", title_fontsize=6)
    a1.legend(fontsize=6, ncol=2)
    _suptitle(fig, title, posterior_line({"online": class_curves}))
    fig.tight_layout()
    return fig


def class_information_figure(curves: Mapping[str, Curves], class_names: Sequence[str], title: str | None = None,
                             labels: Mapping[str, str] | None = None, log_prior: np.ndarray | None = None):
    """D_k(t) = KL(p(x_t | k) || p(x_t)) in bits, one panel per class, every estimator that
    gives it (class_information_bits) overlaid with its 95% bootstrap band: where the online
    classifier and I-MMSE meet on the same per-class quantity. labels: legend text by
    estimator (default: STYLE's). log_prior: (K,) log pi_k; draws the bound
    D_k <= -log2 pi_k, which holds for a model consistent with its classes, and limits the y
    axis to just above it (a curve beyond it is named in the panel with its largest value)."""
    curves = {n: c for n, c in curves.items() if c.class_information_bits is not None}
    fig, axes = _grid(len(class_names), width=3.3, height=2.4)
    for k, (ax, name) in enumerate(zip(axes, class_names)):
        lines = []
        for est, c in curves.items():
            style = {**STYLE.get(est, dict(label=est))}
            if labels and est in labels:
                style["label"] = labels[est]
            ax.plot(c.time, c.class_information_bits[k], **style)
            lines.append((style["label"], c.class_information_bits[k]))
            if c.class_information_bits_ci95 is not None:
                ax.fill_between(c.time, *c.class_information_bits_ci95[k].T, color=style.get("color"), alpha=0.18, lw=0)
        if log_prior is not None:
            bound = -float(log_prior[k]) / math.log(2.0)
            ax.axhline(bound, color="grey", lw=0.8, ls="-.", label="bound -log2 pi_k")
            ax.set_ylim(bottom=-0.1 * bound)
            _clip_note(ax, lines, 1.2 * bound)
        ax.set_title(f"class {name}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[::4]:
        ax.set_ylabel("D_k = KL(p(x_t|k) || p(x_t))  [bits]", fontsize=7)
    for ax in axes[-4:]:
        ax.set_xlabel("t/T  (generation: 1 -> 0)", fontsize=7)
    heading = _suptitle(fig, title, posterior_line(curves))
    handles, texts = axes[0].get_legend_handles_labels()
    _legend_below(fig, handles, texts, ncol=min(len(texts), 3), title=heading,
                  legend_title="shaded: 95% bootstrap bands")
    return fig


MODEL_STYLE = {
    "network": dict(color="black", lw=1.5, ls="-"),
    "gaussian": dict(color="tab:blue", lw=1.2, ls="--"),
    "empirical": dict(color="tab:red", lw=1.2, ls="-."),
}


def reference_overlay_figure(label: Mapping[str, Curves], classes: Mapping[str, Curves], label_index: int,
                             descriptions: Mapping[str, str], title: str | None = None):
    """A trained network held against its reference models: one panel for the class label
    (row `label_index` of each `label` Curves) and one per class (the `classes` Curves, rows
    named by class), each model's H(Y | X_t) with its 95% bootstrap band and its peak time as
    a dotted line. label, classes: {model name: Curves}, the network first; descriptions:
    {model name: what it is, for the legend}."""
    first = next(iter(classes.values()))
    names = first.names
    fig, axes = _grid(len(names) + 1, width=3.3, height=2.5)
    panels = [("class label, all trajectories", label, label_index)] + [
        (f"trajectories of class {name}", classes, k) for k, name in enumerate(names)]
    for ax, (heading, curves, i) in zip(axes, panels):
        for model, c in curves.items():
            style = MODEL_STYLE.get(model, dict(lw=1.0))
            ax.plot(c.time, c.entropy_bits[i], label=descriptions.get(model, model), **style)
            if c.entropy_bits_ci95 is not None:
                ax.fill_between(c.time, c.entropy_bits_ci95[i, :, 0], c.entropy_bits_ci95[i, :, 1],
                                color=style.get("color"), alpha=0.15, lw=0)
            ax.axvline(c.peak_time[i], color=style.get("color"), lw=0.8, ls=":")
        ax.set_title(heading, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("H(Y | X_t)  [bits]", fontsize=8)
    for ax in axes[-4:]:
        ax.set_xlabel("t/T  (generation: 1 -> 0)", fontsize=7)
    heading = _suptitle(fig, title, "online classifier, " + posterior_line(label))
    handles, labels = axes[0].get_legend_handles_labels()
    note = "shaded: 95% bootstrap bands; dotted: peak of the rate"
    _legend_below(fig, handles, labels, ncol=min(len(labels), 2), title=heading, legend_title=note)
    return fig


def posterior_heatmap_figure(time: np.ndarray, mean_posterior: np.ndarray, class_names: Sequence[str],
                             title: str | None = None, posterior: str | None = None):
    """For each generating class, the average P(k | x_t) over its trajectories as a heat map
    (classes k up the side, normalised time across). mean_posterior: (T, C, K); title: what
    was generated how; posterior: which posterior the tracked P(k | ...) is."""
    C, K = mean_posterior.shape[1:]
    cols = min(C, 4)
    fig, axes = _grid(C, width=3.2, height=2.4)
    fig.set_layout_engine("constrained")
    for c, ax in enumerate(axes):
        im = ax.imshow(mean_posterior[:, c, :].T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                       extent=(time[0], time[-1], -0.5, K - 0.5), interpolation="nearest")
        ax.set_yticks(range(K))
        # class names on the first column only, the time axis under the lowest panels only
        ax.set_yticklabels(class_names if c % cols == 0 else [], fontsize=6)
        if c % cols == 0:
            ax.set_ylabel("class k", fontsize=8)
        ax.set_title(f"generated from {class_names[c]}" if C == K else "unconditional", fontsize=9)
        if c + cols >= C:
            ax.set_xlabel("t/T  (generation: 1 -> 0)", fontsize=8)
            ax.tick_params(labelbottom=True)
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="mean P(k | x_t, ..., x_T) over the trajectories")
    heading = "mean posterior of the online classifier over the trajectories of each generating class"
    if posterior:
        heading += f"; posterior: {posterior}"
    _suptitle(fig, title, heading)
    return fig


def _to_image(x: np.ndarray) -> np.ndarray:
    """An (H, W, C) image in [-1, 1] to [0, 1] for imshow; one channel drops to (H, W)."""
    image = np.clip((np.asarray(x) + 1.0) / 2.0, 0.0, 1.0)
    return image[..., 0] if image.shape[-1] == 1 else image


def snapshot_paths_figure(time: np.ndarray, log_posterior: np.ndarray, path_classes: np.ndarray, snapshots,
                          class_names: Sequence[str], num_train_steps: int):
    """One row per recorded trajectory: P(k | x_t) along it, and the predicted x_0 at a few
    times (the generated image at t = 0). snapshots: [(t, x_t (M, ...), x0_hat (M, ...))]."""
    M, K = log_posterior.shape[1:]
    S = len(snapshots)
    colors = plt.get_cmap("tab10" if K <= 10 else "tab20")
    fig = plt.figure(figsize=(4.0 + 1.0 * S, 1.25 * M))
    grid = fig.add_gridspec(M, S + 3)
    step_time = lambda t: 0.0 if t == 0 else float(time[t - 1])  # noqa: E731
    for m in range(M):
        ax = fig.add_subplot(grid[m, :3])
        for k in range(K):
            ax.plot(time, np.exp(log_posterior[:, m, k]), color=colors(k % 20), lw=1.0)
        for t, _, _ in snapshots:
            ax.axvline(step_time(t), color="grey", lw=0.5, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(class_names[int(path_classes[m])] if int(path_classes[m]) < K else "uncond.", fontsize=7)
        ax.tick_params(labelsize=6)
        if m == M - 1:
            ax.set_xlabel("t/T: P(k | x_t) along the path; right: predicted x_0", fontsize=7)
        for s, (t, _, x0) in enumerate(snapshots):
            a = fig.add_subplot(grid[m, 3 + s])
            if x0[m].ndim == 3:
                a.imshow(_to_image(x0[m]), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:  # not an image: print the first coordinate
                a.text(0.5, 0.5, f"{float(x0[m].ravel()[0]):.3g}", ha="center", va="center", fontsize=7)
            a.set_xticks([])
            a.set_yticks([])
            if m == 0:
                a.set_title(f"t/T={step_time(t):.2f}", fontsize=7)
    handles = [plt.Line2D([], [], color=colors(k % 20), label=class_names[k]) for k in range(K)]
    fig.legend(handles=handles, loc="upper center", ncol=min(K, 10), fontsize=7, bbox_to_anchor=(0.5, 1.0 + 0.3 / M))
    fig.tight_layout()
    return fig
