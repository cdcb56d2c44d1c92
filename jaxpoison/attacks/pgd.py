"""Projected gradient methods over a threat model, fully inside `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison import losses


def model_loss(apply_fn, variables, *, loss="cross_entropy", target=None):
    """``loss_fn(x, y) -> [B]`` of a model in eval mode, toward `y` or toward `target(y)`.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)``
        (see `models.make_apply_fn`).
      variables: the model's variables.
      loss: a name of `losses.LOSSES`.
      target: optional callable mapping labels to target labels (for targeted attacks).
    """
    loss_of = losses.LOSSES[loss]

    def loss_fn(x, y):
        logits = apply_fn(variables, x, train=False)[0]
        return loss_of(logits, y if target is None else target(y))

    return loss_fn


def pgd(
    loss_fn,
    x,
    y,
    *,
    key,
    threat,
    num_steps,
    step_size,
    maximize=True,
    random_start=True,
    init=None,
):
    """Projected steepest ascent (maximize=True) or descent on ``sum(loss_fn(x + delta, y))``.

    ``maximize=False`` gives hypocritical / error-minimizing noise (or a targeted attack when
    `loss_fn` measures the loss toward the target); ``maximize=True`` gives adversarial poisons
    and the inner loop of PGD-AT. Each example moves independently.

    Args:
      loss_fn: ``(x, y) -> [B]`` per-example loss.
      x: float images [B, H, W, C] in [0, 1].
      y: labels [B] (or anything `loss_fn` takes as its second argument).
      key: PRNG key for the random start.
      threat: an `LpBall`.
      num_steps: number of steps.
      step_size: step length in the threat model's norm.
      maximize: ascend (True) or descend (False).
      random_start: start from a random point of the ball instead of zero.
      init: optional starting perturbation (projected first); overrides `random_start`. Used
        to continue an attack, e.g. error-minimizing noise refined from its current value.

    Returns:
      delta with the shape of `x`, inside the ball and with `x + delta` in [0, 1].

    References: Madry et al. 2018; Huang et al. 2021; Tao et al. 2021.
    """
    sign = 1.0 if maximize else -1.0
    grad_fn = jax.grad(lambda d: jnp.sum(loss_fn(x + d, y)))

    def step(delta, _):
        delta = delta + sign * step_size * threat.step_direction(grad_fn(delta))
        return threat.project(delta, x), None

    if init is not None:
        start = threat.project(init, x)
    elif random_start:
        start = threat.random_init(key, x)
    else:
        start = jnp.zeros_like(x)
    return jax.lax.scan(step, start, length=num_steps)[0]


def mifgsm(loss_fn, x, y, *, key, threat, num_steps, step_size, decay=1.0, maximize=True):
    """Momentum iterative FGSM (Dong et al. 2018): the gradient, ℓ1-normalised per example, is
    accumulated with momentum `decay`, and the step follows the threat model's direction of it.

    Same arguments as `pgd` (`key` is unused: MI-FGSM starts from zero; it is kept so both
    attacks share one signature).
    """
    del key
    sign = 1.0 if maximize else -1.0
    grad_fn = jax.grad(lambda d: jnp.sum(loss_fn(x + d, y)))
    axes = tuple(range(1, x.ndim))

    def step(carry, _):
        delta, momentum = carry
        g = grad_fn(delta)
        g = g / jnp.maximum(jnp.sum(jnp.abs(g), axis=axes, keepdims=True), 1e-12)
        momentum = decay * momentum + g
        delta = delta + sign * step_size * threat.step_direction(momentum)
        return (threat.project(delta, x), momentum), None

    init = (jnp.zeros_like(x), jnp.zeros_like(x))
    return jax.lax.scan(step, init, length=num_steps)[0][0]
