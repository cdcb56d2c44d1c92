"""MNIST-CIFAR (Shah et al. 2020): an MNIST digit stacked on a CIFAR-10 image, two classes.

Each image is 64x32x3: rows 0-31 hold an MNIST digit (28x28, zero-padded by 2 pixels on every
side and repeated over the three channels), rows 32-63 a CIFAR-10 image. Class 0 pairs the digit 0
with a CIFAR automobile, class 1 the digit 1 with a truck. In the training and in the test set the
two halves always agree, so either half alone predicts the label; the MNIST half is the simpler
(linearly separable) one, and a network trained by standard training relies on it alone (the
simplicity bias). The *MNIST-randomized* test set (`randomize_mnist`) shuffles the MNIST halves
across the test set, so the digit carries no information on the label: accuracy there measures how
much the network uses the CIFAR half (50% = not at all).

Both classes get the same number of examples: ``min`` over the two classes of the digit's and the
object's counts (5,000 per class in training, 980 in the test set with the standard files). Digits
are paired with objects by a fixed permutation (seed 0), so the dataset, and its fingerprint, is the
same in every run.

Load it with ``data.load`` and ``data.source='mnist_cifar'`` (``data.name='mnist_cifar'``); it reads
``mnist.npz`` and ``cifar10.npz`` from ``data.data_dir`` or from the places `sources.load_npz`
searches (``$JAXPOISON_DATA_DIR``, ``./shared/data``, ``../shared/data``).

References:
  Shah et al. 2020, "The Pitfalls of Simplicity Bias in Neural Networks", NeurIPS.
  Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with Adversarial
  Training", NeurIPS (AT with the threat model restricted to the MNIST half).
"""

from __future__ import annotations

import numpy as np

from jaxpoison.data import sources

# (MNIST digit, CIFAR-10 class) of labels 0 and 1: 0 / automobile, 1 / truck.
PAIRS = ((0, 1), (1, 9))
CLASS_NAMES = ("0 / automobile", "1 / truck")
HALF = 32  # rows of each half; the MNIST half is on top
IMAGE_SHAPE = (2 * HALF, HALF, 3)
PAIRING_SEED = 0


