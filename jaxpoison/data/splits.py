"""Loading by config, class-balanced subsets and validation splits."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxpoison.data import mnist_cifar, sources, streaming
from jaxpoison.data.sources import DataError

# data.source -> loader ``fn(name, **fields) -> Dataset``.
SOURCES = {
    "npz": sources.load_npz,
    "embedded": sources.load_embedded,
    "digits": sources.load_digits,
    "tfds": streaming.load_tfds,
    "mnist_cifar": mnist_cifar.load,
}


def balanced_indices(labels, num, num_classes):
    """Indices of the first examples of each class, `num` in all, as evenly spread as possible.

    Classes get `num // num_classes` examples each, the first `num % num_classes` classes one more.
    The indices are returned sorted, so the original order is kept.
    """
    counts = np.full(num_classes, num // num_classes)
    counts[: num % num_classes] += 1
    picked = []
    for c, k in enumerate(counts):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise DataError(f"Class {c} has {len(members)} examples, fewer than the {k} asked for.")
        picked.append(members[:k])
    return np.sort(np.concatenate(picked))


def load(config=None, /, **fields):
    """Loads the dataset a ``config.data`` describes, subsetting as asked.

    The description is a ConfigDict, a plain dict, keywords, or a mapping with keywords that
    override it: ``load(config.data)``, ``load(dict(source="embedded", name="cifar10"))`` and
    ``load(source="npz", name="mnist", num_train=1000)`` all work.

    Fields: source (one of SOURCES, default "npz"), name, and optionally path, data_dir,
    download, num_train / num_test (0 = all; class-balanced otherwise). The training pipeline's
    fields are checked here, before any work, and otherwise ignored: ``val_size`` (fewer than
    the training examples), ``crop_padding`` (>= 0) and ``flip`` (a bool).

    Raises:
      DataError: an unknown source, no name, a dataset that cannot be found or is malformed, or
        a size out of range.
    """
    config = {**dict(config or {}), **fields}
    source = config.get("source", "npz")
    if source not in SOURCES:
        raise DataError(f"Unknown data.source {source!r}; use one of {sorted(SOURCES)}.")
    if not config.get("name"):
        raise DataError(
            f"data.name is missing; name the dataset, e.g. load(source={source!r}, name='cifar10')."
        )
    kwargs = {k: config.get(k) for k in ("path", "data_dir", "download") if config.get(k)}
    ds = SOURCES[source](config["name"], **kwargs)
    num_train, num_test = config.get("num_train", 0), config.get("num_test", 0)
    for field, value, available in (
        ("num_train", num_train, len(ds.y_train)),
        ("num_test", num_test, len(ds.y_test)),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise DataError(f"data.{field}={value!r}: give a whole number >= 0 (0 = all).")
        if value > available:
            raise DataError(
                f"data.{field}={value} but {ds.name} has {available}; use at most {available} "
                "(0 = all)."
            )
    padding = config.get("crop_padding", 0) or 0
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise DataError(
            f"data.crop_padding={padding!r}: give a whole number of pixels >= 0 (0 = no crops)."
        )
    if not isinstance(config.get("flip", False), bool):
        raise DataError(f"data.flip={config['flip']!r}: give True or False.")
    updates = {}
    if num_train and num_train < len(ds.y_train):
        idx = balanced_indices(ds.y_train, num_train, ds.num_classes)
        updates.update(x_train=ds.x_train[idx], y_train=ds.y_train[idx])
    if num_test and num_test < len(ds.y_test):
        idx = balanced_indices(ds.y_test, num_test, ds.num_classes)
        updates.update(x_test=ds.x_test[idx], y_test=ds.y_test[idx])
    ds = dataclasses.replace(ds, **updates) if updates else ds
    val_size = config.get("val_size", 0) or 0
    if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
        raise DataError(f"data.val_size={val_size!r}: give a whole number >= 0 (0 = none).")
    if val_size >= len(ds.y_train):
        raise DataError(
            f"data.val_size={val_size} leaves no training example of the {len(ds.y_train)}; "
            "lower it or raise data.num_train."
        )
    return ds


def split_validation(labels, val_size, num_classes, *, seed=0):
    """Splits training indices into (train, validation), the validation part class-balanced.

    The split is a fixed function of `seed`, so every run of an experiment sees the same one.
    Returns two sorted int arrays of indices into `labels`.
    """
    n = len(labels)
    if not val_size:
        return np.arange(n), np.arange(0)
    if not isinstance(val_size, int) or val_size < 0 or val_size >= n:
        raise DataError(
            f"data.val_size={val_size!r} must be a whole number in [0, {n}) (the training "
            f"examples); lower it or raise data.num_train."
        )
    perm = np.random.default_rng(seed).permutation(n)
    val = perm[balanced_indices(labels[perm], val_size, num_classes)]
    train = np.setdiff1d(np.arange(n), val)
    return train, np.sort(val)
