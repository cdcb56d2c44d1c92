"""Madry et al.'s adversarial training: cross-entropy at the PGD worst case in the ball."""

import jax
import jax.numpy as jnp

from jaxpoison import attacks, losses
from jaxpoison.objectives import inner


def make(
    *,
    threat=None,
    norm=None,
    epsilon=None,
    num_steps=10,
    step_size=2 / 255,
    random_start=True,
    attack_loss="cross_entropy",
    mask=None,
    epsilon_ramp=0.0,
):
    """Returns the PGD-AT objective ``mean CE(f(x + delta*), y)``, delta* = PGD(max CE) in the ball.

    The inner maximisation is `attacks.pgd` on the model in eval mode (BatchNorm running
    statistics; see `objectives.inner`), started uniformly in the ball; the outer cross-entropy is
    taken in training mode. On delusively poisoned data this minimises an upper bound of the
    natural risk on the clean distribution when ε covers the poison's budget (Tao et al. 2021,
    Theorem 1).

    Args:
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      num_steps: PGD steps K.
      step_size: PGD step length.
      random_start: start from a uniform point of the ball (Madry et al.) or from zero.
      attack_loss: the loss PGD ascends, a name of `losses.LOSSES`.
      mask: optional pixel mask of the ball (e.g. the MNIST half of an MNIST-CIFAR image),
        without `threat`.
      epsilon_ramp: fraction of training over which the radius (and the step size with it) rises
        linearly from 0 to the full radius, read from ``batch['progress']`` inside the compiled step
        (a curriculum: a large ball from the first step can collapse the network to a constant
        output). 0 (the default) uses the full radius from the start.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds ``x + delta*``.

    References:
      Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR.
      Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with Adversarial
      Training", NeurIPS.
    """
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="pgd_at")
    if not 0 <= epsilon_ramp <= 1:
        raise ValueError(f"epsilon_ramp={epsilon_ramp} must be a fraction of training in [0, 1].")

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        ball, step = tm, step_size
        if epsilon_ramp:
            progress = inner.progress_of(batch, name="pgd_at")
            scale = jnp.minimum(jnp.float32(1), progress / jnp.float32(epsilon_ramp))
            ball, step = tm.replace(epsilon=tm.epsilon * scale), step_size * scale
        loss_fn = attacks.model_loss(apply_fn, jax.lax.stop_gradient(variables), loss=attack_loss)
        delta = attacks.pgd(
            loss_fn,
            x,
            y,
            key=key,
            threat=ball,
            num_steps=num_steps,
            step_size=step,
            random_start=random_start,
        )
        x_adv = jax.lax.stop_gradient(x + delta)
        logits, model_state = apply_fn(variables, x_adv, train=True)
        loss = jnp.mean(losses.cross_entropy(logits, y))
        metrics = {"loss": loss, "accuracy": jnp.mean(losses.accuracy(logits, y))}
        metrics |= inner.perturbation_metrics(ball, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}

    return objective
