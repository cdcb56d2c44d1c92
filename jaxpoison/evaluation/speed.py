"""Learning-speed diagnostics across runs: do poisons that are learned faster work better?

Per run (from `summarize.run_summary`): peak and final clean test accuracy and the first epoch
whose training loss falls below a threshold. Across a family of runs: Spearman's rank correlation
of epoch-to-threshold with peak accuracy (the paper's Figure 1: fast-learned poisons give low peak
accuracy, a positive correlation) and of peak with final accuracy (Figure 2: peak ≈ final means
early stopping would not rescue the victim), plus the two scatter plots.

A run whose training loss never falls below the threshold (for any of its seeds) is *censored*:
its epoch is unknown, only known to be later than its last epoch. It has no epoch-to-threshold
value, is left out of the first correlation (the text and the figure say how many), and its
scatter point is drawn hollow in a separate "never" column right of the last epoch. A ρ over
fewer than `MIN_POINTS` runs, or over a constant variable, is undefined: NaN in the numbers and
"ρ undefined (...)" in the text, never a number.

References:
  Sandoval-Segura, Singla, Fowl, Geiping, Goldblum, Jacobs, Goldstein 2022, "Poisons that are
  learned faster are more effective", CVPR Workshops (Figures 1 and 2).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxpoison import plots

# Fewer points than this give no correlation: with two, ρ is ±1 whatever the data.
MIN_POINTS = 3

_PAIRS = {
    "epoch_to_threshold_vs_peak_acc": ("epoch_to_threshold", "peak_acc"),
    "peak_acc_vs_final_acc": ("peak_acc", "final_acc"),
}


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
      ``{run: {'epoch_to_threshold', 'censored', 'epochs', 'loss_threshold', 'peak_acc',
      'final_acc', 'peak_epoch'}}``: ``epoch_to_threshold`` is the mean over seeds of the first
      epoch with training loss below ``loss_threshold``, or None when a seed never got there
      (``censored``: its epoch is only known to exceed ``epochs``, the run's budget).
    """
    points = {}
    for name, s in summaries.items():
        reached = s["epoch_loss_below_threshold"]
        censored = any(e is None for e in reached)
        points[name] = {
            "epoch_to_threshold": None if censored else float(np.mean(reached)),
            "censored": censored,
            "epochs": int(s["epochs"]),
            "loss_threshold": float(s["loss_threshold"]),
            "peak_acc": float(s["peak_test_acc"]["mean"]),
            "final_acc": float(s["final_test_acc"]["mean"]),
            "peak_epoch": float(np.mean(s["peak_epoch"])),
        }
    return points


def correlation(points, x, y):
    """Spearman's ρ of two `run_points` fields over the runs where both are known.

    Returns:
      ``(rho, n)``: ρ is NaN when ``n < MIN_POINTS`` or a variable is constant.
    """
    pairs = [(p[x], p[y]) for p in points.values() if p[x] is not None and p[y] is not None]
    if len(pairs) < MIN_POINTS:
        return float("nan"), len(pairs)
    xs, ys = zip(*pairs, strict=True)
    return spearman(xs, ys), len(pairs)


def correlations(points):
    """Spearman's ρ of epoch-to-threshold vs peak accuracy (censored runs left out) and of peak
    vs final accuracy (every run), with the number of runs each is over.

    Raises:
      ValueError: when the runs were summarized with different loss thresholds (their epochs to
        the threshold do not compare).
    """
    thresholds = sorted({p["loss_threshold"] for p in points.values()})
    if len(thresholds) > 1:
        raise ValueError(
            f"The runs have different loss thresholds {thresholds}: their epochs to the "
            "threshold do not compare; summarize them with one loss_threshold."
        )
    out = {
        "num_runs": len(points),
        "num_censored": sum(p["censored"] for p in points.values()),
    }
    for label, (x, y) in _PAIRS.items():
        out[f"spearman/{label}"], out[f"num_points/{label}"] = correlation(points, x, y)
    return out


def diagnostics(summaries):
    """`run_points` and `correlations` together, JSON-ready (NaN where ρ is undefined)."""
    points = run_points(summaries)
    return {"runs": points, **correlations(points)}


def rho_text(rho, n):
    """``'ρ = 0.83 (5 runs)'``, or why there is no ρ: ``'ρ undefined (2 runs)'``."""
    if n < MIN_POINTS:
        return f"ρ undefined ({n} run{'s' * (n != 1)}; it needs {MIN_POINTS})"
    if math.isnan(rho):
        return f"ρ undefined ({n} runs, a variable is constant)"
    return f"ρ = {rho:.2f} ({n} runs)"


