r"""Certified ℓ∞ radii of 1-Lipschitz classifiers, and what a false friend provably cannot hide.

If every logit :math:`g_k` of a classifier is 1-Lipschitz w.r.t. the ℓ∞ norm (an ℓ∞-dist net,
`jaxpoison.models.linf_dist`, in eval mode with ``p = inf``), then for
:math:`\|\delta\|_\infty \le \varepsilon`

.. math::
    g_c(x + \delta) - g_j(x + \delta) \ge g_c(x) - g_j(x) - 2\varepsilon \quad \text{for all } j,

so the ranking of two classes whose logits differ by more than 2ε cannot flip inside the ε-ball.
With the *signed margin* of the true class :math:`y`,
:math:`m(x) = g_y(x) - \max_{j \ne y} g_j(x)`, the *signed radius* is :math:`s(x) = m(x) / 2`:

- :math:`s(x) > \varepsilon`: x is classified correctly and no perturbation of ℓ∞ norm ≤ ε makes
  it wrong. The fraction of such examples is the **certified accuracy** (Zhang et al. 2021), a
  lower bound on robust accuracy (``acc/A`` of `risk`). `certified_radius` is
  :math:`\max(s, 0)`.
- :math:`-s(x) > \varepsilon`: x is *misclassified* and some wrong class beats the true one by more
  than 2ε, so :math:`g_y` stays strictly below it everywhere in the ball: no perturbation of
  norm ≤ ε, however chosen, makes the true class win. A false friend (Tao et al. 2022;
  `risk.hypocritical_examples`) cannot hide this mistake. The fraction of such examples, the
  **certified hypocritical error**, is therefore a lower bound on the error rate that
  verification data perturbed by *any* false friend still shows: :math:`1 - \text{acc/F} \ge`
  ``err/certified_hypocritical``. Equivalently ``acc/F`` and the hypocritical risk on the
  misclassified points, ``R_hyp/D-``, have certified upper bounds. Attacks (`risk`) give the
  other side: the ``acc/F`` a false friend achieves is a lower bound.

The *radius of the prediction* c, :math:`r(x) = (g_{(1)}(x) - g_{(2)}(x)) / 2` (top logit minus
runner-up, the true class among the competitors when c is wrong), certifies that c itself
cannot change (`prediction_radius`; a bound on the stability risk ``R_sta``). On a misclassified
x, :math:`r(x) \le -s(x)`: "c beats every other class, the true one included, by more than 2ε"
implies the condition above, which needs only *some* wrong class to stay ahead of y (that class
may change inside the ball, the error may not). The hypocritical bound uses :math:`-s`, the
larger of the two, and remains sound.

Every certificate is strict: at :math:`\varepsilon = |s(x)|` a perturbation may create a tie,
which `argmax` could break either way, so certified means :math:`|s(x)| > \varepsilon`.

All functions take eval-mode logits; the bounds hold only for networks that really are
1-Lipschitz per logit in ℓ∞ (for `LinfDistNet`: ``p = inf`` and running means, ``train=False``).

References:
  Zhang, Cai, Lu, He & Wang 2021, "Towards Certifying ℓ∞ Robustness using Neural Networks with
  ℓ∞-dist Neurons", ICML (a margin > 2ε certifies the ε-ball; github.com/zbh2047/L_inf-dist-net).
  Tao, Feng, Yi, Chen 2022, "With False Friends Like These, Who Can Notice Mistakes?", AAAI.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison import threat as threat_lib
from jaxpoison.evaluation.risk import _dataset_evaluator, _safe_div


def _check_classes(logits):
    if logits.shape[-1] < 2:
        raise ValueError(f"A certified radius needs at least 2 classes, got {logits.shape[-1]}.")


@jax.jit
def prediction_radius(logits):
    """Certified ℓ∞ radius of the predicted class: (top logit − runner-up) / 2, per example.

    Args:
      logits: [B, K], K >= 2, of a classifier whose logits are 1-Lipschitz in ℓ∞.

    Returns:
      [B] radii >= 0 (0 on a tie for the top).
    """
    _check_classes(logits)
    top2 = jax.lax.top_k(logits, 2)[0]
    return (top2[:, 0] - top2[:, 1]) / 2


@jax.jit
def signed_radius(logits, labels):
    """Half the signed margin of the true class, (g_y − max_{j≠y} g_j) / 2, per example.

    Positive: correct, and certified correct for every ε below it. Negative: misclassified, and
    certified misclassified (the true class cannot win) for every ε below its absolute value.

    Args:
      logits: [B, K], K >= 2, eval-mode logits 1-Lipschitz in ℓ∞; labels: [B] true labels.

    Returns:
      [B] signed radii.
    """
    _check_classes(logits)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return (true - jnp.max(others, axis=1)) / 2


@jax.jit
def certified_radius(logits, labels):
    """Certified ℓ∞ radius of the *correct* prediction: max(0, g_y − max_{j≠y} g_j) / 2.

    Equals `prediction_radius` where the prediction is right, and 0 where it is wrong (or tied).

    Args:
      logits: [B, K] eval-mode logits; labels: [B] true labels.

    Returns:
      [B] radii >= 0.
    """
    return jax.nn.relu(signed_radius(logits, labels))


@jax.jit
def certified_outcomes(logits, labels, epsilon):
    """Per-example certificates at radius `epsilon` (float [B] indicators).

    Returns:
      dict: ``correct`` (argmax = y); ``certified_correct`` (signed radius > ε: right everywhere
      in the ball); ``certified_wrong`` (−signed radius > ε: wrong everywhere in the ball);
      ``certified_stable`` (prediction radius > ε: the same prediction everywhere in the ball).
    """
    s = signed_radius(logits, labels)
    f = lambda b: b.astype(jnp.float32)
    return {
        "correct": f(jnp.argmax(logits, -1) == labels),
        "certified_correct": f(s > epsilon),
        "certified_wrong": f(-s > epsilon),
        "certified_stable": f(prediction_radius(logits) > epsilon),
    }


@jax.jit
def certified_accuracy(logits, labels, epsilon):
    """Fraction of examples classified correctly with a certified radius > `epsilon`.

    A lower bound on the accuracy under any ℓ∞ attack of radius `epsilon`.
    """
    return jnp.mean(certified_outcomes(logits, labels, epsilon)["certified_correct"])


@jax.jit
def certified_hypocritical_error(logits, labels, epsilon):
    """Fraction of examples certified to stay misclassified in their ℓ∞ ball of radius `epsilon`.

    A lower bound on the error rate after *any* hypocritical perturbation of radius `epsilon`
    (a false friend that moves each input inside its ball to get it classified correctly): for
    these examples a wrong class beats the true one by more than 2ε, and two 1-Lipschitz logits
    close a gap by at most 2ε, so the true class cannot win anywhere in the ball. Counts every
    misclassified example whose prediction radius exceeds `epsilon`, and possibly more (see the
    module doc).

    Args:
      logits: [B, K] eval-mode logits of a network 1-Lipschitz per logit in ℓ∞.
      labels: [B] true labels.
      epsilon: the false friend's ℓ∞ radius (pixel units, e.g. 8/255).

    Returns:
      A scalar in [0, 1]; 1 − it bounds the accuracy a false friend can show (``acc/F``) above.
    """
    return jnp.mean(certified_outcomes(logits, labels, epsilon)["certified_wrong"])


def certified_bounds(sums):
    """Accuracies and bounds from per-dataset sums of `certified_outcomes` (plus ``n``).

    Returns:
      dict of scalars: ``acc/D``; ``acc/certified`` (≤ ``acc/A``); ``err/certified_hypocritical``
      (≤ 1 − ``acc/F``); ``acc/F_upper`` = 1 − that; ``R_hyp/D-_upper``, the bound on the
      fraction of misclassified points a false friend can fix (NaN when none is misclassified);
      ``R_sta_upper``, the fraction whose prediction is not certified stable (≥ ``R_sta``).
    """
    n = sums["n"]
    n_minus = n - sums["correct"]
    err_hyp = sums["certified_wrong"] / n
    return {
        "acc/D": sums["correct"] / n,
        "acc/certified": sums["certified_correct"] / n,
        "err/certified_hypocritical": err_hyp,
        "acc/F_upper": 1.0 - err_hyp,
        "R_hyp/D-_upper": 1.0 - _safe_div(sums["certified_wrong"], n_minus),
        "R_sta_upper": 1.0 - sums["certified_stable"] / n,
    }


def make_certified(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    batch_size=500,
    seed_strategy="auto",
):
    """The certified evaluator: `certified_bounds` at the ℓ∞ radius of the ball, per seed.

    No attack runs: one eval-mode forward pass per batch. Valid only for models whose logits are
    1-Lipschitz in ℓ∞ (``linf_dist`` with ``p = inf``); for other models the numbers are not
    bounds. A ball with a mask is a subset of the full ℓ∞ ball, so the certificates (computed for
    the full ball) still hold for it, possibly loosely.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)``.
      num_classes: K (unused; every evaluator factory takes it).
      threat: an ℓ∞ `LpBall` (the one the poisons take); or pass its fields `norm`, `epsilon`,
        `mask` instead (a config does: `specs.evaluator` fills them from ``config.threat``).
        One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None); the only norm certified here.
      epsilon: the ℓ∞ radius in pixel units, without `threat`.
      mask: optional pixel mask of the ball, without `threat`.
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      A `risk.Evaluator`: ``(states, x, y, *, key) -> dict of [S] arrays``.

    Raises:
      ValueError: no radius, both `threat` and its fields, or a ball that is not ℓ∞.
    """
    del num_classes
    ball = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what="certified")
    if ball.norm != "linf":
        raise ValueError(
            f"certified: certificates here are for the linf ball, got norm={ball.norm!r}; use "
            "the 'risk' evaluator (attacks) for other norms, or give certified its own "
            "norm='linf' and epsilon."
        )
    epsilon = ball.epsilon

    def per_batch(variables, x, y, mask, key):
        del key
        o = certified_outcomes(apply_fn(variables, x, train=False)[0], y, epsilon)
        sums = {k: jnp.sum(v * mask) for k, v in o.items()}
        return {"n": jnp.sum(mask), **sums}

    return _dataset_evaluator(
        per_batch,
        certified_bounds,
        batch_size=batch_size,
        seed_strategy=seed_strategy,
        name="certified",
    )


__all__ = [
    "certified_accuracy",
    "certified_bounds",
    "certified_hypocritical_error",
    "certified_outcomes",
    "certified_radius",
    "make_certified",
    "prediction_radius",
    "signed_radius",
]
