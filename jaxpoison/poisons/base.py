"""The poison interface: a factory returns pure functions, as optax's transformations do.

    poison = POISONS[name](threat=..., num_classes=..., image_shape=..., **hyperparameters)
    state = poison.init(key, dataset)                 # dataset: {'image', 'label'} on device
    state, metrics = poison.update(state, batch, key)  # one crafting step (None if none)
    batch = poison.apply(state, batch)                # image <- clip(image + delta), labels kept

`num_epochs` is how many passes of `update` over the training set the crafting engine makes
(0 for poisons that are fixed at `init`, such as class-wise random noise). `extendable` says
that the first E passes do not depend on `num_epochs` (no schedule over them): a longer craft
may then continue a finished shorter one (`poisons.craft(..., start_from=...)`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


class Poison(NamedTuple):
    init: Callable
    update: Callable | None
    apply: Callable
    num_epochs: int = 0
    num_classes: int | None = None  # set by `poisons.make`: `craft` checks the labels against it
    extendable: bool = False  # the first E epochs are the same whatever num_epochs (L2C)


@flax.struct.dataclass
class ClassWiseState:
    """One perturbation per class, added to every training image of that class."""

    class_delta: jax.Array  # [K, H, W, C]


@flax.struct.dataclass
class SampleWiseState:
    """One perturbation per training example, looked up by the batch's 'index'."""

    delta: jax.Array  # [N, H, W, C]
    extra: Any = None  # e.g. a surrogate model's state for error-minimizing noise


def perturb(threat, x, delta):
    """``x + delta`` with `delta` projected into `threat` and the sum clipped to [0, 1] (the
    clip only removes float rounding, e.g. ``-2e-9`` from an 8-bit-quantized delta)."""
    return jnp.clip(x + threat.project(delta, x), 0.0, 1.0)


def apply_class_wise(threat):
    """`apply` for a `ClassWiseState`: x + delta[y], projected into `threat` and [0, 1]."""

    def apply(state, batch):
        return dict(batch, image=perturb(threat, batch["image"], state.class_delta[batch["label"]]))

    return apply


def apply_sample_wise(threat):
    """`apply` for a `SampleWiseState`: x + delta[index], projected into `threat` and [0, 1]."""

    def apply(state, batch):
        return dict(batch, image=perturb(threat, batch["image"], state.delta[batch["index"]]))

    return apply


def zeros_like_dataset(dataset):
    return jnp.zeros_like(dataset["image"])


def label_map(num_classes, permutation=None):
    """The target map t = π(y) of a targeted poison as an int array of length `num_classes`.

    Args:
      num_classes: K.
      permutation: None for the default shift π(y) = (y + 1) mod K (Tao et al. 2021), else a
        sequence of K class indices (``permutation[y]`` is the target of class y).
    """
    if permutation is None:
        return jnp.asarray((np.arange(num_classes) + 1) % num_classes, jnp.int32)
    table = np.asarray(permutation)
    if table.shape != (num_classes,) or table.min() < 0 or table.max() >= num_classes:
        raise ValueError(
            f"permutation={list(permutation)} must list one target class in 0..{num_classes - 1} "
            f"for each of the {num_classes} classes."
        )
    return jnp.asarray(table, jnp.int32)


def project_pattern(threat, delta):
    """Projects class (universal) patterns into the ball only: the [0, 1] box depends on the image
    they are added to, so it is applied by `apply` (a mid-grey reference image leaves any
    ε <= 0.5 pattern inside the box)."""
    return threat.project(delta, jnp.full_like(delta, 0.5))