def describe(diag):
    """One line for a person: both correlations of `diagnostics`, or why they are undefined,
    and how many runs never reached the loss threshold."""
    if not diag["runs"]:
        return "learning speed: no trained runs."
    threshold = next(iter(diag["runs"].values()))["loss_threshold"]
    rho = lambda k: rho_text(diag[f"spearman/{k}"], diag[f"num_points/{k}"])  # noqa: E731
    censored = diag["num_censored"]
    left_out = (
        f" ({censored} run{'s' * (censored != 1)} never got below {threshold:g}: left out)"
        if censored
        else ""
    )
    return (
        f"learning speed of {diag['num_runs']} runs: Spearman "
        f"{rho('epoch_to_threshold_vs_peak_acc')} between the first epoch with training loss "
        f"< {threshold:g} and peak accuracy{left_out}; {rho('peak_acc_vs_final_acc')} between "
        "peak and final accuracy."
    )


def scatter(points, path, *, x, y, xlabel=None, ylabel=None, title="", diagonal=False):
    """A labelled scatter of two `run_points` fields (accuracies in %), ρ in the title.

    On an epoch axis (``epoch_to_threshold``) the ticks are whole epochs and censored runs are
    hollow markers in a separate "never" column right of the last epoch, outside ρ.

    Args:
      points: `run_points` output.
      path: where the PNG goes (written atomically by `plots.save_figure`).
      x, y: field names, e.g. ``'epoch_to_threshold'`` and ``'peak_acc'``.
      xlabel, ylabel, title: text; ``diagonal`` draws y = x (for peak vs final).
    """
    plt = plots.plt
    scale = lambda k: 100.0 if k.endswith("_acc") else 1.0  # noqa: E731
    budget = max((p["epochs"] for p in points.values()), default=1)
    never = budget + 1  # the censored runs' column, labelled "never", not an epoch
    position = lambda p, k: never if p[k] is None else p[k] * scale(k)  # noqa: E731
    xs = np.array([position(p, x) for p in points.values()], np.float64)
    ys = np.array([position(p, y) for p in points.values()], np.float64)
    censored = np.array([p[x] is None or p[y] is None for p in points.values()], bool)
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    if (~censored).any():
        label = "measured" if censored.any() else None
        ax.scatter(xs[~censored], ys[~censored], s=25, color="C0", label=label)
    if censored.any():
        ax.scatter(
            xs[censored],
            ys[censored],
            s=30,
            facecolors="none",
            edgecolors="C3",
            label=f"never below threshold ({censored.sum()})",
        )
    for name, xi, yi in zip(points, xs, ys, strict=True):
        ax.annotate(name, (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if diagonal and (~censored).any():
        shown = np.concatenate([xs[~censored], ys[~censored]])
        line = [shown.min(), shown.max()]
        ax.plot(line, line, "k--", lw=0.8, alpha=0.6, label="y = x")
    for axis, field in (("x", x), ("y", y)):
        if "epoch" in field:
            plots.integer_epoch_axis(ax, axis=axis, last=budget, never=censored.any())
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    ax.set_title(f"{title + ': ' if title else ''}Spearman {rho_text(*correlation(points, x, y))}")
    ax.grid(alpha=0.3)
    if censored.any() or diagonal:
        ax.legend(fontsize=7)
    plots.save_figure(fig, path)


def save_plots(points, directory, *, prefix="learning_speed"):
    """Writes ``<prefix>_epochs_vs_peak.png`` and ``<prefix>_peak_vs_final.png``; returns paths."""
    directory = Path(directory)
    first = directory / f"{prefix}_epochs_vs_peak.png"
    second = directory / f"{prefix}_peak_vs_final.png"
    thresholds = sorted({p["loss_threshold"] for p in points.values()})
    threshold = f"{thresholds[0]:g}" if len(thresholds) == 1 else "the threshold"
    scatter(
        points,
        first,
        x="epoch_to_threshold",
        y="peak_acc",
        xlabel=f"first epoch with training loss < {threshold} (mean over seeds)",
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
    "MIN_POINTS",
    "correlation",
    "correlations",
    "describe",
    "diagnostics",
    "rankdata",
    "rho_text",
    "run_points",
    "save_plots",
    "scatter",
    "spearman",
]
