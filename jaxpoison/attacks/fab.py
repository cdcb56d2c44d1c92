"""FAB (Croce & Hein 2020): the fast adaptive boundary attack, targeted (AutoAttack's FAB-T).

FAB looks for the smallest ℓp perturbation that changes the prediction. At each iteration it
linearises the logit difference ``f = z_t - z_y`` at the current point ``x1`` and projects both
``x1`` and the clean point ``x0`` onto the hyperplane ``f(x1) + ∇f·(z - x1) = 0`` intersected
with the [0, 1] box (`project_to_hyperplane`, exact, in the ball's norm). The next point is a
convex combination of the two projections, each overshot by ``η``,

    x1 <- clip((x1 + η d1) (1 - α) + (x0 + η d2) α, 0, 1),
    α = min(|d1| / (|d1| + |d2|), α_max),

which leans toward the clean point when the current one is far from the boundary. Whenever the
new point is misclassified it is kept if it is the closest found so far, and the attack steps
back toward ``x0``: ``x1 <- x0 + β (x1 - x0)``.

`fab_targeted` runs this toward each of the `num_targets` classes with the highest clean logits
after the first, as AutoAttack's standard version does (9 targets, 1 run each, 100 iterations,
``α_max = 0.1``, ``η = 1.05``, ``β = 0.9``); the first run of a target starts at ``x0``, later
runs from a random point at distance ``ε / 2``. A point counts as fooled when the closest
misclassified point found lies within the ball (norm ``<= ε``); a target class then attacks only
the points not fooled yet, and is skipped (`lax.cond`) when none is left.

References:
  Croce, Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
  attack", ICML (Algorithm 1, Sec. 3); reference code github.com/fra31/auto-attack,
  ``autoattack/fab_base.py``, ``fab_pt.py``, ``fab_projections.py``.
  Croce, Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML (FAB-T in the standard version).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class FABResult(NamedTuple):
    """What a FAB run found, per example.

    Attributes:
      delta: the closest misclassified point found (``x + delta`` in [0, 1]); 0 where none was.
      fooled: bool [B], that point lies within the ball (norm <= ε).
      norm: [B] its norm in the ball's norm; ``inf`` where no misclassified point was found.
    """

    delta: jax.Array
    fooled: jax.Array
    norm: jax.Array


def _norm(v, norm):
    return jnp.max(jnp.abs(v), axis=1) if norm == "linf" else jnp.sqrt(jnp.sum(v * v, axis=1))


def project_to_hyperplane(t, w, b, *, norm):
    """The smallest ``d`` (in ℓ∞ or ℓ2) with ``w·(t + d) = b`` and ``t + d`` in [0, 1]^D.

    With ``c = w·t - b`` made non-negative by flipping the sign of ``w``, every coordinate moves
    against ``w``: ``d_i = -sign(w_i) min(λ s_i, r_i)``, where ``r_i`` is the room left to the
    box in that direction and ``s_i = 1`` (ℓ∞) or ``|w_i|`` (ℓ2, the KKT point of the
    box-constrained least-norm problem). ``g(λ) = Σ |w_i| min(λ s_i, r_i)`` is piecewise linear
    and non-decreasing; the smallest ``λ`` with ``g(λ) = c`` is found exactly from the sorted
    breakpoints ``r_i / s_i``. When no point of the box reaches the hyperplane, the box corner
    that gets closest (``λ = ∞``) is returned, as the reference does.

    Args:
      t: points [N, D]; w: normals [N, D]; b: offsets [N].
      norm: ``"linf"`` or ``"l2"``.

    Returns:
      d [N, D].
    """
    c = jnp.sum(w * t, axis=1) - b
    w = jnp.where((c >= 0)[:, None], w, -w)
    c = jnp.abs(c)
    room = jnp.where(w > 0, t, 1.0 - t)
    a = jnp.abs(w)
    s = jnp.ones_like(a) if norm == "linf" else a
    slope = a * s
    moving = slope > 0
    breaks = jnp.where(moving, room / jnp.where(moving, s, 1.0), jnp.inf)
    order = jnp.argsort(breaks, axis=1)
    sorted_breaks = jnp.take_along_axis(breaks, order, axis=1)
    done = jnp.cumsum(jnp.take_along_axis(a * room, order, axis=1), axis=1)
    rest = jnp.sum(slope, axis=1, keepdims=True) - jnp.cumsum(
        jnp.take_along_axis(slope, order, axis=1), axis=1
    )
    # g at each breakpoint (inf past the coordinates that never reach the box).
    g = jnp.where(jnp.isfinite(sorted_breaks), done + sorted_breaks * rest, jnp.inf)
    clipped = jnp.sum(g <= c[:, None], axis=1)  # coordinates at the box at the solution
    prev = jnp.maximum(clipped - 1, 0)[:, None]
    done_prev = jnp.where(clipped > 0, jnp.take_along_axis(done, prev, axis=1)[:, 0], 0.0)
    rest_prev = jnp.where(
        clipped > 0, jnp.take_along_axis(rest, prev, axis=1)[:, 0], jnp.sum(slope, axis=1)
    )
    feasible = c <= jnp.sum(a * room, axis=1)
    lam = jnp.where(feasible, (c - done_prev) / jnp.maximum(rest_prev, 1e-30), jnp.inf)
    step = jnp.where(moving, jnp.minimum(lam[:, None] * s, room), 0.0)
    return -jnp.sign(w) * step


def fab_run(
    logits_fn,
    x,
    y,
    target,
    *,
    threat,
    num_steps=100,
    alpha_max=0.1,
    eta=1.05,
    beta=0.9,
    start=None,
):
    """One targeted FAB run (the reference's ``attack_single_run``) on every point of the batch.

    Args:
      logits_fn: ``x -> logits [B, K]`` (the model in eval mode).
      x: images [B, H, W, C] in [0, 1]; y: labels [B]; target: target classes [B].
      threat: an `LpBall`: its norm is minimised, its mask (if any) fixes the pixels outside it;
        its radius only decides `fooled`.
      num_steps: iterations (100).
      alpha_max: the largest weight of the clean point's projection (0.1).
      eta: overshoot of the projections (1.05).
      beta: the backward step toward x after a misclassified point (0.9).
      start: the first point, ``x`` when None.

    Returns:
      A `FABResult`.
    """
    batch = x.shape[0]
    norm = threat.norm
    x0 = x.reshape(batch, -1)
    mask = None if threat.mask is None else jnp.broadcast_to(threat.mask, x.shape[1:]).ravel()
    rows = jnp.arange(batch)

    def diff_and_grad(x1):
        def total(z):
            logits = logits_fn(z.reshape(x.shape))
            diff = logits[rows, target] - logits[rows, y]
            return jnp.sum(diff), diff

        g, diff = jax.grad(total, has_aux=True)(x1)
        return diff, g if mask is None else g * mask

    def wrong(x1):
        return jnp.argmax(logits_fn(x1.reshape(x.shape)), -1) != y

    def body(c, _):
        x1 = c["x1"]
        diff, w = diff_and_grad(x1)
        b = jnp.sum(w * x1, axis=1) - diff
        d = project_to_hyperplane(
            jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]), norm=norm
        )
        d1, d2 = d[:batch], d[batch:]
        a1 = jnp.maximum(_norm(d1, norm), 1e-8)
        a2 = jnp.maximum(_norm(d2, norm), 1e-8)
        alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
        x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
        adv = wrong(x1)
        size = _norm(x1 - x0, norm)
        closer = adv & (size < c["best"])
        return dict(
            x1=jnp.where(adv[:, None], x0 + (x1 - x0) * beta, x1),
            best=jnp.where(closer, size, c["best"]),
            x_adv=jnp.where(closer[:, None], x1, c["x_adv"]),
        ), None

    x1 = x0 if start is None else (x + start).reshape(batch, -1)
    init = dict(x1=x1, best=jnp.full((batch,), jnp.inf, x.dtype), x_adv=x0)
    c, _ = jax.lax.scan(body, init, length=num_steps)
    return FABResult(
        delta=(c["x_adv"] - x0).reshape(x.shape),
        fooled=c["best"] <= threat.epsilon,
        norm=c["best"],
    )


def _random_start(key, x, threat):
    """The reference's restart point: a random direction of norm ε / 2, then into the box."""
    axes = tuple(range(1, x.ndim))
    if threat.norm == "linf":
        t = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
        size = jnp.max(jnp.abs(t), axis=axes, keepdims=True)
    else:
        t = jax.random.normal(key, x.shape, x.dtype)
        size = jnp.sqrt(jnp.sum(t * t, axis=axes, keepdims=True))
    delta = 0.5 * threat.epsilon * t / (size + 1e-12)
    if threat.mask is not None:
        delta = delta * threat.mask
    return jnp.clip(x + delta, 0.0, 1.0) - x


def fab_targeted(
    logits_fn,
    x,
    y,
    *,
    key,
    threat,
    num_steps=100,
    num_targets=9,
    restarts=1,
    alpha_max=0.1,
    eta=1.05,
    beta=0.9,
    active=None,
    num_classes=None,
):
    """FAB-T: targeted FAB toward each of the `num_targets` classes with the highest clean logits
    after the first (the reference's ``FABAttack.perturb`` with ``targeted=True``).

    Only points classified correctly (and `active`) are attacked. Target j (and each of its
    restarts) attacks only the points that no earlier run fooled within the ball; the closest
    misclassified point of all runs is kept. A misclassified point counts whatever class it
    falls into, as in the reference.

    Args:
      logits_fn, x, y, threat, num_steps, alpha_max, eta, beta: see `fab_run`.
      key: PRNG key of the random starts (runs after the first of each target).
      num_targets: target classes tried (9 for CIFAR-10: every other class); at most K - 1.
      restarts: runs per target class (AutoAttack's standard version: 1, from x itself).
      active: optional bool [B]: only these points are attacked (the rest come back unfooled).
      num_classes: K; read from the logits when None.

    Returns:
      A `FABResult`: where `fooled`, the closest misclassified point within the ball; elsewhere
      the closest found beyond it (norm > ε) or delta 0 and norm ``inf``.

    References:
      Croce, Hein 2020, ICML (FAB; FAB-T in AutoAttack's standard version).
    """
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"fab: norm {threat.norm!r} is not supported; use 'linf' or 'l2'.")
    if int(num_steps) < 1 or int(restarts) < 1:
        raise ValueError(f"fab: num_steps={num_steps} and restarts={restarts} must be >= 1.")
    if not (0.0 <= alpha_max <= 1.0 and eta >= 1.0 and 0.0 < beta < 1.0):
        raise ValueError(
            f"fab: alpha_max={alpha_max}, eta={eta}, beta={beta} must satisfy 0 <= alpha_max "
            "<= 1, eta >= 1, 0 < beta < 1 (the reference's: 0.1, 1.05, 0.9)."
        )
    logits = logits_fn(x)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    if not 1 <= int(num_targets) <= num_classes - 1:
        raise ValueError(
            f"fab: num_targets={num_targets} must lie in [1, K - 1 = {num_classes - 1}]."
        )
    ranked = jnp.argsort(logits, axis=-1)[:, ::-1]  # classes by decreasing clean logit
    todo0 = jnp.argmax(logits, -1) == y
    if active is not None:
        todo0 = todo0 & active
    kw = dict(threat=threat, num_steps=num_steps, alpha_max=alpha_max, eta=eta, beta=beta)

    def body(result, inputs):
        k, rank, restart = inputs
        todo = todo0 & ~result.fooled

        def attack():
            start = jnp.where(restart > 0, _random_start(k, x, threat), jnp.zeros_like(x))
            run = fab_run(logits_fn, x, y, ranked[:, rank], start=start, **kw)
            take = todo & (run.norm < result.norm)
            return FABResult(
                delta=jnp.where(take.reshape((-1,) + (1,) * (x.ndim - 1)), run.delta, result.delta),
                fooled=result.fooled | (todo & run.fooled),
                norm=jnp.where(take, run.norm, result.norm),
            )

        return jax.lax.cond(jnp.any(todo), attack, lambda: result), None

    ranks = jnp.repeat(jnp.arange(1, num_targets + 1), restarts)
    runs = jnp.tile(jnp.arange(restarts), num_targets)
    keys = jax.random.split(key, ranks.shape[0])
    none = FABResult(
        delta=jnp.zeros_like(x),
        fooled=jnp.zeros(y.shape, bool),
        norm=jnp.full(y.shape, jnp.inf, x.dtype),
    )
    return jax.lax.scan(body, none, (keys, ranks, runs))[0]
