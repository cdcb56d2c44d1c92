"""Rotation prediction, the pretext task of Gidaris et al. (2018), as a training objective.

Every image of a batch is shown in all four rotations (0, 90, 180 and 270 degrees
counter-clockwise) and the model predicts which: a 4-way classification whose labels are the
rotation indices, the batch's own labels being ignored. `pretext` wraps any objective of
`jaxpoison.objectives`, so standard training is ``pretext(objectives.make('erm'))`` and adversarial
training on the pretext loss is ``pretext(objectives.make('pgd_at', ...))``: PGD then maximises the
rotation cross-entropy, each rotated copy with its own perturbation in the defender's ball.

References:
  Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by Predicting Image
  Rotations", ICLR.
  Hendrycks et al. 2019, "Using Self-Supervised Learning Can Improve Model Robustness and
  Uncertainty", NeurIPS (adversarial training of the rotation task).
  Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with Adversarial
  Training", NeurIPS (rotation SSL with ST and AT as defenses against delusive poisons).
"""

from __future__ import annotations

import jax.numpy as jnp

NUM_ROTATIONS = 4


def rotate(images):
    """All four rotations of a batch of square images.

    Args:
      images: [B, H, H, C].

    Returns:
      ``(rotated [4B, H, H, C], labels int32 [4B])``: block k (examples ``k*B .. k*B + B - 1``) is
      ``jnp.rot90(images, k, axes=(1, 2))`` (k quarter turns counter-clockwise), labelled k.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"rotation prediction needs square NHWC images, got shape {images.shape}; crop or "
            "pad them to H == W first."
        )
    rotated = jnp.concatenate(
        [jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)], axis=0
    )
    labels = jnp.repeat(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32), images.shape[0])
    return rotated, labels


def pretext(objective):
    """The rotation-prediction version of `objective` (a model with 4 outputs is trained).

    Args:
      objective: ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)`` of
        `jaxpoison.objectives`.

    Returns:
      An objective of the same signature that replaces the batch by its four rotations and their
      rotation labels (``batch['label']`` is ignored) and calls `objective` on it.
    """

    def rotation_objective(variables, batch, key, *, apply_fn):
        images, labels = rotate(batch["image"])
        # Keep the trainer's per-batch scalars (`progress`, `epoch`) for scheduled objectives.
        rotated = {**batch, "image": images, "label": labels}
        if "index" in batch:
            rotated["index"] = jnp.tile(batch["index"], NUM_ROTATIONS)
        return objective(variables, rotated, key, apply_fn=apply_fn)

    return rotation_objective


__all__ = ["NUM_ROTATIONS", "pretext", "rotate"]
