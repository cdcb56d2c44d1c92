"""Training on randomly perturbed data: uniform noise in the defender's ball, a fresh draw per step.

The baseline that separates the effect of *any* perturbation from that of a worst-case one
(Tao et al. 2021 compare it with adversarial training against delusive poisons).
"""

import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner


def make(*, threat=None, norm=None, epsilon=None, mask=None):
    """Returns the random-noise objective: cross-entropy at ``x + delta``, delta random in the ball.

    For ℓ∞ the noise is uniform per pixel in [-ε, ε] (uniform in the ball); for ℓ2 it has a
    uniform random direction and a radius uniform in [0, ε] (`LpBall.random_init`). The model
    runs in training mode on the noisy batch.

    Args:
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      mask: optional pixel mask of the ball (see `threat.LpBall`), without `threat`.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds the noisy inputs.

    References:
      Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with Adversarial
      Training", NeurIPS.
    """
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="rand_noise")

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        delta = tm.random_init(key, x)
        logits, model_state = apply_fn(variables, x + delta, train=True)
        loss = jnp.mean(losses.cross_entropy(logits, y))
        metrics = {"loss": loss, "accuracy": jnp.mean(losses.accuracy(logits, y))}
        metrics |= inner.perturbation_metrics(tm, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x + delta}

    return objective
