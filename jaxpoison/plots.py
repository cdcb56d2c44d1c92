"""Figures people would rather look at than read. Written atomically, headless (Agg)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def curves(runs, path, *, metric="test/accuracy", title=""):
    """Clean test accuracy per epoch, one line per run (mean over seeds, ±1 std band)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, run in runs.items():
        values = np.asarray(run["history"][metric]) * 100  # [epochs, seeds]
        epochs = np.arange(1, len(values) + 1)
        mean, std = values.mean(1), values.std(1)
        ax.plot(epochs, mean, marker="o", ms=3, label=f"{name} (n={values.shape[1]})")
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (%)" if metric == "test/accuracy" else metric)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    save_figure(fig, path)
