"""Friendly adversarial training (Zhang et al. 2020): train on early-stopped PGD examples."""

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner


def make(
    *,
    tau=0,
    omega=0.001,
    norm="linf",
    epsilon=8 / 255,
    num_steps=10,
    step_size=2 / 255,
    random_start=True,
    mask=None,
):
    """Returns the FAT objective: cross-entropy at the *friendly* adversarial example.

    Early-stopped PGD (Algorithm 1 of the paper) checks every example before each step; once an
    example has been found misclassified ``tau + 1`` times it stops where it is, so the model
    learns from adversarial examples that are misclassified with minimal loss instead of the
    most adversarial ones. The per-example stop is a mask inside one `lax.scan`
    (`inner.pgd_with_stats`): no example moves after it stops, and the program has one static
    shape. The search runs on the model in eval mode from a uniform point of the ball, adding
    ``omega * N(0, I)`` to every step as the reference code does; the loss is taken in training
    mode.

    The reference raises tau with the epoch (0, then 1, then 2: "dynamic tau"); the objective
    signature has no epoch, so tau is fixed here. Run successive configs, or several tau, to
    follow that schedule.

    Args:
      tau: misclassified checks allowed before an example stops (0 = stop at the first).
      omega: standard deviation of the Gaussian noise added at each step.
      norm: ``"linf"`` or ``"l2"``: the defender's norm.
      epsilon: the defender's radius.
      num_steps: maximum PGD steps K.
      step_size: PGD step length.
      random_start: start uniformly in the ball (the reference's ``uniform_randominit``).
      mask: optional pixel mask of the ball.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds the friendly examples and the metric ``mean_steps`` the average number of steps the
      examples moved (the reference's backward-propagation count).

    References:
      Zhang et al. 2020, "Attacks Which Do Not Kill Training Make Adversarial Learning Stronger",
      ICML (github.com/zjfheart/Friendly-Adversarial-Training).
    """
    tm = inner.defender_threat(norm=norm, epsilon=epsilon, mask=mask)

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        init_key, noise_key = jax.random.split(key)
        delta, stats = inner.pgd_with_stats(
            inner.eval_logits_fn(apply_fn, variables),
            losses.cross_entropy,
            x,
            y,
            delta=tm.random_init(init_key, x) if random_start else jnp.zeros_like(x),
            threat=tm,
            num_steps=num_steps,
            step_size=step_size,
            tau=tau,
            omega=omega,
            key=noise_key,
        )
        x_adv = jax.lax.stop_gradient(x + delta)
        logits, model_state = apply_fn(variables, x_adv, train=True)
        loss = jnp.mean(losses.cross_entropy(logits, y))
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "mean_steps": jnp.mean(stats["num_moves"].astype(jnp.float32)),
        }
        metrics |= inner.perturbation_metrics(tm, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}

    return objective
