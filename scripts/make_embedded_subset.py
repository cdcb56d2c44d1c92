"""Builds jaxpoison/data/embedded/cifar10_subset.npz from the full CIFAR-10 archive.

  python scripts/make_embedded_subset.py ../shared/data/cifar10.npz

Keeps the first 250 training and the first 100 test images of every class, in the archive's
order, so the subset is exactly class-balanced and reproducible.
"""

import hashlib
import sys
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 250
TEST_PER_CLASS = 100
OUT = Path(__file__).resolve().parents[1] / "jaxpoison" / "data" / "embedded" / "cifar10_subset.npz"


def balanced_prefix(y, per_class):
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)]))


def main(source):
    with np.load(source) as d:
        x_train, y_train, x_test, y_test = (
            d[k] for k in ("x_train", "y_train", "x_test", "y_test")
        )
    tr = balanced_prefix(y_train, TRAIN_PER_CLASS)
    te = balanced_prefix(y_test, TEST_PER_CLASS)
    np.savez_compressed(
        OUT,
        x_train=x_train[tr],
        y_train=y_train[tr].astype(np.int64),
        x_test=x_test[te],
        y_test=y_test[te].astype(np.int64),
    )
    print(OUT, hashlib.sha256(OUT.read_bytes()).hexdigest())


if __name__ == "__main__":
    main(sys.argv[1])
