"""Backdoor success: the attack success rate of a trigger, beside clean accuracy.

The ``backdoor`` evaluator stamps the trigger of a BadNets poison (`jaxpoison.poisons.badnets`)
on the clean test images and counts how many the model labels as the backdoor's target:

* ``asr``: all-to-one, the fraction of triggered test images of the classes other than the target
  that are classified as the target (images of the target class are left out: for them the
  backdoor and the clean task agree); all-to-all, the fraction of triggered test images of class
  y classified as (y + 1) mod K.
* ``acc/D``: clean accuracy on the untouched test images; ``acc/triggered``: accuracy of the
  triggered images against their true labels; ``n/asr``: how many images ``asr`` counts.

It takes the trigger as the poison does, the fields `badnets.TRIGGER_FIELDS` (``target``,
``all_to_all``, ``patch_size``, ``position``, ``pattern``, same defaults), so a config passes one
dict of them to both::

    trigger = dict(target=0, patch_size=3, position="bottom_right", pattern="checkerboard")
    config.poisons.badnets = dict(name="badnets", fraction=0.01, **trigger)
    config.evals.asr = dict(name="backdoor", **trigger)

References:
  Gu, Dolan-Gavitt, Garg 2017, "BadNets: Identifying Vulnerabilities in the Machine Learning
  Model Supply Chain", arXiv:1708.06733.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpoison.evaluation.risk import _dataset_evaluator, _safe_div
from jaxpoison.poisons import badnets


def make_backdoor(
    *,
    apply_fn,
    num_classes,
    target=0,
    all_to_all=False,
    patch_size=3,
    position="bottom_right",
    pattern="checkerboard",
    batch_size=500,
    seed_strategy="auto",
):
    """The backdoor evaluator: ``asr``, ``acc/D``, ``acc/triggered`` and ``n/asr`` per seed.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)`` of the victim.
      num_classes: K.
      target, all_to_all, patch_size, position, pattern: the trigger and its labels, as the
        ``badnets`` poison takes them (`badnets.badnets`, `badnets.trigger`).
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      An `Evaluator` (see `risk.Evaluator`); the trigger is built for the images' shape when it
      is first called.

    References:
      Gu, Dolan-Gavitt, Garg 2017, "BadNets".
    """
    table = badnets.targets(num_classes, target=target, all_to_all=all_to_all)

    def per_batch(variables, x, y, mask, key):
        del key
        full, patch = badnets.trigger(
            x.shape[1:], patch_size=patch_size, position=position, pattern=pattern
        )
        predict = lambda images: jnp.argmax(apply_fn(variables, images, train=False)[0], -1)
        pred = predict(x)
        pred_triggered = predict(badnets.stamp(x, jnp.asarray(full), jnp.asarray(patch)))
        goal = table[y]
        counted = mask * (goal != y)  # all-to-one: the target class's own images left out
        f = lambda b: b.astype(jnp.float32)
        return {
            "n": jnp.sum(mask),
            "correct": jnp.sum(f(pred == y) * mask),
            "triggered_correct": jnp.sum(f(pred_triggered == y) * mask),
            "n_asr": jnp.sum(counted),
            "success": jnp.sum(f(pred_triggered == goal) * counted),
        }

    def finish(s):
        return {
            "asr": _safe_div(s["success"], s["n_asr"]),
            "acc/D": s["correct"] / s["n"],
            "acc/triggered": s["triggered_correct"] / s["n"],
            "n/asr": s["n_asr"],
        }

    return _dataset_evaluator(
        per_batch, finish, batch_size=batch_size, seed_strategy=seed_strategy, name="backdoor"
    )


__all__ = ["make_backdoor"]
