r"""Minimal-perturbation evaluators: how far the decision boundary is, by CW-ℓ2 and DeepFool.

Instead of asking whether a ball of radius ε holds an adversarial point (``risk``,
``autoattack``), these attacks search for the *smallest* perturbation that changes the
prediction, and report its norm. On the correctly classified examples (D+):

* ``norm/median``: the median norm, examples where none was found counted as infinitely far
  (so the median is inf once more than half of D+ resisted);
* ``norm/mean``: the mean norm over the examples where one was found;
* ``found``: the fraction of D+ where one was found;
* ``acc/robust``: the fraction of the whole dataset that is correctly classified and has no
  found perturbation of norm at most ε (the ball's radius), an upper bound of the robust
  accuracy at ε since the attacks only estimate the minimal norm; ``acc/D`` the clean accuracy.

A perturbation counts only when the model misclassifies the returned point, checked again here.

References:
  Carlini, Wagner 2017, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P.
  Moosavi-Dezfooli, Fawzi, Frossard 2016, "DeepFool", CVPR.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison import sharding
from jaxpoison import threat as threat_lib
from jaxpoison.attacks.cw import carlini_wagner_l2
from jaxpoison.attacks.deepfool import deepfool
from jaxpoison.evaluation.risk import Evaluator, batched, variables_of
from jaxpoison.train_state import over_seeds


def norm_metrics(norms, correct, valid, *, epsilon):
    """The module doc's metrics from per-example norms (inf where none was found) [N], clean
    correctness [N] and a validity mask [N] (padding 0)."""
    plus = correct & valid
    n, n_plus = jnp.sum(valid), jnp.sum(plus)
    found = plus & jnp.isfinite(norms)
    # Sorting puts padding and misclassified points (set to -inf) first, D+ after them.
    ordered = jnp.sort(jnp.where(plus, norms, -jnp.inf))
    start = ordered.shape[0] - n_plus
    lo = start + (n_plus - 1) // 2
    hi = start + n_plus // 2
    median = (ordered[lo] + ordered[hi]) / 2.0
    return {
        "acc/D": n_plus / n,
        "acc/robust": jnp.sum(plus & ~(norms <= epsilon)) / n,
        "found": jnp.where(n_plus > 0, jnp.sum(found) / jnp.maximum(n_plus, 1), jnp.nan),
        "norm/median": jnp.where(n_plus > 0, median, jnp.nan),
        "norm/mean": jnp.sum(jnp.where(found, norms, 0.0)) / jnp.sum(found),
        "n/D+": n_plus,
    }


def _check_counts(what, **counts):
    """One error line for a count that is not a whole number >= 1."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{what}: {name}={value!r} must be a whole number >= 1.")


def _minimal_evaluator(attack, *, apply_fn, epsilon, batch_size, seed_strategy, name):
    """An `Evaluator` running ``attack(logits_fn, x, y) -> (adv, norm)`` on every batch and
    summarising the per-example norms with `norm_metrics`."""

    def one_seed(state, xb, yb, mb):
        variables = variables_of(state)

        def logits_fn(images):
            return apply_fn(variables, images, train=False)[0]

        def body(inputs):
            xs, ys = sharding.batch(inputs)
            adv, norm = attack(logits_fn, xs, ys)
            correct = jnp.argmax(logits_fn(xs), -1) == ys
            fooled = jnp.argmax(logits_fn(adv), -1) != ys
            return jnp.where(fooled, norm, jnp.inf), correct

        norms, correct = jax.lax.map(body, (xb, yb))
        valid = mb.reshape(-1) > 0
        return norm_metrics(norms.reshape(-1), correct.reshape(-1), valid, epsilon=epsilon)

    def fn(states, x, y, key):
        del key  # both attacks are deterministic
        xb, yb, mb = batched(x, y, batch_size)
        return over_seeds(lambda s: one_seed(s, xb, yb, mb), seed_strategy)(states)

    return Evaluator(fn, name=name)


