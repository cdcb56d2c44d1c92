"""Per-run statistics from a training history: final and peak accuracy, learning speed."""

from __future__ import annotations

import numpy as np


def mean_std(values):
    values = np.asarray(values, np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
    }


def first_epoch_below(losses, threshold):
    """1-based first epoch whose training loss is below `threshold`, per seed (None if never)."""
    losses = np.asarray(losses)  # [epochs, seeds]
    below = losses < threshold
    return [
        int(np.argmax(below[:, s])) + 1 if below[:, s].any() else None
        for s in range(losses.shape[1])
    ]


def run_summary(history, loss_threshold=0.5, *, untrained=False):
    """Summary of one run's history (lists over epochs of lists over seeds).

    Returns final and peak clean test accuracy (mean/std over seeds), the epoch of the peak,
    the epoch at which the training loss first falls under `loss_threshold`, and, when a
    validation split exists, the test accuracy at the epoch of best validation accuracy
    (early stopping). ``untrained=True`` marks a victim trained for zero epochs, whose single
    history entry is its initialisation: ``epochs`` and ``peak_epoch`` are then 0.
    """
    test = np.asarray(history["test/accuracy"])  # [epochs, seeds]
    offset = 0 if untrained else 1
    summary = {
        "final_test_acc": mean_std(test[-1]),
        "peak_test_acc": mean_std(test.max(0)),
        "peak_epoch": [int(e) + offset for e in test.argmax(0)],
        "epochs": 0 if untrained else int(test.shape[0]),
        "seeds": int(test.shape[1]),
        "final_train_loss": mean_std(np.asarray(history["train/loss"])[-1]),
        "loss_threshold": loss_threshold,
        "epoch_loss_below_threshold": first_epoch_below(history["train/loss"], loss_threshold),
    }
    if "val/accuracy" in history:
        val = np.asarray(history["val/accuracy"])
        best = val.argmax(0)
        summary["early_stopped_test_acc"] = mean_std(test[best, np.arange(test.shape[1])])
        summary["early_stopped_epoch"] = [int(e) + 1 for e in best]
    return summary


def eval_summary(evals):
    """Mean ± std over seeds of every per-seed scalar of ``runs[name]['evals']``.

    Args:
      evals: ``{label: {metric: [value per seed] or [[...] per seed]}}``
        (`trainers.grid.run_evals`).

    Returns:
      ``{label: {metric: {'mean', 'std'}}}`` for the metrics with one scalar per seed (NaN, e.g.
      a risk on an empty D-, propagates into the mean).
    """
    return {
        label: {k: mean_std(v) for k, v in metrics.items() if np.ndim(v) == 1 and np.size(v) > 0}
        for label, metrics in evals.items()
    }


EVAL_COLUMNS = ("acc/D", "acc/A", "acc/F")


def eval_table(summary, columns=EVAL_COLUMNS):
    """A plain-text table of the evaluator results in `summary` (``summary[run]['evals']``):
    one row per run and evaluator label, the `columns` metrics as mean ± std in %.

    Returns an empty string when no run has evaluator results.
    """
    rows = [("run", "eval", *columns, "seeds")]
    for name, s in summary.items():
        for label, metrics in s.get("evals", {}).items():
            cells = []
            for c in columns:
                m = metrics.get(c)
                cells.append("-" if m is None else f"{100 * m['mean']:.2f} ± {100 * m['std']:.2f}")
            rows.append((name, label, *cells, str(s["seeds"])))
    if len(rows) == 1:
        return ""
    return _format(rows)


def _format(rows):
    """Rows of strings as aligned plain-text columns, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def accuracy_columns(summary):
    """Headers and per-run cells (``mean ± std`` in %) of the accuracy columns shared by the
    printed table and the report: final, peak and, when any run held out a validation split,
    early-stopped (``-`` for runs without one)."""
    early = any("early_stopped_test_acc" in s for s in summary.values())
    keys = ["final_test_acc", "peak_test_acc"] + ["early_stopped_test_acc"] * early
    headers = ["final", "peak"] + ["early-stopped"] * early
    return headers, {name: [percent(s.get(k)) for k in keys] for name, s in summary.items()}


def table(summary):
    """A plain-text table: run, final and peak clean test accuracy (mean ± std, in %), and the
    early-stopped accuracy when runs held out a validation split."""
    headers, cells = accuracy_columns(summary)
    rows = [("run", *(f"{h} test acc" for h in headers), "seeds")]
    rows += [(name, *cells[name], str(s["seeds"])) for name, s in summary.items()]
    return _format(rows)


def percent(acc):
    """``mean ± std`` in %, or ``-`` for a missing entry."""
    return "-" if acc is None else f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}"


def text_table(rows):
    """A plain-text table from equal-length tuples of strings (the first is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(ms):
    """``{'mean', 'std'}`` of a fraction as ``'mm.mm ± s.ss'`` percent."""
    return f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}"


def defense_grid(summary, *, key="final_test_acc", baseline="erm"):
    """The attacks × defenses table of a grid run whose runs are ``<defense>/<training set>``.

    Args:
      summary: ``{run name: run_summary}``.
      key: the accuracy of a cell (``final_test_acc``, APBench's; or ``peak_test_acc``, or
        ``early_stopped_test_acc`` where a validation split was held out).
      baseline: the defense whose clean-data accuracy the defense costs are measured from
        (standard training).

    Returns:
      ``{'key', 'attacks' (clean first), 'defenses' (the baseline first), 'cells': {attack:
      {defense: {'mean', 'std'}}}, 'cost': {defense: points lost on clean data against the
      baseline, in %}}``, or None when the runs do not cross at least two defenses. Early
      stopping is a column too where the runs held out a validation split: ``early_stopping``,
      the baseline's test accuracy at its epoch of best validation accuracy.
    """
    cells = {}
    for name, s in summary.items():
        parts = name.split("/")
        if len(parts) == 2 and key in s:
            cells.setdefault(parts[1], {})[parts[0]] = s[key]
            if parts[0] == baseline and "early_stopped_test_acc" in s:
                cells[parts[1]]["early_stopping"] = s["early_stopped_test_acc"]
    defenses = list(dict.fromkeys(d for row in cells.values() for d in row))
    defenses.sort(key=lambda d: d != baseline)
    if len(defenses) < 2:
        return None
    attacks = sorted(cells, key=lambda a: a != "clean")
    cost = {}
    clean = cells.get("clean", {})
    if baseline in clean:
        cost = {d: 100 * (clean[baseline]["mean"] - acc["mean"]) for d, acc in clean.items()}
    return {
        "key": key,
        "attacks": attacks,
        "defenses": defenses,
        "cells": cells,
        "cost": cost,
    }


def defense_grid_markdown(grid):
    """A markdown table of `defense_grid`: attacks as rows, defenses as columns, mean ± std (%),
    and a last row with each defense's cost on clean data."""
    head = "| training set | " + " | ".join(grid["defenses"]) + " |"
    lines = [head, "|" + " --- |" * (len(grid["defenses"]) + 1)]
    for attack in grid["attacks"]:
        row = [percent(grid["cells"][attack].get(d)) for d in grid["defenses"]]
        lines.append(f"| {attack} | " + " | ".join(row) + " |")
    if grid["cost"]:
        row = [f"{grid['cost'][d]:+.2f}" if d in grid["cost"] else "-" for d in grid["defenses"]]
        lines.append("| cost on clean data (points) | " + " | ".join(row) + " |")
    return "\n".join(lines)
