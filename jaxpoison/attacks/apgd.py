"""Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size that adapts itself.

APGD starts at ``2 ε`` and halves the step at checkpoints where the loss has stopped rising (too
few successful steps since the last checkpoint, or no progress and no halving last time), and
restarts from the best point then. The checkpoints come at 22%, then every 3% fewer iterations
down to a 6% window, as in the reference code. Losses: cross-entropy (``"ce"``), the
difference-of-logits ratio (``"dlr"``) and its targeted form (``"dlr_targeted"``), which
`apgd_targeted` runs toward each of the top-k classes other than the label in turn.

A whole batch is attacked at once: iterations under `lax.scan`, restarts and target classes under
`lax.scan` too, each skipped (`lax.cond`) when no point of the batch is left to attack. Every
point keeps its own step size, checkpoints and best point, as in the reference.

Randomized models (AutoAttack's ``rand`` version): with ``eot_iter=n`` the logits function takes
a key, ``logits_fn(x, key)``, and every gradient and loss is the mean over n draws of the
model's randomness (Expectation over Transformation), the keys folded per iteration and draw.

References:
  Croce, Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML (Algorithm 1, Sec. 3-4); reference code
  github.com/fra31/auto-attack, ``autoattack/autopgd_base.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison import losses

APGD_LOSSES = ("ce", "dlr", "dlr_targeted")


class APGDResult(NamedTuple):
    """What an APGD run found, per example.

    Attributes:
      delta: the first misclassified point found where `fooled`, else the highest-loss point;
        inside the ball and with ``x + delta`` in [0, 1].
      fooled: bool [B], some iterate was misclassified (argmax != y).
      loss: [B] the highest loss reached (of the last run that attacked the point).
    """

    delta: jax.Array
    fooled: jax.Array
    loss: jax.Array


def _take(logits, labels):
    return jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]


def dlr(logits, y):
    """Difference-of-logits ratio ``-(z_y - max_{i != y} z_i) / (z_π1 - z_π3)`` (π sorts the
    logits in decreasing order); positive once x is misclassified. Needs 3 classes or more."""
    ordered = jnp.sort(logits, axis=-1)
    top_is_y = jnp.argmax(logits, -1) == y
    other = jnp.where(top_is_y, ordered[:, -2], ordered[:, -1])
    return -(_take(logits, y) - other) / (ordered[:, -1] - ordered[:, -3] + 1e-12)


def dlr_targeted(logits, y, target):
    """Targeted difference-of-logits ratio
    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)``; needs 4 classes or more."""
    ordered = jnp.sort(logits, axis=-1)
    scale = ordered[:, -1] - 0.5 * (ordered[:, -3] + ordered[:, -4]) + 1e-12
    return -(_take(logits, y) - _take(logits, target)) / scale


def _loss_of(name):
    if name == "ce":
        return lambda logits, y, target: losses.cross_entropy(logits, y)
    if name == "dlr":
        return lambda logits, y, target: dlr(logits, y)
    return dlr_targeted


def checkpoints(num_steps):
    """The reference's checkpoint schedule: ``(is_check [num_steps] bool, window [num_steps]
    int)``; at iteration i with ``is_check[i]`` the last ``window[i]`` steps are judged."""
    window, window_min, decrease = (
        max(int(0.22 * num_steps), 1),
        max(int(0.06 * num_steps), 1),
        max(int(0.03 * num_steps), 1),
    )
    is_check = np.zeros(num_steps, bool)
    windows = np.zeros(num_steps, np.int32)
    since = 0
    for i in range(num_steps):
        since += 1
        if since == window:
            is_check[i], windows[i], since = True, window, 0
            window = max(window - decrease, window_min)
    return jnp.asarray(is_check), jnp.asarray(windows)


def _check_arguments(threat, num_steps, loss, rho, num_classes=None, eot_iter=None):
    if loss not in APGD_LOSSES:
        raise ValueError(f"apgd: unknown loss {loss!r}; use one of {APGD_LOSSES}.")
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"apgd: norm {threat.norm!r} is not supported; use 'linf' or 'l2'.")
    if int(num_steps) < 1:
        raise ValueError(f"apgd: num_steps={num_steps} must be >= 1.")
    if not 0.0 < rho < 1.0:
        raise ValueError(f"apgd: rho={rho} must lie in (0, 1) (the reference's is 0.75).")
    if eot_iter is not None and int(eot_iter) < 1:
        raise ValueError(
            f"apgd: eot_iter={eot_iter} must be >= 1 (or None for a deterministic model)."
        )
    need = {"ce": 2, "dlr": 3, "dlr_targeted": 4}[loss]
    if num_classes is not None and num_classes < need:
        raise ValueError(
            f"apgd: loss {loss!r} needs at least {need} classes, the model has {num_classes}; "
            "use loss='ce' (attack 'apgd-ce')."
        )


def _start(key, x, threat):
    """The reference's random start: ε times a random direction normalised in the ball's norm
    (on the ℓ∞ cube's surface or the ℓ2 sphere), then into the ball and the box."""
    axes = tuple(range(1, x.ndim))
    if threat.norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        size = jnp.max(jnp.abs(t), axis=axes, keepdims=True)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        size = jnp.sqrt(jnp.sum(t * t, axis=axes, keepdims=True))
    return threat.project(threat.epsilon * t / (size + 1e-12), x)


def apgd_run(
    logits_fn,
    x,
    y,
    *,
    key,
    threat,
    num_steps=100,
    loss="ce",
    target=None,
    rho=0.75,
    eot_iter=None,
):
    """One APGD run (the reference's ``attack_single_run``) on every point of the batch.

    Args:
      logits_fn: ``x -> logits [B, K]`` (the model in eval mode); ``(x, key) -> logits`` for a
        randomized model when `eot_iter` is set.
      x: images [B, H, W, C] in [0, 1]; y: labels [B].
      key: PRNG key of the random start.
      threat: an `LpBall` (ℓ∞ or ℓ2).
      num_steps: iterations (the reference's 100).
      loss: ``"ce"``, ``"dlr"`` or ``"dlr_targeted"`` (then `target` [B] is needed).
      rho: the fraction of successful steps below which a checkpoint halves the step (0.75).
      eot_iter: None for a deterministic model; else the draws of a randomized model averaged
        per gradient and loss (the reference's ``eot_iter``, 20 in AutoAttack's rand version).
        A point counts as misclassified when the first draw misclassifies it.

    Returns:
      An `APGDResult`.
    """
    _check_arguments(threat, num_steps, loss, rho, eot_iter=eot_iter)
    if loss == "dlr_targeted" and target is None:
        raise ValueError("apgd: loss 'dlr_targeted' needs target= (labels [B]).")
    loss_of = _loss_of(loss)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)

    def one_draw(delta, *draw_key):
        def total(d):
            logits = logits_fn(x + d, *draw_key)
            per_example = loss_of(logits, y, target)
            return jnp.sum(per_example), (per_example, logits)

        (_, (per_example, logits)), g = jax.value_and_grad(total, has_aux=True)(delta)
        return per_example, jnp.argmax(logits, -1) != y, g

    if eot_iter is not None:
        key, noise_key = jax.random.split(key)

    def value_and_grad(delta, i):
        if eot_iter is None:
            return one_draw(delta)
        keys = jax.random.split(jax.random.fold_in(noise_key, i), eot_iter)
        per_example, wrong, g = jax.vmap(lambda k: one_draw(delta, k))(keys)
        return jnp.mean(per_example, 0), wrong[0], jnp.mean(g, 0)

    def where(cond, a, b):
        return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)

    delta = _start(key, x, threat)
    loss0, wrong0, grad = value_and_grad(delta, num_steps)
    init = dict(
        delta=delta,
        delta_old=delta,
        grad=grad,
        step=jnp.full(shape, 2.0 * threat.epsilon, x.dtype),
        delta_best=delta,
        grad_best=grad,
        loss_best=loss0,
        delta_adv=delta,
        fooled=wrong0,
        previous=jnp.zeros_like(loss0),  # the reference compares the first loss with 0
        increases=jnp.zeros_like(loss0),
        loss_best_last_check=loss0,
        reduced_last_check=jnp.ones_like(loss0, dtype=bool),
    )

    def body(c, inputs):
        i, is_check, window = inputs
        momentum = jnp.where(i > 0, 0.75, 1.0)
        change = c["delta"] - c["delta_old"]
        z = threat.project(c["delta"] + c["step"] * threat.step_direction(c["grad"]), x)
        delta = threat.project(
            c["delta"] + (z - c["delta"]) * momentum + change * (1.0 - momentum), x
        )
        value, wrong, grad = value_and_grad(delta, i)
        delta_adv = where(wrong & ~c["fooled"], delta, c["delta_adv"])
        better = value > c["loss_best"]
        c = dict(
            c,
            delta_old=c["delta"],
            delta=delta,
            grad=grad,
            delta_adv=delta_adv,
            fooled=c["fooled"] | wrong,
            delta_best=where(better, delta, c["delta_best"]),
            grad_best=where(better, grad, c["grad_best"]),
            loss_best=jnp.where(better, value, c["loss_best"]),
            increases=c["increases"] + (value > c["previous"]),
            previous=value,
        )
        # At a checkpoint: halve the step and go back to the best point where too few steps
        # raised the loss, or where the best loss did not move and the step was kept last time.
        oscillating = c["increases"] <= window * rho
        stalled = ~c["reduced_last_check"] & (c["loss_best_last_check"] >= c["loss_best"])
        reduce = is_check & (oscillating | stalled)
        checked = dict(
            c,
            step=jnp.where(reduce.reshape(shape), c["step"] / 2.0, c["step"]),
            delta=where(reduce, c["delta_best"], c["delta"]),
            grad=where(reduce, c["grad_best"], c["grad"]),
            reduced_last_check=reduce,
            loss_best_last_check=c["loss_best"],
            increases=jnp.zeros_like(c["increases"]),
        )
        return jax.tree.map(lambda a, b: jnp.where(is_check, a, b), checked, c), None

    is_check, windows = checkpoints(num_steps)
    c, _ = jax.lax.scan(body, init, (jnp.arange(num_steps), is_check, windows))
    delta = where(c["fooled"], c["delta_adv"], c["delta_best"])
    return APGDResult(delta=delta, fooled=c["fooled"], loss=c["loss_best"])


