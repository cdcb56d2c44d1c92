"""``jaxpoison export WORKDIR RUN OUT.npz``: a crafted poison as a dataset file.

Writes the poisoned training set of run `RUN` of a finished (or crafted) workdir, with the clean
test set, in the shared-data format (``x_train``, ``x_test`` uint8 NHWC; ``y_train``, ``y_test``
int64), so another library can train on it, or the ``from_file`` poison can read it back.
Float pixels are rounded to an 8-bit level toward the clean pixel, so the exported perturbation
never leaves the threat ball (it moves by less than 1/255; a threat model with ``quantize=True``
crafts on the grid, so nothing moves).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_collections
import numpy as np

from jaxpoison import data, poisons
from jaxpoison.poisons import storage
from jaxpoison.trainers import poisoning
from jaxpoison.workdir import read_json


def export(workdir, run, out):
    """Writes run `run` of `workdir` to `out` (see the module docstring); returns `out`."""
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{workdir} has no config.json; is it a jaxpoison workdir?")
    config = ml_collections.ConfigDict(
        read_json(config_path, "rerun the workdir's command (it writes config.json first).")
    )
    if run not in config.get("poisons", {}):
        raise ValueError(
            f"{workdir} has no poison run {run!r}; its runs: {sorted(config.get('poisons', {}))}."
        )
    dataset = data.load(config.data)
    poison, state = poisoning.load_poison(config, run, dataset, workdir)
    images, labels = poisons.apply_all(poison, state, dataset.x_train, dataset.y_train)
    storage.export_npz(
        out, to_uint8_toward(images, dataset.x_train), labels, dataset.x_test, dataset.y_test
    )
    return Path(out)


def to_uint8_toward(images, clean):
    """Float images in [0, 1] as uint8, each pixel rounded toward its clean uint8 value.

    ``|rounded - clean| <= |images - clean|`` pixel by pixel, so the perturbation's ℓ∞ and ℓ2
    norms can only shrink. A level within 1e-4 (of 1/255) counts as reached (float rounding).
    """
    levels = np.asarray(images, np.float64) * 255.0 - clean
    steps = np.where(levels > 0, np.floor(levels + 1e-4), np.ceil(levels - 1e-4))
    return np.clip(clean + steps, 0, 255).astype(np.uint8)


def main(argv):
    """Entry point of ``jaxpoison export``: `argv` are the arguments after ``export``."""
    parser = argparse.ArgumentParser(prog="jaxpoison export", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="a workdir in which the run's poison was crafted")
    parser.add_argument("run", help="the poison's run name (a key of config.poisons)")
    parser.add_argument("out", help="the .npz file to write")
    args = parser.parse_args(argv)
    try:
        path = export(args.workdir, args.run, args.out)
    except ValueError as e:  # DataError and PoisonFileError are ValueErrors too
        print(f"jaxpoison: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # OUT under a file, not writable, a full disk
        what = f"{e.strerror}: {e.filename}" if e.filename else str(e)
        print(
            f"jaxpoison: error: cannot write {args.out} ({what}); check the path and the free "
            "space.",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {path}")
    return 0


__all__ = ["export", "main"]
