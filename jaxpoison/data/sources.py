"""Dataset sources: each returns a `Dataset` of uint8 NHWC images and integer labels."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

CLASS_NAMES = {
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    "mnist": tuple(str(i) for i in range(10)),
    "digits": tuple(str(i) for i in range(10)),
    "fashion_mnist": (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    "svhn_cropped": tuple(str(i) for i in range(10)),
}

EMBEDDED_PATH = Path(__file__).parent / "embedded" / "cifar10_subset.npz"


class DataError(ValueError):
    """A dataset could not be found or is malformed; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image-classification dataset held in host memory.

    Images are uint8 NHWC in 0..255, labels int32 in [0, num_classes). `x_val`/`y_val` are empty
    unless a validation split was carved from the training set.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] = ()
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            validate_arrays(x, y, f"{self.name}/{split}")
            if y.size and y.max() >= self.num_classes:
                raise DataError(
                    f"{self.name}/{split}: label {int(y.max())} is outside "
                    f"0..{self.num_classes - 1} ({self.num_classes} classes); fix the labels."
                )
        if len(self.y_train) == 0:
            raise DataError(f"{self.name}: the training split is empty; check the file.")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise DataError(
                f"{self.name}: test images are {self.x_test.shape[1:]} but training images "
                f"{self.x_train.shape[1:]}; both splits must have one image shape."
            )

    @property
    def image_shape(self):
        return self.x_train.shape[1:]

    def fingerprint(self):
        """sha256 of the training images and labels: the clean data a poison was made on."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x_train))  # the bytes in place, not a copy
        h.update(np.ascontiguousarray(self.y_train).astype(np.int64))
        return h.hexdigest()


def check_image_shape(shape, what):
    """Refuses an images shape that is not NHWC: not 4-d, or channel-first.

    A shape (N, C, H, W) with C in {1, 3, 4} and a last axis that is not is taken for
    channel-first (PyTorch's layout), which would otherwise be read as W-channel images.

    Args:
      shape: the images' shape.
      what: what the images are, for the message (e.g. "cifar10/train images").

    Raises:
      DataError: naming the problem and the fix.
    """
    shape = tuple(shape)
    if len(shape) != 4:
        raise DataError(
            f"{what} must be NHWC (4-d), got shape {shape}; add a channel axis with "
            "x[..., None] for grayscale."
        )
    if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
        raise DataError(
            f"{what} of shape {shape} look channel-first (NCHW) but must be NHWC; convert them "
            "with np.transpose(x, (0, 2, 3, 1))."
        )


def _check_whole(y, what):
    """Refuses labels that are not whole numbers (3.5 would be truncated to 3)."""
    if not (np.issubdtype(y.dtype, np.integer) or y.size == 0 or np.all(np.mod(y, 1) == 0)):
        raise DataError(
            f"{what}: labels must be whole numbers, got e.g. {y[np.mod(y, 1) != 0][0]}."
        )


def validate_arrays(x, y, what):
    """Refuses a dataset split that is not uint8 NHWC images with matching labels >= 0.

    Raises:
      DataError: naming the problem and the fix.
    """
    check_image_shape(x.shape, f"{what} images")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{what}: labels of shape {y.shape} do not match {x.shape[0]} images.")
    if x.dtype != np.uint8:
        raise DataError(
            f"{what}: images must be uint8 in 0..255, got {x.dtype}; convert floats in [0, 1] "
            "with np.round(x * 255).astype(np.uint8)."
        )
    _check_whole(y, what)
    if y.size and (y.min() < 0):
        raise DataError(f"{what}: labels must be >= 0, got min {y.min()}.")


def aligned_empty(shape, dtype, alignment=64):
    """An uninitialised array whose data starts on an `alignment`-byte boundary.

    XLA's CPU client aliases such a host array when it is placed on a CPU device
    (`jax.device_put`; `sharding.place_examples` too, whose blocks of rows are aligned when a
    row is a multiple of 64 bytes, as uint8 32x32x3 and float32 28x28 images are), where numpy's
    16-byte-aligned arrays are copied: loaded images and the poisoned set are made with it.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _aligned(array):
    """`array` itself when its data is 64-byte aligned, else an aligned copy."""
    array = np.asarray(array)
    if array.ctypes.data % 64 == 0:
        return array
    copy = aligned_empty(array.shape, array.dtype)
    copy[...] = array
    return copy


def from_arrays(name, x_train, y_train, x_test, y_test, num_classes=None):
    """A `Dataset` of loaded arrays: labels checked and made int32, the class count taken from
    `num_classes`, the dataset's name or the labels, images in 64-byte aligned memory."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    for split, y in (("train", y_train), ("test", y_test)):  # before labels become int32
        _check_whole(y, f"{name}/{split}")
    y_train, y_test = y_train.astype(np.int32), y_test.astype(np.int32)
    if not y_train.size:
        raise DataError(f"{name}: the training split is empty; check the file.")
    if num_classes is None and name in CLASS_NAMES:
        num_classes = len(CLASS_NAMES[name])
    if num_classes is None:  # counted from the labels: a stray large label would add classes
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        missing = np.setdiff1d(np.arange(num_classes), y_train)
        if missing.size:
            raise DataError(
                f"{name}: classes {missing[:10].tolist()}{'...' if missing.size > 10 else ''} "
                f"of 0..{num_classes - 1} (counted from the largest label) have no training "
                "example; a label out of range? Fix the labels of the file."
            )
    return Dataset(
        name=name,
        x_train=_aligned(x_train),
        y_train=y_train,
        x_test=_aligned(x_test),
        y_test=y_test,
        num_classes=num_classes,
        class_names=CLASS_NAMES.get(name, tuple(str(i) for i in range(num_classes))),
    )


def default_data_dirs():
    """Where `.npz` datasets are looked for when no `data_dir` is given, in order."""
    dirs = []
    if os.environ.get("JAXPOISON_DATA_DIR"):
        dirs.append(Path(os.environ["JAXPOISON_DATA_DIR"]))
    repo = Path(__file__).resolve().parents[2]
    dirs += [Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    dirs += [repo.parent / "shared" / "data"]
    return dirs


def load_npz(name, *, path=None, data_dir=None):
    """Loads `<data_dir>/<name>.npz` (or `path`) with keys x_train, y_train, x_test, y_test."""
    if path is None:
        candidates = [Path(data_dir)] if data_dir else default_data_dirs()
        tried = [d / f"{name}.npz" for d in candidates]
        found = [p for p in tried if p.is_file()]
        if not found:
            raise DataError(
                f"No {name}.npz found (looked in: {', '.join(str(p) for p in tried)}). Set "
                "data.data_dir (or $JAXPOISON_DATA_DIR) to the folder holding it, or use "
                "data.source='tfds' with internet access, or data.source='embedded'."
            )
        path = found[0]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Dataset file {path} does not exist; check data.path.")
    try:
        with np.load(path, allow_pickle=False) as d:
            if not hasattr(d, "files"):  # a bare .npy array
                raise DataError(f"{path} holds one array, not an .npz archive of four.")
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
            if missing:
                raise DataError(
                    f"{path} lacks the keys {sorted(missing)}; it needs x_train, "
                    "y_train, x_test, y_test."
                )
            arrays = [d[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    except DataError:
        raise
    except Exception as e:  # a damaged zip: BadZipFile, zlib.error, EOFError, ...
        raise DataError(
            f"{path} is not a readable .npz archive ({type(e).__name__}); write it with "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) (uint8 NHWC images, "
            "integer labels; no pickled objects)."
        ) from None
    if arrays[0].ndim == 3:
        arrays[0], arrays[2] = arrays[0][..., None], arrays[2][..., None]
    return from_arrays(name, *arrays)


def load_embedded(name="cifar10", **_):
    """The class-balanced CIFAR-10 subset shipped inside the package (2,500 train, 1,000 test)."""
    if name != "cifar10":
        raise DataError(f"The embedded source has only 'cifar10', not {name!r}.")
    return load_npz("cifar10", path=EMBEDDED_PATH)


def load_digits(name="digits", **_):
    """scikit-learn's 8x8 digits (1,797 images), rescaled to 0..255, split 1,397 / 400."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = d.target
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return from_arrays("digits", x[400:], y[400:], x[:400], y[:400], num_classes=10)


def tfds_image_label(features, supervised_keys, name):
    """The image and label features of a tfds image-classification dataset.

    The dataset's ``supervised_keys`` when they name an Image and a ClassLabel feature, else its
    only Image and only ClassLabel feature.

    Args:
      features: the dataset's ``info.features`` (a ``tfds.features.FeaturesDict``).
      supervised_keys: its ``info.supervised_keys`` (or None).
      name: the dataset's name, for the message.

    Returns:
      (image key, label key, number of classes, image shape (H, W, C)).

    Raises:
      DataError: no single Image and ClassLabel feature, or images of varying size.
    """
    import tensorflow_datasets as tfds

    def keys(kind):
        return [k for k, f in features.items() if isinstance(f, kind)]

    images, labels = keys(tfds.features.Image), keys(tfds.features.ClassLabel)
    pair = tuple(supervised_keys or ())
    if len(pair) == 2 and all(isinstance(k, str) for k in pair):
        if pair[0] in images and pair[1] in labels:
            images, labels = [pair[0]], [pair[1]]
    if len(images) != 1 or len(labels) != 1:
        kinds = {k: type(f).__name__ for k, f in features.items()}
        raise DataError(
            f"tfds dataset {name!r} is not an image-classification dataset (features {kinds}); "
            "jaxpoison needs one Image and one ClassLabel feature (e.g. cifar10, mnist)."
        )
    shape = tuple(features[images[0]].shape)
    if None in shape:
        raise DataError(
            f"tfds dataset {name!r} has images of varying size {shape}; use a fixed-size "
            "variant (e.g. imagenet_resized/64x64) or write resized copies with "
            "data.streaming.write_tfds."
        )
    return images[0], labels[0], features[labels[0]].num_classes, shape
