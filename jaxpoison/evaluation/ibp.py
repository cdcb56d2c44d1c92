r"""The ``ibp`` evaluator: certified (verified) accuracy under an ℓ∞ ball by interval bounds.

An example is *certified* at radius ε when the interval bounds of `jaxpoison.ibp` prove that its
true class y beats every other class everywhere in the ball: every margin
:math:`z_y - z_j`, j ≠ y, has a positive lower bound (computed with the last layer elided into
the margins, Gowal et al. 2018, unless ``elide=False``). Certified accuracy is a lower bound on
the accuracy under any attack of radius ε (``acc/A`` of `risk`, ``acc/AA`` of `autoattack`),
and the *verified error* 1 − certified accuracy an upper bound on the robust error. No attack
runs: per batch one eval-mode forward pass and one interval pass, in the same jitted program.

Unlike `certified` (the exact certificate of 1-Lipschitz ℓ∞-dist nets), this works for every
model built from affine layers, eval-mode BatchNorm, monotone activations and pooling; on a
network not trained for it (standard or PGD training) the bounds are loose and certified
accuracy is near 0 beyond tiny radii.

References:
  Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training Verifiably
  Robust Models" (verified error; elision of the last layer).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpoison import ibp
from jaxpoison import threat as threat_lib
from jaxpoison.evaluation.risk import _dataset_evaluator


def make_ibp(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    elide=True,
    batch_size=500,
    seed_strategy="auto",
):
    """The IBP evaluator: clean accuracy, certified accuracy and verified error, per seed.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)``; run in eval mode.
      num_classes: K.
      threat: an ℓ∞ `LpBall`; or its fields `norm`, `epsilon`, `mask` (a config's
        ``config.threat`` fills them). No default radius.
      norm: ``"linf"`` (when None); the only norm IBP bounds.
      epsilon: the ℓ∞ radius in pixel units, without `threat`.
      mask: optional pixel mask of the ball, without `threat`.
      elide: fold the model's last affine layer into the margins (tighter; Gowal et al.).
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      A `risk.Evaluator` returning, each with a leading seed axis: ``acc/D`` (clean accuracy),
      ``acc/IBP`` (certified accuracy: correct and proven so in the whole ball) and ``err/IBP``
      (verified error, 1 − ``acc/IBP``).

    Raises:
      ValueError: no radius, both `threat` and its fields, or a ball that is not ℓ∞.
      ibp.UnboundedPrimitiveError: (when first called) the model applies an operation IBP
        cannot bound.
    """
    ball = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what="ibp")
    if ball.norm != "linf":
        raise ValueError(
            f"ibp: interval bounds are for the linf ball, got norm={ball.norm!r}; give the "
            "evaluator its own norm='linf' and epsilon, or use 'risk' / 'autoattack' for l2."
        )

    def per_batch(variables, x, y, valid, key):
        del key
        logits_fn = lambda images: apply_fn(variables, images, train=False)[0]
        worst = ibp.worst_case_logits(
            logits_fn,
            x,
            y,
            ball.epsilon,
            num_classes=num_classes,
            mask=ball.mask,
            elide=elide,
        )
        correct = jnp.argmax(logits_fn(x), -1) == y
        count = lambda b: jnp.sum(b.astype(jnp.float32) * valid)
        return {
            "n": jnp.sum(valid),
            "correct": count(correct),
            "certified": count(correct & ibp.certified(worst, y)),
        }

    def finish(s):
        acc = s["certified"] / s["n"]
        return {"acc/D": s["correct"] / s["n"], "acc/IBP": acc, "err/IBP": 1.0 - acc}

    return _dataset_evaluator(
        per_batch, finish, batch_size=batch_size, seed_strategy=seed_strategy, name="ibp"
    )


__all__ = ["make_ibp"]
