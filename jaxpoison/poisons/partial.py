"""Partial poisoning: any poison applied to a chosen fraction of the training set or classes.

``restrict(poison, fraction=0.5, classes=(0, 3))`` poisons a random half of the examples of
classes 0 and 3 and leaves every other example clean (image and label); ``per_class=True``
takes the fraction of every class separately (APBench's "a fraction of each class stays clean"),
so each class keeps the same share of clean examples. Which examples are poisoned is drawn at
`init` from the key, so the same key gives the same subset. (APBench's other poison ratio, a
fraction of each *batch* poisoned and a new draw every epoch, is the victim's ``poison_ratio``:
see `training.Trainer`.) The wrapped
poison is crafted over the whole training set as usual (its crafting may use the clean examples
too); only `apply` is restricted.

References:
  Huang et al. 2021, "Unlearnable Examples: Making Personal Data Unexploitable", ICLR
  (poisoning a fraction or a subset of classes).
  Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with Adversarial
  Training", NeurIPS (partial poisoning).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison.poisons.base import Poison


@flax.struct.dataclass
class PartialState:
    """The wrapped poison's state and which training examples it is applied to."""

    inner: Any
    mask: jax.Array  # bool [N]


def choose(key, labels, *, fraction=1.0, classes=None, per_class=False):
    """A boolean mask over the training set: ``round(fraction * n)`` examples drawn at random
    among the n examples whose label is in `classes` (all classes when None); with `per_class`,
    ``round(fraction * n_c)`` of each eligible class c."""
    eligible = jnp.ones(labels.shape, bool)
    if classes is not None:
        eligible = jnp.isin(labels, jnp.asarray(list(classes), labels.dtype))
    scores = jnp.where(eligible, jax.random.uniform(key, labels.shape), jnp.inf)
    if not per_class:
        count = jnp.round(fraction * jnp.sum(eligible)).astype(jnp.int32)
        return jnp.argsort(jnp.argsort(scores)) < count
    # Rank within the class: sorted by (label, score), an example's rank is its position after
    # the first of its class (`classes` selects whole classes, so a class is eligible or not).
    order = jnp.lexsort((scores, labels))
    sorted_labels = labels[order]
    first = jnp.searchsorted(sorted_labels, sorted_labels, side="left")
    size = jnp.searchsorted(sorted_labels, sorted_labels, side="right") - first
    chosen_sorted = (jnp.arange(labels.shape[0]) - first) < jnp.round(fraction * size)
    chosen_sorted &= eligible[order]
    return jnp.zeros(labels.shape, bool).at[order].set(chosen_sorted)


def restrict(poison, *, fraction=1.0, classes=None, per_class=False):
    """Restricts `poison` to a `fraction` of the examples (of the given `classes`).

    Args:
      poison: any `Poison`.
      fraction: share of the eligible examples that are poisoned, in [0, 1].
      classes: optional class indices; only their examples are eligible.
      per_class: take the fraction of each class separately (stratified), not of the set.

    Returns:
      A `Poison` with a `PartialState`; its `update` is the wrapped poison's.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must be in [0, 1].")
    classes = None if classes is None else tuple(int(c) for c in classes)

    def init(key, dataset):
        mask = choose(
            jax.random.fold_in(key, 1),
            dataset["label"],
            fraction=fraction,
            classes=classes,
            per_class=per_class,
        )
        return PartialState(inner=poison.init(jax.random.fold_in(key, 0), dataset), mask=mask)

    update = None
    if poison.update is not None:

        def update(state, batch, key):
            inner, metrics = poison.update(state.inner, batch, key)
            return state.replace(inner=inner), metrics

    def apply(state, batch):
        out = poison.apply(state.inner, batch)
        keep = state.mask[batch["index"]]
        image = jnp.where(
            keep.reshape(-1, *[1] * (batch["image"].ndim - 1)), out["image"], batch["image"]
        )
        return dict(out, image=image, label=jnp.where(keep, out["label"], batch["label"]))

    return Poison(
        init=init,
        update=update,
        apply=apply,
        num_epochs=poison.num_epochs,
        extendable=poison.extendable,
    )
