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
import json
from pathlib import Path

from jaxpoison.experiment import plain, run_key
from jaxpoison.poisons.storage import write_json_atomic
from jaxpoison.progress import say, set_log_file

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


def open_workdir(config, workdir):
    """Returns the complete results found in `workdir`, or None after writing ``config.json``
    and opening ``log.txt`` for a new (or resumed) run."""
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        if results.get("complete"):
            say(f"{results_path} is complete; nothing to do (delete it to run again).")
            return results
    workdir.mkdir(parents=True, exist_ok=True)
    set_log_file(workdir / "log.txt")
    write_json_atomic(workdir / "config.json", plain(config))
    return None


def close_workdir(results, workdir):
    """Writes ``results.json`` atomically and closes the log."""
    write_json_atomic(Path(workdir) / "results.json", results)
    say(f"results: {Path(workdir) / 'results.json'}")
    set_log_file(None)


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
