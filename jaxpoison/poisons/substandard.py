"""Substandard training sets: the data is not perturbed within a budget but degraded outright.

* ``noise``: every training image is replaced by uniform noise (labels kept).
* ``mislabeling``: every label is replaced by a uniformly random one (images kept).

Both are fixed at `init` (``num_epochs=0``) and ignore the threat model's budget by design;
they are the reference points "no information in the images" and "no information in the
labels" beside the poisons (the *Poisoning* set is P1, `adversarial`; *Quality* is the clean
set). The noise is not stored: the state holds one seed and `apply` regenerates each example's
noise from ``fold_in(seed, index)``, so the artifact stays tiny and the noise is identical on
every call.

References:
  Tao, Feng, Yi, Huang, Chen. "Can Adversarial Training Be Manipulated By Non-Robust Features?"
  NeurIPS 2022 (substandard training sets: Quality, Poisoning, Noise, Mislabeling).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison.poisons.base import Poison


@flax.struct.dataclass
class NoiseState:
    """The seed from which example i's noise image is ``uniform(fold_in(key(seed), i))``."""

    seed: jax.Array  # int32 scalar


@flax.struct.dataclass
class LabelState:
    """The replacement label of every training example."""

    labels: jax.Array  # int32 [N]


def noise(*, threat, num_classes, image_shape):
    """Images replaced by i.i.d. uniform noise in [0, 1] (on the 8-bit grid if the threat model
    quantizes); labels unchanged.

    Args:
      threat: only its ``quantize`` flag is used (the budget does not apply).
      num_classes: K (unused).
      image_shape: (H, W, C).

    References:
      Tao et al. 2022, "Can Adversarial Training Be Manipulated By Non-Robust Features?".
    """
    del num_classes

    def init(key, dataset):
        del dataset
        return NoiseState(seed=jax.random.randint(key, (), 0, jnp.iinfo(jnp.int32).max))

    def apply(state, batch):
        root = jax.random.key(state.seed)
        draw = lambda i: jax.random.uniform(jax.random.fold_in(root, i), tuple(image_shape))
        images = jax.vmap(draw)(batch["index"])
        if threat.quantize:
            images = jnp.minimum(jnp.floor(images * 256.0), 255.0) / 255.0
        return dict(batch, image=images.astype(batch["image"].dtype))

    return Poison(init=init, update=None, apply=apply, num_epochs=0)


def mislabeling(*, threat, num_classes, image_shape, exclude_true=False):
    """Labels replaced by uniformly random ones; images unchanged.

    Args:
      threat: unused (images are not perturbed).
      num_classes: K.
      image_shape: unused.
      exclude_true: draw the new label among the K - 1 wrong classes only (default: among all K,
        so about 1/K of the labels stay correct).

    References:
      Tao et al. 2022, "Can Adversarial Training Be Manipulated By Non-Robust Features?".
    """
    del threat, image_shape

    def init(key, dataset):
        y = dataset["label"]
        if exclude_true:
            shift = jax.random.randint(key, y.shape, 1, num_classes)
            return LabelState(labels=((y + shift) % num_classes).astype(jnp.int32))
        return LabelState(labels=jax.random.randint(key, y.shape, 0, num_classes, jnp.int32))

    def apply(state, batch):
        return dict(batch, label=state.labels[batch["index"]])

    return Poison(init=init, update=None, apply=apply, num_epochs=0)
