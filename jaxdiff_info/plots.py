"""Figures (matplotlib, Agg backend): entropy-rate curves, posteriors along paths, densities."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jaxdiff_info.curves import Curves  # noqa: E402
from jaxdiff_info.decisions import DecisionProblem  # noqa: E402

STYLE = {
    "exact": dict(color="black", lw=1.6, ls="-", label="exact (quadrature)"),
    "forward_mc": dict(color="tab:blue", lw=1.2, ls="--", label="forward Monte Carlo"),
    "online": dict(color="tab:red", lw=1.2, ls="-", label="online classifier"),
}


def _grid(n: int, width: float = 3.6, height: float = 2.6):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, sharex=True)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def curves_figure(problems: Sequence[DecisionProblem], curves: Mapping[str, Curves], field: str, ylabel: str):
    """One panel per decision problem, every estimator overlaid, 95% bootstrap bands."""
    fig, axes = _grid(len(problems))
    for i, (ax, problem) in enumerate(zip(axes, problems)):
        for name, c in curves.items():
            style = STYLE.get(name, dict(label=name))
            ax.plot(c.time, getattr(c, field)[:, i], **style)
            band = getattr(c, f"{field}_ci95")
            if band is not None:
                ax.fill_between(c.time, band[0, :, i], band[1, :, i], color=style.get("color"), alpha=0.2, lw=0)
        ax.set_title(problem.name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlabel("normalised time t/T")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def posterior_paths_figure(time: np.ndarray, log_posterior: np.ndarray, path_classes: np.ndarray,
                           mean_posterior: np.ndarray, class_names: Sequence[str]):
    """One panel per generating class: P(k | x_t) of that class along a few trajectories
    (thin) and averaged over all of its trajectories (thick), for every k.

    log_posterior (T, M, K) for M recorded paths of classes path_classes (M,);
    mean_posterior (T, K, K): average P(k | x_t) over trajectories of class c, [t, c, k].
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
        ax.set_xlabel("normalised time t/T")
        ax.set_ylabel("P(k | x_t)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="class k", title_fontsize=7)
    fig.tight_layout()
    return fig


def density_figure(time: np.ndarray, grid: np.ndarray, log_density: np.ndarray, paths: np.ndarray,
                   path_classes: np.ndarray, xlabel: str = "x_t"):
    """The diffusing density log p(x_t) (T, X) on (time, grid) as a heat map, with generated
    paths (T, M) coloured by class."""
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 4.2))
    density = np.exp(log_density - log_density.max(axis=1, keepdims=True))
    ax.imshow(density.T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
              extent=(time[0], time[-1], grid[0], grid[-1]))
    for m in range(paths.shape[1]):
        ax.plot(time, paths[:, m], color=colors(int(path_classes[m]) % 10), lw=0.7, alpha=0.9)
    ax.set_xlabel("normalised time t/T  (generation runs right to left)")
    ax.set_ylabel(xlabel)
    ax.set_title("p(x_t), normalised per time, with generated paths")
    fig.tight_layout()
    return fig
