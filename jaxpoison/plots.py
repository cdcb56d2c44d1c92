"""Figures people would rather look at than read. Written atomically, headless (Agg)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from jaxpoison import distributed  # noqa: E402


def save_figure(fig, path):
    """Writes `fig` to `path` atomically (in the writing process only) and closes it."""
    if not distributed.is_writer():
        plt.close(fig)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def integer_epoch_axis(ax, *, last, first=1, axis="x", never=False):
    """Whole-epoch ticks from `first` to `last` (at most about ten) on `axis` of `ax`.

    With ``never``, one more tick at ``last + 1`` labelled "never", beyond a dotted line: the
    column of runs that never reached what the axis measures (not an epoch of theirs).
    """
    last = max(last, first)
    locator = matplotlib.ticker.MaxNLocator(nbins=10, integer=True)
    ticks = [int(t) for t in locator.tick_values(first, last) if first <= t <= last]
    labels = [str(t) for t in ticks]
    if never:
        ticks.append(last + 1)
        labels.append("never")
        line = ax.axvline if axis == "x" else ax.axhline
        line(last + 0.5, color="0.5", ls=":", lw=0.8)
    getattr(ax, f"set_{axis}ticks")(ticks, labels)
    getattr(ax, f"set_{axis}lim")(first - 0.5, last + (1.5 if never else 0.5))


def curves(runs, path, *, metric="test/accuracy", title=""):
    """Clean test accuracy per epoch, one line per run (mean over seeds, ±1 std band).

    An untrained run (``run['untrained']``, the victim at initialisation) is one point at
    epoch 0.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    last, first = 1, 1
    for name, run in runs.items():
        values = np.asarray(run["history"][metric]) * 100  # [epochs, seeds]
        start = 0 if run.get("untrained") else 1
        epochs = np.arange(start, start + len(values))
        last, first = max(last, int(epochs[-1])), min(first, start)
        mean, std = values.mean(1), values.std(1)
        seeds = values.shape[1]
        label = f"{name} ({seeds} seed{'s' * (seeds != 1)}{', ±1 std' * (seeds > 1)})"
        ax.plot(epochs, mean, marker="o", ms=3, label=label)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    integer_epoch_axis(ax, first=first, last=last)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)" if metric == "test/accuracy" else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def confusion_matrices(confusions, path, *, class_names=None, title=""):
    """One panel per run: its confusion matrix on the clean test set, summed over seeds and
    normalised per true class (rows), in %; the diagonal (annotated) holds the per-class
    accuracies.

    Args:
      confusions: ``{run: [seeds][K][K] counts}`` (``results['runs'][run]['confusion']``).
      path: the PNG (written atomically).
      class_names: K tick labels (default 0..K-1).
    """
    names = list(confusions)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.3 * cols, 3.4 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        counts = np.asarray(confusions[name], np.float64).sum(0)  # [K, K]
        share = 100 * counts / np.maximum(counts.sum(1, keepdims=True), 1)
        k = share.shape[0]
        ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
        ticks = class_names if class_names is not None and len(class_names) == k else range(k)
        ax.set_xticks(range(k), ticks, rotation=90, fontsize=6)
        ax.set_yticks(range(k), ticks, fontsize=6)
        if k <= 20:  # the diagonal only: per-class accuracy (a full grid of texts is slow)
            for i in range(k):
                color = "white" if share[i, i] > 60 else "black"
                ax.text(
                    i, i, f"{share[i, i]:.0f}", ha="center", va="center", fontsize=5, color=color
                )
        acc = np.trace(counts) / max(counts.sum(), 1)
        ax.set_title(f"{name}\nacc {100 * acc:.1f}%", fontsize=8)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return path


def objective_bars(summary, path, *, key="final_test_acc", title=""):
    """The objective × training-set table as grouped bars: one group per training set, one bar
    per objective, mean ± std over seeds (in %), the clean training set first. Runs are named
    ``<objective>/<training set>``; `experiment.train_and_evaluate` writes ``objectives.png``.

    Returns `path`, or None when the runs do not cross at least two objectives (nothing to
    compare within a group).
    """
    cells = {tuple(name.split("/", 1)): s[key] for name, s in summary.items() if "/" in name}
    objectives = list(dict.fromkeys(o for o, _ in cells))
    sets = sorted(dict.fromkeys(t for _, t in cells), key=lambda t: t != "clean")  # clean first
    if len(objectives) < 2:
        return None
    width = 0.8 / len(objectives)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(sets) * (1 + 0.3 * len(objectives))), 4.2))
    for i, obj in enumerate(objectives):
        xs = [j for j, t in enumerate(sets) if (obj, t) in cells]
        acc = [cells[(obj, sets[j])] for j in xs]
        ax.bar(
            np.asarray(xs) + (i - (len(objectives) - 1) / 2) * width,
            [100 * a["mean"] for a in acc],
            width,
            yerr=[100 * a["std"] for a in acc],
            capsize=2,
            label=obj,
        )
    ax.set_xticks(range(len(sets)), sets, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{key.replace('_', ' ')} (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return path


def defense_heatmap(grid, path, *, title=""):
    """The attacks × defenses table (`summarize.defense_grid`) as a heat map of mean accuracy
    (%), each cell annotated with mean ± std; the clean training set is the first row."""
    attacks, defenses = grid["attacks"], grid["defenses"]
    nan = {"mean": np.nan, "std": np.nan}
    values = np.asarray([[grid["cells"][a].get(d, nan)["mean"] for d in defenses] for a in attacks])
    stds = np.asarray([[grid["cells"][a].get(d, nan)["std"] for d in defenses] for a in attacks])
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.0 + 0.95 * len(defenses)), max(2.5, 0.9 + 0.45 * len(attacks)))
    )
    image = ax.imshow(100 * values, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            if np.isfinite(values[i, j]):
                text = f"{100 * values[i, j]:.1f}\n±{100 * stds[i, j]:.1f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(len(defenses)), defenses, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
    ax.set_xlabel("defense")
    ax.set_ylabel("training set")
    fig.colorbar(image, ax=ax, label=f"{grid['key'].replace('_', ' ')} (%)")
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return path