def _accumulate(result, active, run):
    """Folds one run into `result`, only on points still `active` (not fooled yet): a new
    misclassified point is taken; otherwise the higher-loss point."""
    take = active & (run.fooled | (run.loss > result.loss))
    mask = take.reshape(take.shape + (1,) * (result.delta.ndim - 1))
    return APGDResult(
        delta=jnp.where(mask, run.delta, result.delta),
        fooled=result.fooled | (active & run.fooled),
        loss=jnp.where(take, run.loss, result.loss),
    )


def _runs(run_fn, x, y, keys, extra, active):
    """Runs ``run_fn(key, extra_i)`` once per row of `keys` / `extra` under `lax.scan`, each on
    the points still active and not fooled, skipping a run when there is none."""
    if active is None:
        active = jnp.ones(y.shape, bool)
    none = APGDResult(
        delta=jnp.zeros_like(x), fooled=jnp.zeros(y.shape, bool), loss=jnp.full(y.shape, -jnp.inf)
    )

    def body(result, inputs):
        key, e = inputs
        todo = active & ~result.fooled
        new = jax.lax.cond(
            jnp.any(todo), lambda: _accumulate(result, todo, run_fn(key, e)), lambda: result
        )
        return new, None

    return jax.lax.scan(body, none, (keys, extra))[0]


