"""Datasets: sources (tfds, .npz files, the embedded CIFAR-10 subset, scikit-learn digits,
MNIST-CIFAR built from two .npz files: `data.mnist_cifar`),
class-balanced subsets, validation splits, the on-device pipeline (batches, augmentation), and
training splits streamed from disk (`data.streaming`: tfds ArrayRecord files read by Grain).

A batch is a dict ``{'image': float32 [B, H, W, C] in [0, 1], 'label': int32 [B],
'index': int32 [B]}``, where `index` is the example's position in the training set. Images enter
the library through `as_float_images` (uint8 / 255; floats checked to be finite and in [0, 1];
channel-first and non-4-d arrays refused with the fix); the trainer keeps uint8 images uint8 on
the devices and converts each batch inside the step (`device_float`).
"""

from jaxpoison.data import mnist_cifar, streaming
from jaxpoison.data.pipeline import (
    as_float_images,
    augment,
    device_float,
    epoch_batches,
    to_float,
)
from jaxpoison.data.sources import (
    DataError,
    Dataset,
    aligned_empty,
    check_image_shape,
    validate_arrays,
)
from jaxpoison.data.splits import SOURCES, balanced_indices, load, split_validation

__all__ = [
    "SOURCES",
    "DataError",
    "Dataset",
    "aligned_empty",
    "as_float_images",
    "augment",
    "balanced_indices",
    "check_image_shape",
    "device_float",
    "epoch_batches",
    "load",
    "mnist_cifar",
    "split_validation",
    "streaming",
    "to_float",
    "validate_arrays",
]
