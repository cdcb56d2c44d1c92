"""The poison interface: a factory returns pure functions, as optax's transformations do.

    poison = POISONS[name](threat=..., num_classes=..., image_shape=..., **hyperparameters)
    state = poison.init(key, dataset)                 # dataset: {'image', 'label'} on device
    state, metrics = poison.update(state, batch, key)  # one crafting step (None if none)
    batch = poison.apply(state, batch)                # image <- clip(image + delta), labels kept

`num_epochs` is how many passes of `update` over the training set the crafting engine makes
(0 for poisons that are fixed at `init`, such as class-wise random noise).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp


class Poison(NamedTuple):
    init: Callable
    update: Callable | None
    apply: Callable
    num_epochs: int = 0


@flax.struct.dataclass
class ClassWiseState:
    """One perturbation per class, added to every training image of that class."""

    class_delta: jax.Array  # [K, H, W, C]


@flax.struct.dataclass
class SampleWiseState:
    """One perturbation per training example, looked up by the batch's 'index'."""

    delta: jax.Array  # [N, H, W, C]
    extra: Any = None  # e.g. a surrogate model's state for error-minimizing noise


def apply_class_wise(threat):
    """`apply` for a `ClassWiseState`: x + delta[y], projected into `threat` and [0, 1]."""

    def apply(state, batch):
        x = batch["image"]
        delta = threat.project(state.class_delta[batch["label"]], x)
        return dict(batch, image=x + delta)

    return apply


def apply_sample_wise(threat):
    """`apply` for a `SampleWiseState`: x + delta[index], projected into `threat` and [0, 1]."""

    def apply(state, batch):
        x = batch["image"]
        delta = threat.project(state.delta[batch["index"]], x)
        return dict(batch, image=x + delta)

    return apply


def zeros_like_dataset(dataset):
    return jnp.zeros_like(dataset["image"])
