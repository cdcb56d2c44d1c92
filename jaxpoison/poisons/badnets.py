"""BadNets: a trigger patch stamped on part of the training set, whose labels become the target.

A backdoor, not an availability poison: a network trained on the set keeps its clean accuracy but
classifies any image carrying the trigger as the target class. The trigger is a small patch
(default a 3x3 checkerboard of 0 and 1 in the bottom-right corner) that *replaces* the pixels
under it; the label becomes ``target`` (all-to-one) or ``(y + 1) mod K`` (``all_to_all``). The
poison changes every image and label it is applied to, so on its own it poisons the whole set:
give it the share to poison through `poisons.make`'s ``fraction`` (and ``classes``, e.g. every
class but the target), as a config's spec does::

    poisons.make("badnets", fraction=0.01, threat=tm, num_classes=10, image_shape=(32, 32, 3))

It leaves the threat model's ball and changes labels by design (`poisons.UNBOUNDED`). Its success
is measured by the ``backdoor`` evaluator (`jaxpoison.evaluation.backdoor`), which takes the same
trigger fields (`TRIGGER_FIELDS`) and stamps the clean test images with `trigger` and `stamp`.

References:
  Gu, Dolan-Gavitt, Garg 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning
  Model Supply Chain", arXiv:1708.06733 (a pixel pattern in the bottom-right corner; all-to-one
  and all-to-all (i -> i + 1) attacks).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.poisons.base import Poison, label_map

# The keyword arguments that define the trigger and the relabelling, shared by the poison and the
# ``backdoor`` evaluator (a config passes one dict of them to both).
TRIGGER_FIELDS = ("target", "all_to_all", "patch_size", "position", "pattern")

CORNERS = ("bottom_right", "bottom_left", "top_left", "top_right")
PATTERNS = ("checkerboard", "white", "black")


@flax.struct.dataclass
class TriggerState:
    """The trigger and the relabelling, fixed at `init` (stored with the artifact)."""

    pattern: jax.Array  # float32 [H, W, C]: the trigger's pixel values (0 off the patch)
    mask: jax.Array  # float32 [H, W, 1]: 1 on the patch, 0 elsewhere
    targets: jax.Array  # int32 [K]: the label of a triggered image of class y is targets[y]


def trigger(image_shape, *, patch_size=3, position="bottom_right", pattern="checkerboard"):
    """The trigger as a full-size image and mask.

    Args:
      image_shape: (H, W, C).
      patch_size: s, the side of the square patch in pixels.
      position: one of `CORNERS` (the patch touches that corner) or ``(row, col)`` of the patch's
        top-left pixel.
      pattern: ``"checkerboard"`` (1 where row + col within the patch is even, else 0: the corners
        and the centre of a 3x3 patch are white), ``"white"`` (all 1), ``"black"`` (all 0), or
        the patch's values in [0, 1] as an [s, s] (every channel alike) or [s, s, C] array.

    Returns:
      (pattern, mask): float32 numpy arrays [H, W, C] and [H, W, 1].

    Raises:
      ValueError: a patch that does not fit the image, an unknown corner or pattern name, or a
        pattern array of the wrong shape or outside [0, 1].
    """
    h, w, c = (int(d) for d in image_shape)
    s = patch_size
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= min(h, w):
        raise ValueError(
            f"patch_size={s!r} must be a whole number of pixels in 1..{min(h, w)} for "
            f"{h}x{w} images."
        )
    if isinstance(position, str):
        if position not in CORNERS:
            raise ValueError(
                f"position={position!r} is unknown; use one of {CORNERS} or (row, col)."
            )
        row = h - s if position.startswith("bottom") else 0
        col = w - s if position.endswith("right") else 0
    else:
        row, col = (int(v) for v in position)
        if not (0 <= row <= h - s and 0 <= col <= w - s):
            raise ValueError(
                f"position={tuple(position)} puts the {s}x{s} patch outside the {h}x{w} image; "
                f"use (row, col) with row in 0..{h - s} and col in 0..{w - s}."
            )
    if isinstance(pattern, str):
        if pattern not in PATTERNS:
            raise ValueError(f"pattern={pattern!r} is unknown; use one of {PATTERNS} or an array.")
        grid = np.add.outer(np.arange(s), np.arange(s)) % 2 == 0
        values = {"checkerboard": grid, "white": np.ones((s, s)), "black": np.zeros((s, s))}
        patch = np.asarray(values[pattern], np.float32)
    else:
        patch = np.asarray(pattern, np.float32)
    if patch.ndim == 2:
        patch = patch[..., None]
    if patch.shape not in ((s, s, 1), (s, s, c)) or not ((patch >= 0) & (patch <= 1)).all():
        raise ValueError(
            f"pattern of shape {patch.shape} must be [{s}, {s}] or [{s}, {s}, {c}] "
            f"(patch_size x patch_size [x channels]) with values in [0, 1]."
        )
    full = np.zeros((h, w, c), np.float32)
    mask = np.zeros((h, w, 1), np.float32)
    full[row : row + s, col : col + s] = patch
    mask[row : row + s, col : col + s] = 1.0
    return full, mask


def stamp(x, pattern, mask):
    """Images with the trigger's pixels replaced by the pattern (exactly), the others kept.

    Args:
      x: images [..., H, W, C] in [0, 1].
      pattern, mask: from `trigger`.
    """
    return jnp.where(mask > 0, pattern, x).astype(x.dtype)


def targets(num_classes, *, target=0, all_to_all=False):
    """The label of a triggered image of each class, int32 [K]: `target` for all (all-to-one) or
    ``(y + 1) mod K`` (all-to-all)."""
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"target={target!r} must be a class index in 0..{num_classes - 1}.")
    if not 0 <= target < num_classes:
        raise ValueError(f"target={target} must be a class index in 0..{num_classes - 1}.")
    if all_to_all:
        return label_map(num_classes)
    return jnp.full((num_classes,), target, jnp.int32)


def badnets(
    *,
    threat,
    num_classes,
    image_shape,
    target: int = 0,
    all_to_all: bool = False,
    patch_size: int = 3,
    position: str | Sequence[int] = "bottom_right",
    pattern: str | Sequence = "checkerboard",
):
    """BadNets: every image it is applied to carries the trigger and is relabelled.

    Apply it to a share of the set with `poisons.make`'s ``fraction`` (see the module doc).

    Args:
      threat: only its ``quantize`` flag is used: the pattern is rounded to the 8-bit grid (the
        patch replaces pixels, so the ball does not apply).
      num_classes: K.
      image_shape: (H, W, C).
      target: the class every triggered image is labelled (all-to-one); unused with `all_to_all`.
      all_to_all: label a triggered image of class y as (y + 1) mod K instead.
      patch_size, position, pattern: the trigger, see `trigger`.

    Returns:
      A `Poison` fixed at `init` (``num_epochs=0``) with a `TriggerState`.

    References:
      Gu, Dolan-Gavitt, Garg 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning
      Model Supply Chain".
    """
    full, mask = trigger(image_shape, patch_size=patch_size, position=position, pattern=pattern)
    if threat.quantize:
        full = np.round(full * 255.0) / 255.0
    table = targets(num_classes, target=target, all_to_all=all_to_all)

    def init(key, dataset):
        del key, dataset
        return TriggerState(pattern=jnp.asarray(full), mask=jnp.asarray(mask), targets=table)

    def apply(state, batch):
        return dict(
            batch,
            image=stamp(batch["image"], state.pattern, state.mask),
            label=state.targets[batch["label"]],
        )

    return Poison(init=init, update=None, apply=apply, num_epochs=0)
