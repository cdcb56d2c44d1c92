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
    augment_fn=None,
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
      augment_fn: optional differentiable ``augment_fn(key, images) -> images`` applied to
        ``x + delta`` inside the loss, with a fresh key at every step (Fowl et al.'s
        differentiable augmentation, so the perturbation survives the victim's crops and flips).

    Returns:
      delta with the shape of `x`, inside the ball and with `x + delta` in [0, 1].

    References: Madry et al. 2018; Huang et al. 2021; Tao et al. 2021.
    """
    sign = 1.0 if maximize else -1.0
    grad_fn, key, step_keys = _gradient(loss_fn, x, y, key, augment_fn, num_steps)

    def step(delta, step_key):
        delta = delta + sign * step_size * threat.step_direction(grad_fn(delta, step_key))
        return threat.project(delta, x), None

    if init is not None:
        start = threat.project(init, x)
    elif random_start:
        start = threat.random_init(key, x)
    else:
        start = jnp.zeros_like(x)
    return jax.lax.scan(step, start, step_keys, length=num_steps)[0]


def _gradient(loss_fn, x, y, key, augment_fn, num_steps):
    """``(grad_fn(delta, step_key), key, step_keys)``: the gradient of
    ``sum(loss_fn(augment_fn(step_key, x + delta), y))``, the key left for the start and one
    augmentation key per step. Without augmentation the key is the caller's own and there are
    no step keys, so such attacks draw exactly as they always did."""
    if augment_fn is None:
        return jax.grad(lambda d, _: jnp.sum(loss_fn(x + d, y))), key, None
    key, aug_key = jax.random.split(key)
    grad_fn = jax.grad(lambda d, k: jnp.sum(loss_fn(augment_fn(k, x + d), y)))
    return grad_fn, key, jax.random.split(aug_key, num_steps)


def mifgsm(
    loss_fn,
    x,
    y,
    *,
    key,
    threat,
    num_steps,
    step_size,
    decay=1.0,
    maximize=True,
    augment_fn=None,
):
    """Momentum iterative FGSM (Dong et al. 2018): the gradient, ℓ1-normalised per example, is
    accumulated with momentum `decay`, and the step follows the threat model's direction of it.

    Same arguments as `pgd` (`key` only draws `augment_fn`'s randomness: MI-FGSM starts from
    zero; it is kept so both attacks share one signature).
    """
    sign = 1.0 if maximize else -1.0
    grad_fn, _, step_keys = _gradient(loss_fn, x, y, key, augment_fn, num_steps)
    axes = tuple(range(1, x.ndim))

    def step(carry, step_key):
        delta, momentum = carry
        g = grad_fn(delta, step_key)
        g = g / jnp.maximum(jnp.sum(jnp.abs(g), axis=axes, keepdims=True), 1e-12)
        momentum = decay * momentum + g
        delta = delta + sign * step_size * threat.step_direction(momentum)
        return (threat.project(delta, x), momentum), None

    init = (jnp.zeros_like(x), jnp.zeros_like(x))
    return jax.lax.scan(step, init, step_keys, length=num_steps)[0][0]