def apgd(
    logits_fn,
    x,
    y,
    *,
    key,
    threat,
    num_steps=100,
    loss="ce",
    restarts=1,
    rho=0.75,
    active=None,
    num_classes=None,
    eot_iter=None,
):
    """APGD with random restarts (the reference's ``APGDAttack.perturb``), untargeted.

    Each restart attacks only the points that no earlier restart fooled; a restart is skipped
    when none is left.

    Args:
      logits_fn, x, y, key, threat, num_steps, rho: see `apgd_run`.
      loss: ``"ce"`` (AutoAttack's APGD-CE) or ``"dlr"`` (APGD-DLR).
      restarts: number of runs (AutoAttack's standard version: 1).
      active: optional bool [B]: only these points are attacked (the rest come back unfooled,
        with delta 0).
      num_classes: K, when known, to refuse a loss that needs more classes.
      eot_iter: see `apgd_run` (then ``logits_fn(x, key)``).

    Returns:
      An `APGDResult`.

    References:
      Croce, Hein 2020, ICML (APGD-CE, APGD-DLR).
    """
    if loss == "dlr_targeted":
        raise ValueError("apgd: for the targeted DLR loss use apgd_targeted (attack 'apgd-t').")
    _check_arguments(threat, num_steps, loss, rho, num_classes, eot_iter)
    if int(restarts) < 1:
        raise ValueError(f"apgd: restarts={restarts} must be >= 1.")

    def run(k, _):
        return apgd_run(
            logits_fn,
            x,
            y,
            key=k,
            threat=threat,
            num_steps=num_steps,
            loss=loss,
            rho=rho,
            eot_iter=eot_iter,
        )

    keys = jax.random.split(key, restarts)
    return _runs(run, x, y, keys, jnp.arange(restarts), active)


