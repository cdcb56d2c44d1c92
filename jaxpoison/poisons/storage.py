"""Poison artifacts: the crafted state as a pickle-free `.npz` plus self-describing JSON metadata.

    WORKDIR/poison/<run>/<key>/state.npz       # leaves of the poison state, by pytree path
    WORKDIR/poison/<run>/<key>/metadata.json   # format, poison name and spec, threat, dataset,
                                               # the record that made it and its content key

`load` checks the metadata against the sha256 saved in it, the format version, that the clean
data is the one the poison was made on (sha256 of the training set), that the artifact was made
by the record asked for (its content key, see `jaxpoison.workdir`), that the arrays match the
sha256 saved with them, and that every perturbation leaf lies in the recorded ball.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxpoison import distributed
from jaxpoison.workdir import (
    array_digest,
    canonical,
    content_key,
    differences,
    write_json_atomic,
)

FORMAT = "jaxpoison.poison/1"
BOUND_TOLERANCE = 1e-5


class PoisonFileError(ValueError):
    """A poison artifact is missing, from another dataset, or violates its threat model."""


def _leaves_with_keys(state):
    flat, _ = jax.tree_util.tree_flatten_with_path(distributed.to_host(state))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _check_finite(where, key, value):
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
        raise PoisonFileError(
            f"{where}: leaf {key} holds NaN or infinite values; the crafting run diverged or "
            "the file is damaged: craft the poison again (lower the step size if it diverged)."
        )


def _digest(leaves):
    """sha256 of named arrays, in name order."""
    return array_digest(*(leaves[k] for k in sorted(leaves)), np.asarray(sorted(leaves)))


def save(directory, state, *, name, spec, threat, dataset_name, fingerprint, record=None):
    """Saves a poison state and its metadata atomically into `directory` (replacing it).

    Every process of a multi-process run calls it (a state split over them is gathered); the
    writing one writes, and none returns before the artifact is there to `load`; when the
    writer fails, every process raises (`distributed.on_writer`).
    `record` (optional) is everything that determined the state (`jaxpoison.workdir`); it is
    stored with its content key, which `load` can require.

    Raises:
      PoisonFileError: when a leaf holds NaN or infinite values (nothing is written).
    """
    directory = Path(directory)
    leaves = _leaves_with_keys(state)  # every process: a state split over them is gathered
    for key, value in leaves.items():
        _check_finite(directory, key, value)

    def write():  # in the writing process only
        metadata = {
            "format": FORMAT,
            "poison": name,
            "spec": spec,
            "threat": {
                "norm": threat.norm,
                "epsilon": float(threat.epsilon),
                "masked": threat.mask is not None,
            },
            "dataset": dataset_name,
            "train_sha256": fingerprint,
            "leaves": {k: list(v.shape) for k, v in leaves.items()},
            "state_sha256": _digest(leaves),
            "record": canonical(record),
            "key": None if record is None else content_key(record),
        }
        metadata["metadata_sha256"] = content_key(metadata)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            np.savez_compressed(tmp / "state.npz", **leaves)
            write_json_atomic(tmp / "metadata.json", metadata)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:  # disk full, an interrupt: nothing half-written is left
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    # The keyed name, alike on every process; none returns before the writer has written (the
    # other processes may read it back at once), and a failed write fails every process.
    distributed.on_writer(f"poison saved {directory.name}", write)


def load(directory, template, *, fingerprint=None, record=None):
    """Loads a saved poison state shaped like `template` and checks it.

    Args:
      directory: the artifact directory written by `save`.
      template: a state of the same structure (e.g. ``poison.init(key, dataset)``).
      fingerprint: sha256 of the clean training data it is to be applied to; refused if different.
      record: what the state must have been made by; refused (naming the fields that differ) if
        the artifact was made by another record or carries none.

    Returns:
      (state, metadata).
    """
    directory = Path(directory)
    meta_path = directory / "metadata.json"
    if not meta_path.is_file():
        raise PoisonFileError(f"No poison artifact at {directory} (metadata.json is missing).")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise PoisonFileError(
            f"{meta_path} is damaged ({type(e).__name__}: {e}); craft the poison again (delete "
            f"{directory})."
        ) from None
    if not isinstance(meta, dict):
        raise PoisonFileError(
            f"{meta_path} is damaged (not a JSON object); craft the poison again (delete "
            f"{directory})."
        )
    stored_sha = meta.pop("metadata_sha256", None)
    if stored_sha is not None and content_key(meta) != stored_sha:
        raise PoisonFileError(
            f"{meta_path} does not match the sha256 saved in it (damaged or edited); craft the "
            f"poison again (delete {directory})."
        )
    if meta.get("format") != FORMAT:
        raise PoisonFileError(f"{directory}: format {meta.get('format')!r} is not {FORMAT!r}.")
    if fingerprint is not None and meta["train_sha256"] != fingerprint:
        raise PoisonFileError(
            f"{directory} was crafted on other training data (sha256 {meta['train_sha256'][:12]}…"
            f" vs {fingerprint[:12]}…); craft it again for this dataset."
        )
    if record is not None and meta.get("key") != content_key(record):
        changed = differences(meta.get("record"), canonical(record))
        raise PoisonFileError(
            f"{directory} was crafted by another spec (it differs in {', '.join(changed)}); "
            "craft it again (delete the directory) or restore the spec that made it."
        )
    try:
        with np.load(directory / "state.npz", allow_pickle=False) as f:
            stored = {k: f[k] for k in f.files}
    except Exception as e:  # a damaged zip: BadZipFile, zlib.error, EOFError, ...
        raise PoisonFileError(
            f"{directory / 'state.npz'} is damaged ({type(e).__name__}: {e}); craft the poison "
            f"again (delete {directory})."
        ) from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    leaves = []
    for path, leaf in flat:
        key = jax.tree_util.keystr(path)
        if key not in stored or stored[key].shape != np.shape(leaf):
            raise PoisonFileError(f"{directory}: leaf {key} is missing or has the wrong shape.")
        _check_finite(directory, key, stored[key])
        leaves.append(stored[key])
    eps, norm = meta["threat"]["epsilon"], meta["threat"]["norm"]
    for key, value in stored.items():
        if "delta" not in key:
            continue
        flat_v = value.reshape(value.shape[0], -1).astype(np.float64)
        if norm == "l0":  # changed pixels: positions (all channels together) with any nonzero
            size = (value != 0).any(-1).reshape(value.shape[0], -1).sum(1)
        elif norm == "linf":
            size = np.abs(flat_v).max(1)
        else:
            size = np.linalg.norm(flat_v, axis=1)
        if size.size and size.max() > eps + BOUND_TOLERANCE:
            raise PoisonFileError(
                f"{directory}: {key} has {norm} norm {size.max():.6f} > epsilon {eps:.6f}; the "
                "file was modified or crafted with another budget."
            )
    if "state_sha256" in meta and _digest(stored) != meta["state_sha256"]:
        raise PoisonFileError(
            f"{directory / 'state.npz'} does not match the sha256 saved with it (damaged or "
            f"edited); craft the poison again (delete {directory})."
        )
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


def export_npz(path, x_train, y_train, x_test, y_test):
    """Writes a poisoned dataset as uint8 `.npz` (x_train, y_train, x_test, y_test), atomically.

    Float images are rounded to the nearest 8-bit level, so a perturbation that is not on the
    8-bit grid moves by at most 0.5/255 (use a threat model with ``quantize=True`` to avoid it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def u8(x):
        x = np.asarray(x)
        return x if x.dtype == np.uint8 else np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(
            tmp,
            x_train=u8(x_train),
            y_train=np.asarray(y_train, np.int64),
            x_test=u8(x_test),
            y_test=np.asarray(y_test, np.int64),
        )
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
