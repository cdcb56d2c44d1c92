r"""DeepFool: the nearest decision boundary of the linearised classifier, step after step.

At the current point x_i the logits are linearised; for each candidate class k the boundary with
the label y, :math:`f_k = z_k - z_y`, is at distance :math:`|f_k| / \|w_k\|_q`,
:math:`w_k = \nabla (z_k - z_y)`, with q the dual norm of the ball's (2 for ℓ2, 1 for ℓ∞). The
step goes to the nearest one, a little past it:

.. math::
    r_i = (|f_l| / \|w_l\|_q + 10^{-4})\, \frac{w_l}{\|w_l\|_2}  \ (\ell_2), \qquad
    r_i = (|f_l| / \|w_l\|_1 + 10^{-4})\, \mathrm{sign}(w_l)  \ (\ell_\infty),

the total :math:`r = \sum_i r_i` is applied with an overshoot η,
:math:`x_{i+1} = \mathrm{clip}_{[0,1]}(x + (1 + \eta) r)`, until the prediction leaves y or the
steps run out. On an affine classifier one step lands at distance exactly
:math:`(1 + \eta)(d + 10^{-4})`, d the distance to the nearest boundary.

The candidates are the classes with the highest logits at x other than y (the reference: the top
10 including the original class). A whole batch runs at once: the gradients of the candidate
margins are vmapped VJPs of one forward pass, examples already misclassified are frozen by a
mask, and the `lax.while_loop` ends when none is left.

References:
  Moosavi-Dezfooli, Fawzi, Frossard 2016, "DeepFool: a simple and accurate method to fool deep
  neural networks", CVPR (Algorithms 2 and 3, the ℓp case of Sec. 3.3); github.com/LTS4/DeepFool
  (``deepfool.py``: overshoot 0.02, 50 iterations, 10 classes, the 1e-4 added to each step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NORMS = ("l2", "linf")


class DeepFoolResult(NamedTuple):
    """What DeepFool found, per example.

    Attributes:
      adv: the last point, in [0, 1] (x itself where x is already misclassified).
      found: bool [B], `adv` is misclassified (argmax != y).
      norm: [B] ``||adv - x||`` in the attack's norm where `found`, else inf.
      steps: int [B], the linearisation steps the example took.
    """

    adv: jax.Array
    found: jax.Array
    norm: jax.Array
    steps: jax.Array


def _norm(v, norm):
    flat = v.reshape(v.shape[0], -1)
    if norm == "l2":
        return jnp.linalg.norm(flat, axis=1)
    return jnp.max(jnp.abs(flat), axis=1)


def _dual_norm(grads, norm):
    """[k, B]: the dual norm of each of k gradients [k, B, ...] per example."""
    flat = grads.reshape(grads.shape[:2] + (-1,))
    if norm == "l2":
        return jnp.linalg.norm(flat, axis=-1)
    return jnp.sum(jnp.abs(flat), axis=-1)


def deepfool(logits_fn, x, y, *, norm="l2", num_steps=50, overshoot=0.02, num_candidates=10):
    """DeepFool on one batch.

    Args:
      logits_fn: ``x -> logits [B, K]`` (the model in eval mode); each example's logits must
        depend on that example only.
      x: images [B, H, W, C] in [0, 1].
      y: labels [B] (the attack moves away from them; the reference uses the prediction, the
        same on correctly classified points).
      norm: ``"l2"`` or ``"linf"``, the norm whose distance is minimised.
      num_steps: the most linearisation steps (50).
      overshoot: η (0.02).
      num_candidates: classes looked at, y included (10; capped at K): the others are those
        with the highest logits at x.

    Returns:
      A `DeepFoolResult`.

    References:
      Moosavi-Dezfooli et al. 2016, CVPR; github.com/LTS4/DeepFool.
    """
    if norm not in NORMS:
        raise ValueError(f"deepfool: norm={norm!r} must be one of {NORMS}.")
    logits0 = logits_fn(x)
    num_classes = logits0.shape[1]
    k = min(num_candidates, num_classes) - 1
    if k < 1:
        raise ValueError(f"deepfool: num_candidates={num_candidates} must be at least 2.")
    is_y = jax.nn.one_hot(y, num_classes, dtype=bool)
    candidates = jax.lax.top_k(jnp.where(is_y, -jnp.inf, logits0), k)[1]  # [B, k]
    # Cotangents e_k - e_y: one VJP per candidate gives every example's gradient of z_k - z_y.
    cotangents = jax.nn.one_hot(candidates.T, num_classes) - jax.nn.one_hot(y, num_classes)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)

    def body(s):
        logits, vjp_fn = jax.vjp(logits_fn, s["adv"])
        active = jnp.argmax(logits, -1) == y
        grads = jax.vmap(lambda c: vjp_fn(c)[0])(cotangents)  # [k, B, H, W, C]
        f = jnp.sum(cotangents * logits[None], axis=-1)  # [k, B]: z_k - z_y
        dist = jnp.abs(f) / (_dual_norm(grads, norm) + 1e-12)  # [k, B]
        nearest = jnp.argmin(dist, axis=0)
        w = jnp.take_along_axis(grads, nearest.reshape((1,) + shape), axis=0)[0]
        size = jnp.take_along_axis(dist, nearest[None], axis=0)[0] + 1e-4
        if norm == "l2":
            step = w / (_norm(w, "l2").reshape(shape) + 1e-12)
        else:
            step = jnp.sign(w)
        r = s["r"] + jnp.where(active.reshape(shape), size.reshape(shape) * step, 0.0)
        return {
            "i": s["i"] + 1,
            "r": r,
            "adv": jnp.clip(x + (1.0 + overshoot) * r, 0.0, 1.0),
            "active": active,
            "steps": s["steps"] + active.astype(jnp.int32),
        }

    def cond(s):
        return (s["i"] < num_steps) & jnp.any(s["active"])

    state = {
        "i": jnp.zeros((), jnp.int32),
        "r": jnp.zeros_like(x),
        "adv": x,
        "active": jnp.argmax(logits0, -1) == y,
        "steps": jnp.zeros(y.shape, jnp.int32),
    }
    state = jax.lax.while_loop(cond, body, state)
    adv = state["adv"]
    found = jnp.argmax(logits_fn(adv), -1) != y
    dist = jnp.where(found, _norm(adv - x, norm), jnp.inf)
    return DeepFoolResult(adv=adv, found=found, norm=dist, steps=state["steps"])


__all__ = ["NORMS", "DeepFoolResult", "deepfool"]
