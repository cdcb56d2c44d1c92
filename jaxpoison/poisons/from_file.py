"""A poison made elsewhere: poisoned training images read from a `.npz` file.

The file has the shared-data format (``x_train`` uint8 NHWC, ``y_train`` integer labels; the
``x_test`` / ``y_test`` keys may be present and are ignored), as ``jaxpoison export`` writes it,
so a poison crafted by another library (the papers' PyTorch code, APBench) runs beside the clean
baseline and the library's own poisons::

    config.poisons.theirs = dict(name="from_file", path="/data/em_cifar10.npz")

Example i of the file is the poisoned version of training example i of ``config.data`` (same
subset, same order). The images are used exactly as stored (no projection), and the trainers
check that every example lies within the config's threat ball around its clean image and keeps
its label, so a file of another subset, order or budget is refused, not silently clipped.
"""

from __future__ import annotations

from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.data.sources import DataError, check_image_shape
from jaxpoison.poisons.base import Poison

_LEVELS = np.arange(256, dtype=np.float32) / np.float32(255)


@flax.struct.dataclass
class FileState:
    """The poisoned training set as stored: uint8 images [N, H, W, C] and labels [N]."""

    images: jax.Array
    labels: jax.Array


def read(path, image_shape):
    """(uint8 images, int32 labels) of ``x_train`` / ``y_train`` in `path`, checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"from_file: {path} does not exist; set the poison's path to an .npz file.")
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train"} - set(f.files)
        if missing:
            raise DataError(
                f"from_file: {path} lacks {sorted(missing)}; it needs x_train, y_train."
            )
        x, y = f["x_train"], f["y_train"]
    check_image_shape(x.shape, f"from_file {path}: x_train")
    if x.dtype != np.uint8:
        raise DataError(
            f"from_file: {path} x_train is {x.dtype}; store poisoned images as uint8 0..255 "
            "(np.round(x * 255).astype(np.uint8) for floats in [0, 1])."
        )
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise DataError(
            f"from_file: {path} holds {tuple(x.shape[1:])} images but the data is "
            f"{tuple(image_shape)}; use the file made for this dataset."
        )
    if y.shape != (len(x),):
        raise DataError(f"from_file: {path} has {y.shape} labels for {len(x)} images.")
    return x, y.astype(np.int32)


def from_file(*, threat, num_classes, image_shape, path):
    """Poisoned training images read from `path` (see the module docstring).

    Args:
      threat: the ball the file's perturbations must lie in (checked by the trainers).
      num_classes: K; the file's labels must lie in [0, K).
      image_shape: (H, W, C) of the data; the file must match.
      path: the `.npz` file.

    Returns:
      A `Poison` with no crafting epochs whose state holds the file's images and labels.
    """
    del threat
    x, y = read(path, image_shape)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"from_file: {path} has labels outside 0..{num_classes - 1}.")

    def init(key, dataset):
        del key
        if dataset["image"].shape[0] != len(x):
            raise DataError(
                f"from_file: {path} holds {len(x)} training images but the data has "
                f"{dataset['image'].shape[0]}; set data.num_train to the file's subset."
            )
        return FileState(images=jnp.asarray(x), labels=jnp.asarray(y))

    def apply(state, batch):
        index = batch["index"]
        # A table, not a division: XLA divides by multiplying with 1/255, which differs from
        # the host's x / 255 in the last bit (see data.as_float_images).
        image = jnp.asarray(_LEVELS)[state.images[index]]
        return dict(batch, image=image, label=state.labels[index])

    return Poison(init=init, update=None, apply=apply, num_epochs=0)


__all__ = ["FileState", "from_file", "read"]
