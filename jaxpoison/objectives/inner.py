"""Pieces shared by the adversarial-training objectives: the defender's threat model, the frozen
eval-mode model the inner attack sees, and PGD with per-example bookkeeping.

BatchNorm during the inner attack: every objective here runs its inner attack with the model in
**eval mode** (running statistics, no update), as the reference PyTorch code does with
``model.eval()`` before crafting and ``model.train()`` after. The attack therefore never changes
the running statistics and one example's perturbation does not depend on the rest of the batch.
The outer loss then runs the model in training mode (batch statistics), and the updated running
statistics are returned as ``aux['model_state']``. When an objective needs two training-mode
passes (clean and adversarial, as in TRADES), they are two separate passes whose running-statistic
updates are chained, as two successive ``model(x)`` calls in PyTorch would do.

The inner attack never carries gradient into the parameters: it sees ``stop_gradient(variables)``
and its output is ``stop_gradient``-ed, as the reference code detaches ``x_adv``.

Schedules over training (FAT's dynamic τ, GAIRAT's burn-in and λ schedule) read the fraction of
training done from ``batch['progress']``, which the trainer adds inside its compiled step
(`progress_of`); `piecewise_constant` turns a list of ``(fraction, value)`` pairs into a traced
value, so the whole run stays one compiled program.
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison import threat as threat_lib

log = logging.getLogger(__name__)


def defender_threat(threat=None, *, norm=None, epsilon=None, mask=None, what):
    """The defender's own `LpBall` (it may differ from the attacker's): `threat` as given, or
    one built from `norm`, `epsilon`, `mask`; no default radius (see `threat.resolve`).

    Raises:
      ValueError: neither `threat` nor `epsilon` is given (the message names objective `what`
        and the fix), or `threat` comes with any of the fields.
    """
    return threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what=what)


def eval_logits_fn(apply_fn, variables):
    """``x -> logits`` of the model in eval mode, with the variables frozen (no gradient)."""
    frozen = jax.lax.stop_gradient(variables)
    return lambda x: apply_fn(frozen, x, train=False)[0]


def gaussian_start(key, x, threat, scale):
    """A small Gaussian start ``scale * N(0, I)`` projected into the ball (TRADES, MART, THRM).

    The KL objective of TRADES has zero gradient at delta = 0, so the search must start off it.
    """
    return threat.project(scale * jax.random.normal(key, x.shape, x.dtype), x)


def train_forward(apply_fn, variables, x):
    """Training-mode logits and the variables with the updated model state (for a next pass)."""
    logits, state = apply_fn(variables, x, train=True)
    return logits, {**variables, **state}, state


def model_state_of(variables):
    """The non-parameter collections of `variables` (``{}`` for models without BatchNorm)."""
    return {k: v for k, v in variables.items() if k != "params"}


def progress_of(batch, *, name):
    """The fraction of training done, ``batch['progress']`` (float32 in [0, 1)), or 0.

    `training.Trainer` adds ``progress = step / (epochs * steps_per_epoch)`` to every batch. A
    caller that trains with an objective directly (a hand-written loop, a wrapper that rebuilds
    the batch) may not: the schedule of objective `name` then stays at its start, and a warning
    says so when the objective is traced.
    """
    if "progress" not in batch:
        log.warning(
            "%s: the batch has no 'progress'; its schedule stays at the start of training "
            "(progress 0). Train with `training.Trainer`, or add batch['progress'].",
            name,
        )
        return jnp.zeros((), jnp.float32)
    return jnp.asarray(batch["progress"], jnp.float32)


def check_schedule(pairs, *, name):
    """Validates ``(fraction, value)`` pairs: fractions in [0, 1]; returns them sorted, as floats.

    Args:
      pairs: a sequence of ``(fraction of training, value)``; the value holds from its fraction
        on, until the next pair's fraction.
      name: what is scheduled, for the error message.
    """
    try:
        out = sorted((float(f), float(v)) for f, v in pairs)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}: a schedule is a sequence of (fraction, value) pairs, got {pairs!r}."
        ) from None
    if not out or not all(0.0 <= f <= 1.0 for f, _ in out):
        raise ValueError(f"{name}: schedule fractions must lie in [0, 1], got {pairs!r}.")
    if any(math.isnan(v) for _, v in out):
        raise ValueError(f"{name}: schedule values must not be NaN, got {pairs!r}.")
    return tuple(out)


def piecewise_constant(progress, pairs, initial):
    """`initial` before the first fraction of `pairs`, then each pair's value from its fraction on.

    Args:
      progress: traced float32 scalar, the fraction of training done.
      pairs: sorted ``(fraction, value)`` pairs (see `check_schedule`).
      initial: the value before the first fraction.

    Returns:
      A float32 scalar: ``value_i`` for the last ``fraction_i <= progress``, else `initial`.
    """
    value = jnp.asarray(initial, jnp.float32)
    for fraction, v in pairs:
        value = jnp.where(progress >= jnp.float32(fraction), jnp.float32(v), value)
    return value


def _expand(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


def pgd_with_stats(
    logits_fn,
    loss_fn,
    x,
    labels,
    *,
    delta,
    threat,
    num_steps,
    step_size,
    target=None,
    maximize=True,
    tau=None,
    omega=0.0,
    key=None,
):
    """Projected steepest ascent (or descent) from `delta`, with per-example bookkeeping.

    Each iteration evaluates the model once at ``x + delta`` (one forward and one backward pass),
    records whether each example is classified as its label, and then moves the examples that are
    still active by ``step_size * threat.step_direction(grad)`` (plus ``omega * N(0, I)`` noise,
    as friendly adversarial training does), projected into the ball and the [0, 1] box.

    Early stopping (``tau`` not None, friendly adversarial training): an example stops the first
    time it is found misclassified after ``tau`` earlier misclassified checks; a stopped example
    keeps the point at which it was found misclassified. The stop is a per-example mask inside one
    `lax.scan`, so every example costs the same compute but moves no further once stopped.

    Args:
      logits_fn: ``x -> logits`` (eval mode, frozen variables).
      loss_fn: ``(logits, target) -> [B]`` per-example loss to ascend (``maximize=True``) or
        descend.
      x: inputs [B, ...].
      labels: int labels [B], used to decide which examples are misclassified.
      delta: initial perturbation, inside the ball.
      threat: an `LpBall`.
      num_steps: maximum number of steps K.
      step_size: step length in the threat model's norm.
      target: second argument of `loss_fn` (defaults to `labels`; TRADES passes clean logits).
      maximize: ascend (True) or descend (False, hypocritical examples).
      tau: None for plain PGD, or the number of misclassified checks an example may pass
        before it stops (0 = stop as soon as it is misclassified): a Python int or a traced int
        scalar (a τ schedule; the program does not depend on its value).
      omega: standard deviation of the Gaussian noise added to every step (FAT's escape noise).
      key: PRNG key, needed only when ``omega > 0``.

    Returns:
      ``(delta, stats)`` with `delta` inside the ball and ``stats`` holding per-example int32
      arrays ``kappa`` (checks at which the example was classified correctly, in [0, K]: the
      geometry value of GAIRAT) and ``num_moves`` (steps the example actually moved).

    References:
      Madry et al. 2018 (PGD); Zhang et al. 2020, "Attacks which do not kill training make
      adversarial learning stronger" (early-stopped PGD, Algorithm 1); Zhang et al. 2021,
      "Geometry-aware instance-reweighted adversarial training" (kappa).
    """
    target = labels if target is None else target
    sign = 1.0 if maximize else -1.0

    def total_loss(d):
        logits = logits_fn(x + d)
        return jnp.sum(loss_fn(logits, target)), logits

    grad_fn = jax.grad(total_loss, has_aux=True)
    b = labels.shape[0]
    if omega > 0 and key is None:
        raise ValueError("pgd_with_stats: omega > 0 needs a key.")
    keys = jax.random.split(key, num_steps) if omega > 0 else jnp.zeros((num_steps,))

    def step(carry, step_key):
        d, active, control, kappa, moves = carry
        g, logits = grad_fn(d)
        correct = jnp.argmax(logits, axis=-1) == labels
        kappa = kappa + correct.astype(jnp.int32)
        if tau is not None:
            wrong = active & ~correct
            stop = wrong & (control == 0)
            control = jnp.where(wrong & (control > 0), control - 1, control)
            active = active & ~stop
        moved = d + sign * step_size * threat.step_direction(g)
        if omega > 0:
            moved = moved + omega * jax.random.normal(step_key, d.shape, d.dtype)
        moved = threat.project(moved, x)
        d = jnp.where(_expand(active, d), moved, d)
        moves = moves + active.astype(jnp.int32)
        return (d, active, control, kappa, moves), None

    init = (
        delta,
        jnp.ones((b,), bool),
        jnp.full((b,), 0 if tau is None else tau, jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b,), jnp.int32),
    )
    (delta, _, _, kappa, moves), _ = jax.lax.scan(step, init, keys)
    return delta, {"kappa": kappa, "num_moves": moves}


def clean_and_perturbed_forward(apply_fn, variables, x, delta):
    """Training-mode passes on ``x`` then on ``x + delta`` (delta held fixed), the BatchNorm
    updates chained, as TRADES, THRM and MART make them.

    Returns:
      ``(logits, logits_perturbed, model_state, x_perturbed)``.
    """
    x_perturbed = jax.lax.stop_gradient(x + delta)
    logits, variables, _ = train_forward(apply_fn, variables, x)
    logits_perturbed, _, model_state = train_forward(apply_fn, variables, x_perturbed)
    return logits, logits_perturbed, model_state, x_perturbed


def kl_regularized_loss(logits, logits_perturbed, labels, beta, *, names):
    """``CE(f(x), y) + beta * KL(p(x) || p(x'))`` (TRADES, THRM) and its training-log metrics.

    Args:
      names: ``(accuracy at x', KL term)`` metric names, e.g. ``("adv_accuracy", "robust_kl")``.

    Returns:
      ``(loss, metrics)``; the gradient flows through both distributions of the KL.
    """
    natural = jnp.mean(losses.cross_entropy(logits, labels))
    kl = jnp.mean(losses.kl_divergence(logits, logits_perturbed))
    loss = natural + beta * kl
    accuracy_name, kl_name = names
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(losses.accuracy(logits, labels)),
        accuracy_name: jnp.mean(losses.accuracy(logits_perturbed, labels)),
        "natural_loss": natural,
        kl_name: kl,
    }
    return loss, metrics


def perturbation_metrics(threat, delta):
    """Mean norm of the perturbation in the defender's norm, for the training log."""
    return {"perturbation_norm": jnp.mean(threat.norm_of(delta))}


__all__ = [
    "check_schedule",
    "clean_and_perturbed_forward",
    "defender_threat",
    "eval_logits_fn",
    "gaussian_start",
    "kl_regularized_loss",
    "model_state_of",
    "perturbation_metrics",
    "pgd_with_stats",
    "piecewise_constant",
    "progress_of",
    "train_forward",
]
