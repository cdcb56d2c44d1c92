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


def run_summary(history, loss_threshold=0.5):
    """Summary of one run's history (lists over epochs of lists over seeds).

    Returns final and peak clean test accuracy (mean/std over seeds), the epoch of the peak,
    the epoch at which the training loss first falls under `loss_threshold`, and, when a
    validation split exists, the test accuracy at the epoch of best validation accuracy
    (early stopping).
    """
    test = np.asarray(history["test/accuracy"])  # [epochs, seeds]
    summary = {
        "final_test_acc": mean_std(test[-1]),
        "peak_test_acc": mean_std(test.max(0)),
        "peak_epoch": [int(e) + 1 for e in test.argmax(0)],
        "epochs": int(test.shape[0]),
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


def table(summary):
    """A plain-text table: run, final and peak clean test accuracy (mean ± std, in %)."""
    rows = [("run", "final test acc", "peak test acc", "seeds")]
    for name, s in summary.items():
        f, p = s["final_test_acc"], s["peak_test_acc"]
        rows.append(
            (
                name,
                f"{100 * f['mean']:.2f} ± {100 * f['std']:.2f}",
                f"{100 * p['mean']:.2f} ± {100 * p['std']:.2f}",
                str(s["seeds"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
