r"""Carlini–Wagner ℓ2: the smallest ℓ2 perturbation that changes the prediction, by optimisation.

The box constraint goes away with a change of variables, :math:`x' = (\tanh w + 1) / 2`, and for
a trade-off constant c per example Adam minimises over w

.. math::
    \|x' - x\|_2^2 + c \, \max\big(z_y(x') - \max_{j \ne y} z_j(x') + \kappa,\ 0\big)

(z the logits, κ the confidence: the f6 loss of the paper, untargeted). A binary search over c
follows each run of Adam, per example, with the reference code's rules: after a run that found a
misclassified point (with margin κ) the upper bound becomes c, else the lower bound does; c is the
midpoint once an upper bound exists, else it grows tenfold. The smallest-norm misclassified point
of all iterations of all runs is kept. Each run restarts Adam and w at x; a run stops early for
an example whose loss, looked at every tenth of the iterations, fell by less than 0.01 %.

The whole batch is attacked at once: runs of the binary search under `lax.scan`, Adam's
iterations under `lax.while_loop` (which ends when every example has stopped early).

References:
  Carlini, Wagner 2017, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P (Sec. V,
  the f6 objective and the ℓ2 attack); github.com/carlini/nn_robust_attacks, ``l2_attack.py``
  (learning rate 0.01, 9 search steps, initial c = 1e-3, abort early, 10,000 iterations).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# The reference's sentinel for "no upper bound on c yet" and its threshold test.
_NO_BOUND = 1e10


class CWResult(NamedTuple):
    """What the attack found, per example.

    Attributes:
      adv: the smallest-norm misclassified point found, in [0, 1]; x itself where none was.
      found: bool [B], some iterate was misclassified with margin κ.
      norm: [B] ``||adv - x||_2`` where `found`, else inf.
    """

    adv: jax.Array
    found: jax.Array
    norm: jax.Array


def _margin(logits, y):
    """``z_y - max_{j != y} z_j`` [B]: negative once x is misclassified."""
    own = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[1], dtype=bool), -jnp.inf, logits)
    return own - jnp.max(others, axis=1)


def carlini_wagner_l2(
    logits_fn,
    x,
    y,
    *,
    num_steps=1000,
    search_steps=9,
    learning_rate=0.01,
    initial_const=1e-3,
    confidence=0.0,
    abort_early=True,
):
    """The untargeted CW-ℓ2 attack on one batch.

    Args:
      logits_fn: ``x -> logits [B, K]`` (the model in eval mode); each example's logits must
        depend on that example only.
      x: images [B, H, W, C] in [0, 1].
      y: labels [B] (the attack moves away from them).
      num_steps: Adam iterations per value of c (the reference: 10,000; 1000 here).
      search_steps: values of c tried per example (binary search steps, 9).
      learning_rate: Adam's step on w (0.01).
      initial_const: the first c (1e-3).
      confidence: κ, the margin by which the found point must be misclassified (0).
      abort_early: stop a run for an example whose loss stopped falling (checked every
        ``num_steps // 10`` iterations).

    Returns:
      A `CWResult`.

    References:
      Carlini, Wagner 2017, IEEE S&P; github.com/carlini/nn_robust_attacks ``l2_attack.py``.
    """
    axes = tuple(range(1, x.ndim))
    batch = x.shape[0]
    # x' = (tanh w + 1) / 2; the reference scales by 0.999999 so that arctanh stays finite.
    w0 = jnp.arctanh((2.0 * x - 1.0) * 0.999999)
    opt = optax.adam(learning_rate)
    check_every = max(num_steps // 10, 1)

    def losses(w, const):
        adv = (jnp.tanh(w) + 1.0) / 2.0
        dist = jnp.sum(jnp.square(adv - x), axis=axes)
        margin = _margin(logits_fn(adv), y)
        loss = dist + const * jnp.maximum(margin + confidence, 0.0)
        return jnp.sum(loss), (loss, dist, margin, adv)

    grad_fn = jax.grad(losses, has_aux=True)

    def run(carry, step):
        """One value of c: Adam from x, keeping the best point; then c's binary search."""
        const, lower, upper, best_dist, best_adv = carry
        if search_steps >= 10:
            # The reference's last step repeats the search once at the upper bound.
            const = jnp.where(step == search_steps - 1, upper, const)

        def cond(s):
            return (s["i"] < num_steps) & jnp.any(s["active"])

        def body(s):
            grads, (loss, dist, margin, adv) = grad_fn(s["w"], const)
            # The point scored is the current iterate, before Adam moves it (as the reference).
            hit = s["active"] & (margin + confidence < 0.0)
            better = hit & (dist < s["best_dist"])
            s_new = dict(s)
            s_new["success"] = s["success"] | hit
            s_new["best_dist"] = jnp.where(better, dist, s["best_dist"])
            s_new["best_adv"] = jnp.where(_expand(better, x), adv, s["best_adv"])
            updates, opt_state = opt.update(grads, s["opt_state"])
            moved = optax.apply_updates(s["w"], updates)
            s_new["w"] = jnp.where(_expand(s["active"], x), moved, s["w"])
            s_new["opt_state"] = opt_state
            if abort_early:
                check = s["i"] % check_every == 0
                stalled = check & (loss > s["prev"] * 0.9999)
                s_new["active"] = s["active"] & ~stalled
                s_new["prev"] = jnp.where(check, loss, s["prev"])
            s_new["i"] = s["i"] + 1
            return s_new

        state = {
            "i": jnp.zeros((), jnp.int32),
            "w": w0,
            "opt_state": opt.init(w0),
            "active": jnp.ones((batch,), bool),
            "prev": jnp.full((batch,), 1e6, x.dtype),
            "success": jnp.zeros((batch,), bool),
            "best_dist": best_dist,
            "best_adv": best_adv,
        }
        state = jax.lax.while_loop(cond, body, state)
        success = state["success"]
        upper = jnp.where(success, jnp.minimum(upper, const), upper)
        lower = jnp.where(success, lower, jnp.maximum(lower, const))
        bounded = upper < _NO_BOUND / 10
        const = jnp.where(bounded, (lower + upper) / 2.0, jnp.where(success, const, const * 10.0))
        return (const, lower, upper, state["best_dist"], state["best_adv"]), None

    carry = (
        jnp.full((batch,), initial_const, x.dtype),
        jnp.zeros((batch,), x.dtype),
        jnp.full((batch,), _NO_BOUND, x.dtype),
        jnp.full((batch,), jnp.inf, x.dtype),
        x,
    )
    _, _, _, best_dist, best_adv = jax.lax.scan(run, carry, jnp.arange(search_steps))[0]
    found = jnp.isfinite(best_dist)
    norm = jnp.where(found, jnp.sqrt(jnp.sum(jnp.square(best_adv - x), axis=axes)), jnp.inf)
    return CWResult(adv=best_adv, found=found, norm=norm)


def _expand(mask, x):
    return mask.reshape(mask.shape + (1,) * (x.ndim - 1))


__all__ = ["CWResult", "carlini_wagner_l2"]
