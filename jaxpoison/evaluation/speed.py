"""Learning-speed diagnostics across runs: do poisons that are learned faster work better?

Per run (from `summarize.run_summary`): peak and final clean test accuracy and the first epoch
whose training loss falls below a threshold. Across a family of runs: Spearman's rank correlation
of epoch-to-threshold with peak accuracy (the paper's Figure 1: fast-learned poisons give low peak
accuracy, a positive correlation) and of peak with final accuracy (Figure 2: peak ≈ final means
early stopping would not rescue the victim), plus the two scatter plots.

A run whose loss never falls below the threshold is *censored*: it counts as ``epochs + 1``
(slower than any run that got there), which is all a rank correlation needs.

References:
  Sandoval-Segura, Singla, Fowl, Geiping, Goldblum, Jacobs, Goldstein 2022, "Poisons that are
  learned faster are more effective", CVPR Workshops (Figures 1 and 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxpoison import plots


def rankdata(values):
    """Ranks 1..n of `values`, ties sharing their average rank (scipy's ``method='average'``)."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b):
    """Spearman's rank correlation: the Pearson correlation of the (average, tied) ranks.

    Returns NaN with fewer than two points or when either variable is constant.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {a.shape}, {b.shape}.")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a) - (len(a) + 1) / 2, rankdata(b) - (len(b) + 1) / 2
    denom = np.sqrt(np.sum(ra**2) * np.sum(rb**2))
    return float(np.sum(ra * rb) / denom) if denom > 0 else float("nan")


def run_points(summaries):
    """Per-run learning-speed values from ``{run: summarize.run_summary(...)}``.

    Returns:
      ``{run: {'epoch_to_threshold', 'censored', 'peak_acc', 'final_acc', 'peak_epoch'}}``, the
      epoch the mean over seeds (a seed that never reaches the threshold counts ``epochs + 1``).
    """
    points = {}
    for name, s in summaries.items():
        epochs = [e if e is not None else s["epochs"] + 1 for e in s["epoch_loss_below_threshold"]]
        points[name] = {
            "epoch_to_threshold": float(np.mean(epochs)),
            "censored": any(e is None for e in s["epoch_loss_below_threshold"]),
            "peak_acc": float(s["peak_test_acc"]["mean"]),
            "final_acc": float(s["final_test_acc"]["mean"]),
            "peak_epoch": float(np.mean(s["peak_epoch"])),
        }
    return points


def correlations(points):
    """Spearman's ρ of epoch-to-threshold vs peak accuracy and of peak vs final accuracy."""
    values = list(points.values())
    col = lambda k: [v[k] for v in values]  # noqa: E731
    return {
        "num_runs": len(values),
        "spearman/epoch_to_threshold_vs_peak_acc": spearman(
            col("epoch_to_threshold"), col("peak_acc")
        ),
        "spearman/peak_acc_vs_final_acc": spearman(col("peak_acc"), col("final_acc")),
    }


def diagnostics(summaries):
    """`run_points` and `correlations` together, JSON-ready (NaN where undefined)."""
    points = run_points(summaries)
    return {"runs": points, **correlations(points)}


def scatter(points, path, *, x, y, xlabel=None, ylabel=None, title="", diagonal=False):
    """A labelled scatter of two `run_points` fields (accuracies in %), ρ in the title.

    Args:
      points: `run_points` output.
      path: where the PNG goes (written atomically by `plots.save_figure`).
      x, y: field names, e.g. ``'epoch_to_threshold'`` and ``'peak_acc'``.
      xlabel, ylabel, title: text; ``diagonal`` draws y = x (for peak vs final).
    """
    plt = plots.plt
    scale = lambda k: 100.0 if k.endswith("_acc") else 1.0  # noqa: E731
    xs = np.array([p[x] for p in points.values()]) * scale(x)
    ys = np.array([p[y] for p in points.values()]) * scale(y)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(xs, ys, s=25)
    for name, xi, yi in zip(points, xs, ys, strict=True):
        ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if diagonal and len(xs):
        lo, hi = min(xs.min(), ys.min()), max(xs.max(), ys.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, alpha=0.6)
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    rho = spearman([p[x] for p in points.values()], [p[y] for p in points.values()])
    ax.set_title(f"{title + ': ' if title else ''}Spearman ρ = {rho:.2f} (n={len(xs)})")
    ax.grid(alpha=0.3)
    plots.save_figure(fig, path)


def save_plots(points, directory, *, prefix="learning_speed"):
    """Writes ``<prefix>_epochs_vs_peak.png`` and ``<prefix>_peak_vs_final.png``; returns paths."""
    directory = Path(directory)
    first = directory / f"{prefix}_epochs_vs_peak.png"
    second = directory / f"{prefix}_peak_vs_final.png"
    scatter(
        points,
        first,
        x="epoch_to_threshold",
        y="peak_acc",
        xlabel="first epoch with training loss below the threshold",
        ylabel="peak clean test accuracy (%)",
    )
    scatter(
        points,
        second,
        x="peak_acc",
        y="final_acc",
        xlabel="peak clean test accuracy (%)",
        ylabel="final clean test accuracy (%)",
        diagonal=True,
    )
    return [first, second]


__all__ = [
    "correlations",
    "diagnostics",
    "rankdata",
    "run_points",
    "save_plots",
    "scatter",
    "spearman",
]