def apgd_targeted(
    logits_fn,
    x,
    y,
    *,
    key,
    threat,
    num_steps=100,
    num_targets=9,
    restarts=1,
    rho=0.75,
    active=None,
    num_classes=None,
    eot_iter=None,
):
    """APGD-T: APGD on the targeted DLR loss toward each of the `num_targets` classes with the
    highest clean logits after the first (the reference's ``APGDAttack_targeted.perturb``).

    The targets are ranked on the clean image; target j attacks only the points that the
    earlier targets did not fool. Success is any misclassification, as in the reference.

    Args:
      logits_fn, x, y, key, threat, num_steps, rho, active: see `apgd`.
      num_targets: target classes tried (9 for CIFAR-10: every other class); at most K - 1.
      restarts: runs per target class (AutoAttack's standard version: 1).
      num_classes: K; read from the logits when None.
      eot_iter: see `apgd_run` (then ``logits_fn(x, key)``; the targets are ranked on one draw).

    Returns:
      An `APGDResult`.

    References:
      Croce, Hein 2020, ICML (APGD-T, Sec. 4 and the standard version of AutoAttack).
    """
    if eot_iter is None:
        logits = logits_fn(x)
    else:
        rank_key, key = jax.random.split(key)
        logits = logits_fn(x, rank_key)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    _check_arguments(threat, num_steps, "dlr_targeted", rho, num_classes, eot_iter)
    if not 1 <= int(num_targets) <= num_classes - 1:
        raise ValueError(
            f"apgd_targeted: num_targets={num_targets} must lie in [1, K - 1 = {num_classes - 1}]."
        )
    if int(restarts) < 1:
        raise ValueError(f"apgd_targeted: restarts={restarts} must be >= 1.")
    ranked = jnp.argsort(logits, axis=-1)[:, ::-1]  # classes by decreasing clean logit

    def run(k, rank):
        target = jax.lax.stop_gradient(ranked[:, rank])
        return apgd_run(
            logits_fn,
            x,
            y,
            key=k,
            threat=threat,
            num_steps=num_steps,
            loss="dlr_targeted",
            target=target,
            rho=rho,
            eot_iter=eot_iter,
        )

    ranks = jnp.repeat(jnp.arange(1, num_targets + 1), restarts)
    keys = jax.random.split(key, ranks.shape[0])
    return _runs(run, x, y, keys, ranks, active)