def pad_mnist(x):
    """uint8 [N, h, w, 1] MNIST digits (h, w <= 32) -> [N, 32, 32, 3], centred, zero-padded."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, c = x.shape
    if h > HALF or w > HALF or c != 1:
        raise sources.DataError(
            f"MNIST images must be grayscale and at most {HALF}x{HALF}, got shape {x.shape[1:]}."
        )
    top, left = (HALF - h) // 2, (HALF - w) // 2
    out = np.zeros((n, HALF, HALF, 1), np.uint8)
    out[:, top : top + h, left : left + w] = x
    return np.repeat(out, 3, axis=-1)


def stack(mnist_x, cifar_x):
    """MNIST digits on top of CIFAR images: [N, 28, 28, 1] and [N, 32, 32, 3] -> [N, 64, 32, 3]."""
    if len(mnist_x) != len(cifar_x) or cifar_x.shape[1:] != (HALF, HALF, 3):
        raise sources.DataError(
            f"cannot stack {len(mnist_x)} MNIST digits on {len(cifar_x)} CIFAR images of shape "
            f"{cifar_x.shape[1:]}: need as many of each, CIFAR images 32x32x3."
        )
    return np.concatenate([pad_mnist(mnist_x), np.asarray(cifar_x, np.uint8)], axis=1)


def pair(mnist_x, mnist_y, cifar_x, cifar_y, *, seed=PAIRING_SEED):
    """The two-class MNIST-CIFAR images of one split, class-balanced, in a shuffled order.

    For label k, `PAIRS[k] = (digit, object)`: the first ``n`` CIFAR images of the object are each
    paired with a digit drawn without replacement from the MNIST images of the digit, ``n`` the
    smallest of the four counts (so both classes have ``n`` examples).

    Returns:
      (images uint8 [2n, 64, 32, 3], labels int32 [2n]).
    """
    rng = np.random.default_rng(seed)
    members = [
        (np.flatnonzero(mnist_y == digit), np.flatnonzero(cifar_y == obj)) for digit, obj in PAIRS
    ]
    n = min(min(len(m), len(c)) for m, c in members)
    if n == 0:
        raise sources.DataError(
            f"MNIST-CIFAR needs MNIST digits {[d for d, _ in PAIRS]} and CIFAR-10 classes "
            f"{[o for _, o in PAIRS]}; one of them has no example in this split."
        )
    m_idx = np.concatenate([rng.permutation(m)[:n] for m, _ in members])
    c_idx = np.concatenate([c[:n] for _, c in members])
    labels = np.repeat(np.arange(len(PAIRS), dtype=np.int32), n)
    order = rng.permutation(len(labels))
    images = stack(mnist_x[m_idx[order]], cifar_x[c_idx[order]])
    return images, labels[order]


def build(mnist, cifar, *, seed=PAIRING_SEED):
    """The MNIST-CIFAR `Dataset` from the MNIST and CIFAR-10 `Dataset`s."""
    x_train, y_train = pair(mnist.x_train, mnist.y_train, cifar.x_train, cifar.y_train, seed=seed)
    x_test, y_test = pair(mnist.x_test, mnist.y_test, cifar.x_test, cifar.y_test, seed=seed + 1)
    return sources.Dataset(
        name="mnist_cifar",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(PAIRS),
        class_names=CLASS_NAMES,
    )


def load(name="mnist_cifar", *, data_dir=None, path=None, **_):
    """Builds MNIST-CIFAR from ``mnist.npz`` and ``cifar10.npz`` (see `sources.load_npz`)."""
    if name != "mnist_cifar":
        raise sources.DataError(
            f"data.source='mnist_cifar' builds one dataset; set data.name='mnist_cifar', "
            f"not {name!r}."
        )
    if path is not None:
        raise sources.DataError(
            "data.path is not used by data.source='mnist_cifar' (it needs two files); set "
            "data.data_dir to the folder holding mnist.npz and cifar10.npz."
        )
    parts = []
    for part in ("mnist", "cifar10"):
        try:
            parts.append(sources.load_npz(part, data_dir=data_dir))
        except sources.DataError as e:
            raise sources.DataError(
                f"MNIST-CIFAR needs both mnist.npz and cifar10.npz in one folder: {e}"
            ) from e
    return build(*parts)


def randomize_mnist(x, *, seed=0):
    """The MNIST-randomized copy of MNIST-CIFAR images: the MNIST halves (rows 0-31) permuted
    across the examples, the CIFAR halves (rows 32-63) and the order of the examples kept.

    On a class-balanced set the digit of an example is then independent of its label, so accuracy
    on ``(randomize_mnist(x_test), y_test)`` measures reliance on the CIFAR half.
    """
    x = np.asarray(x)
    if x.shape[1:] != IMAGE_SHAPE:
        raise sources.DataError(
            f"randomize_mnist expects MNIST-CIFAR images of shape {IMAGE_SHAPE}, got {x.shape[1:]}."
        )
    perm = np.random.default_rng(seed).permutation(len(x))
    return np.concatenate([x[perm, :HALF], x[:, HALF:]], axis=1)


def mnist_mask():
    """The pixel mask of the MNIST half, shape (64, 1, 1) (broadcasts to one 64x32x3 image),
    as a nested list for configs: ``threat.make(epsilon=1.0, mask=mnist_mask())`` lets only the
    MNIST half move."""
    return [[[1.0]]] * HALF + [[[0.0]]] * HALF


__all__ = [
    "CLASS_NAMES",
    "IMAGE_SHAPE",
    "PAIRS",
    "build",
    "load",
    "mnist_mask",
    "pad_mnist",
    "pair",
    "randomize_mnist",
    "stack",
]
