"""Trainers: what ``jaxpoison --config=... --workdir=...`` runs, chosen by ``config.trainer``.

A trainer is ``fn(config, workdir, *, progress=True) -> results dict``. Each opens the workdir
(`jaxpoison.workdir.open_run`: ``config.json`` first, resume or refuse), builds its parts through
`jaxpoison.specs`, and writes ``results.json`` last (`workdir.close_run`).

==================  ============================================================================
``grid``            poisons × objectives × victims: craft, train, evaluate (`grid`; the default)
``streamed``        the grid's victims on a tfds dataset read from disk batch by batch (`streamed`)
``simplicity_bias`` MNIST-CIFAR, ST vs AT restricted to the MNIST half (`simplicity_bias`)
``rotation_ssl``    rotation prediction on (poisoned) images, then a linear probe (`rotation_ssl`)
``gaussian_theory`` the mixture-Gaussian model of Tao et al. 2021 (`gaussian_theory`)
``score_model``     a diffusion score model for ``diffusion_purification`` (`jaxpoison.diffusion`)
==================  ============================================================================

Nothing below this package imports it. `register` adds a trainer of your own.
"""

from __future__ import annotations

import importlib

from jaxpoison.workdir import locked

# name -> module with a ``train_and_evaluate(config, workdir, *, progress)``, imported on use.
TRAINERS = {
    "grid": "jaxpoison.trainers.grid",
    "streamed": "jaxpoison.trainers.streamed",
    "simplicity_bias": "jaxpoison.trainers.simplicity_bias",
    "rotation_ssl": "jaxpoison.trainers.rotation_ssl",
    "gaussian_theory": "jaxpoison.trainers.gaussian_theory",
    "score_model": "jaxpoison.diffusion.trainer",
}


def register(name, fn, *, overwrite=False):
    """Adds ``fn(config, workdir, *, progress) -> results`` as ``config.trainer = name``."""
    if name in TRAINERS and not overwrite:
        raise ValueError(f"trainer {name!r} exists; pass overwrite=True to replace it.")
    TRAINERS[name] = fn


def get(name):
    """The trainer function registered as `name`."""
    if name not in TRAINERS:
        raise ValueError(f"config.trainer={name!r} is unknown; use one of {sorted(TRAINERS)}.")
    entry = TRAINERS[name]
    return importlib.import_module(entry).train_and_evaluate if isinstance(entry, str) else entry


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs ``TRAINERS[config.trainer]`` (default ``grid``) on `config` in `workdir`, holding the
    workdir's lock (`workdir.locked`: a second process on it is refused)."""
    trainer = get(config.get("trainer", "grid"))
    with locked(workdir):
        return trainer(config, workdir, progress=progress)


__all__ = ["TRAINERS", "get", "register", "train_and_evaluate"]
