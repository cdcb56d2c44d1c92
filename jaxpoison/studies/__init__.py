"""Experiments that are not a grid of poisons × objectives, each with its own runner.

``experiment.train_and_evaluate`` hands a config whose ``experiment`` field names one of `RUNNERS`
to `run`. The workdir looks like every other run's (``config.json`` first, checkpoints,
``log.txt``, ``results.json`` last and atomically, ``curves.png``), and `summary` holds the
``final_test_acc`` / ``peak_test_acc`` entries that ``jaxpoison report`` reads, plus each study's
own numbers.

==================  ==================================================================
``simplicity_bias`` MNIST-CIFAR, ST vs AT restricted to the MNIST half, accuracy on the
                    normal and on the MNIST-randomized test set (`simplicity_bias`)
``rotation_ssl``    rotation prediction (ST / AT) on clean or poisoned images, then a
                    linear probe on clean labels (`rotation_ssl`)
==================  ==================================================================
"""

from __future__ import annotations

import importlib

from jaxpoison.experiment import close_workdir, open_workdir, plain, run_key

RUNNERS = {
    "simplicity_bias": "jaxpoison.studies.simplicity_bias",
    "rotation_ssl": "jaxpoison.studies.rotation_ssl",
}


def run(config, workdir, *, progress=True):
    """Runs the study ``config.experiment`` of `RUNNERS` in `workdir`; returns the results."""
    name = config.get("experiment")
    if name not in RUNNERS:
        raise ValueError(
            f"config.experiment={name!r} is not a study; use one of {sorted(RUNNERS)}."
        )
    return importlib.import_module(RUNNERS[name]).run(config, workdir, progress=progress)


def table(rows):
    """A plain-text table from equal-length tuples of strings (the first is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pct(ms):
    """``{'mean', 'std'}`` of a fraction as ``'mm.mm ± s.ss'`` percent."""
    return f"{100 * ms['mean']:.2f} ± {100 * ms['std']:.2f}"


__all__ = ["RUNNERS", "close_workdir", "open_workdir", "pct", "plain", "run", "run_key", "table"]