def make_cw_l2(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    num_steps=1000,
    search_steps=9,
    learning_rate=0.01,
    initial_const=1e-3,
    confidence=0.0,
    abort_early=True,
    batch_size=500,
    seed_strategy="auto",
):
    """The CW-ℓ2 evaluator: minimal ℓ2 norms of the module doc, per seed.

    Args:
      apply_fn: the victim's ``apply_fn`` (eval mode).
      num_classes: K (unused: the attack is untargeted).
      threat: an ℓ2 `LpBall`, whose radius is the ε of ``acc/robust``; or its fields `norm`
        (``"l2"``), `epsilon`, `mask` (the mask is refused: the attack moves every pixel).
      num_steps, search_steps, learning_rate, initial_const, confidence, abort_early: see
        `attacks.cw.carlini_wagner_l2` (the reference's, but 1000 iterations instead of 10,000).
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      An `Evaluator` returning `norm_metrics`, each with a leading seed axis.

    References:
      Carlini, Wagner 2017, IEEE S&P.
    """
    del num_classes
    tm = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what="cw_l2")
    if tm.norm != "l2" or tm.mask is not None:
        raise ValueError(
            f"cw_l2 measures l2 norms of unmasked perturbations, but the ball is {tm.norm}"
            f"{' with a mask' if tm.mask is not None else ''}; give its spec norm='l2', "
            "epsilon=<radius> (e.g. 0.5) and no mask."
        )
    _check_counts("cw_l2", num_steps=num_steps, search_steps=search_steps, batch_size=batch_size)
    if not (learning_rate > 0 and initial_const > 0 and confidence >= 0):
        raise ValueError(
            f"cw_l2: learning_rate={learning_rate!r} and initial_const={initial_const!r} must be "
            f"> 0 and confidence={confidence!r} >= 0 (the reference: 0.01, 1e-3, 0)."
        )

    def attack(logits_fn, x, y):
        res = carlini_wagner_l2(
            logits_fn,
            x,
            y,
            num_steps=num_steps,
            search_steps=search_steps,
            learning_rate=learning_rate,
            initial_const=initial_const,
            confidence=confidence,
            abort_early=abort_early,
        )
        return res.adv, res.norm

    return _minimal_evaluator(
        attack,
        apply_fn=apply_fn,
        epsilon=tm.epsilon,
        batch_size=batch_size,
        seed_strategy=seed_strategy,
        name="cw_l2",
    )


def make_deepfool(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    num_steps=50,
    overshoot=0.02,
    num_candidates=10,
    batch_size=500,
    seed_strategy="auto",
):
    """The DeepFool evaluator: minimal norms (ℓ2 or ℓ∞, the ball's) of the module doc, per seed.

    Args:
      apply_fn: the victim's ``apply_fn`` (eval mode).
      num_classes: K.
      threat: an `LpBall`: its norm is the attack's, its radius the ε of ``acc/robust``; or its
        fields `norm`, `epsilon`, `mask` (the mask is refused).
      num_steps, overshoot, num_candidates: see `attacks.deepfool.deepfool` (50, 0.02, 10).
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      An `Evaluator` returning `norm_metrics`, each with a leading seed axis.

    References:
      Moosavi-Dezfooli et al. 2016, CVPR.
    """
    tm = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what="deepfool")
    if tm.mask is not None:
        raise ValueError("deepfool moves every pixel; give its spec no mask.")
    _check_counts("deepfool", num_steps=num_steps, batch_size=batch_size)
    if not overshoot >= 0:
        raise ValueError(f"deepfool: overshoot={overshoot!r} must be >= 0 (the reference: 0.02).")
    if not 2 <= num_candidates or num_classes < 2:
        raise ValueError(
            f"deepfool: num_candidates={num_candidates} must be >= 2 (the label and one other "
            f"class) and the model needs 2 classes or more (it has {num_classes})."
        )

    def attack(logits_fn, x, y):
        kw = dict(norm=tm.norm, num_steps=num_steps, overshoot=overshoot)
        res = deepfool(logits_fn, x, y, num_candidates=num_candidates, **kw)
        return res.adv, res.norm

    return _minimal_evaluator(
        attack,
        apply_fn=apply_fn,
        epsilon=tm.epsilon,
        batch_size=batch_size,
        seed_strategy=seed_strategy,
        name=f"deepfool_{tm.norm}",
    )


__all__ = ["make_cw_l2", "make_deepfool", "norm_metrics"]
