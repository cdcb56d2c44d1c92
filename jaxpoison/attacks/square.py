"""Square Attack (Andriushchenko et al. 2020): a score-based random search, no gradients.

Each query changes one random square window of the current best perturbation and keeps the
change where it lowers the margin ``z_y - max_{i != y} z_i``. The window's side follows the
reference's schedule of ``p`` (the fraction of pixels changed: ``p_init`` halved after 10, 50,
200, 500, 1000, 2000, 4000, 6000 and 8000 queries). ℓ∞: the window is set to ``±2ε`` per
channel and projected back into the ball, from vertical stripes of ``±ε`` as the start. ℓ2: the
window gets the reference's centred pattern of nested squares with opposite halves, scaled to
the budget left, and a second window of the same size hands its mass over to it; the start is a
grid of such patterns.

A whole batch runs at once under `lax.while_loop` (until `num_queries` or until every point is
fooled). Unlike AutoAttack's copy, which draws one window position and one sign per query for
the whole batch, every example draws its own (as the paper's code does), so an example's result
does not depend on the batch it is in.

References:
  Andriushchenko, Croce, Flammarion, Hein 2020, "Square Attack: a query-efficient black-box
  adversarial attack via random search", ECCV (Algorithms 1-3); reference code
  github.com/fra31/auto-attack, ``autoattack/square.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


class SquareResult(NamedTuple):
    """What a Square run found, per example.

    Attributes:
      delta: the lowest-margin point found (misclassified where `fooled`), inside the ball and
        with ``x + delta`` in [0, 1].
      fooled: bool [B], the margin reached 0 or below.
      margin: [B] the lowest margin ``z_y - max_{i != y} z_i`` reached.
      queries: [B] model queries spent on the point (the start included).
    """

    delta: jax.Array
    fooled: jax.Array
    margin: jax.Array
    queries: jax.Array


def margin(logits, y):
    """``z_y - max_{i != y} z_i`` per example: positive while x is classified as y."""
    true = jnp.take_along_axis(logits, y[:, None], axis=1)[:, 0]
    others = jnp.where(jax.nn.one_hot(y, logits.shape[-1]) > 0, -jnp.inf, logits)
    return true - jnp.max(others, axis=-1)


def fraction(i, *, p_init, num_queries, rescale):
    """The reference's schedule of p at query `i` (`rescale` maps `num_queries` onto 10,000)."""
    it = jnp.floor(i * 10000.0 / num_queries) if rescale else i
    halvings = jnp.sum(it > jnp.asarray(_SCHEDULE))
    return p_init / 2.0**halvings


def _eta(s):
    """The reference's ℓ2 window pattern of side s (numpy, unit ℓ2 norm): nested squares with
    weights 1/(k+1)^2 in the top half, the same pattern negated in the bottom half."""

    def rectangles(a, b):
        out = np.zeros((a, b))
        ca, cb = a // 2 + 1, b // 2 + 1
        r, c = ca - 1, cb - 1
        for k in range(max(ca, cb)):
            out[max(r, 0) : min(r + 2 * k + 1, a), max(c, 0) : min(c + 2 * k + 1, b)] += (
                1.0 / (k + 1) ** 2
            )
            r, c = r - 1, c - 1
        return out / np.sqrt(np.sum(out**2))

    out = np.zeros((s, s))
    out[: s // 2] = rectangles(s // 2, s)
    out[s // 2 :] = -rectangles(s - s // 2, s)
    return out / np.sqrt(np.sum(out**2))


def _window(vh, vw, s, h, w):
    """[B, H, W, 1] 0/1 float: the s x s window at (vh, vw) of each example (s may be traced)."""
    rows = jnp.arange(h)[None, :, None, None]
    cols = jnp.arange(w)[None, None, :, None]
    vh, vw = vh[:, None, None, None], vw[:, None, None, None]
    inside = (rows >= vh) & (rows < vh + s) & (cols >= vw) & (cols < vw + s)
    return inside.astype(jnp.float32)


def _corner(key, size, s, n):
    """Uniform integers in [0, size - s) (0 when s == size), one per example, as the reference."""
    return jnp.floor(jax.random.uniform(key, (n,)) * (size - s)).astype(jnp.int32)


def _l2_patterns(h):
    """Every window side's pattern (2 to H) placed at the top-left of an H x W canvas, [S, H, W]:
    the ℓ2 window of side s is the entry s, shifted (a traced side cannot build it itself)."""
    out = np.zeros((h + 1, h, h))
    for s in range(2, h + 1):
        out[s, :s, :s] = _eta(s)
    return jnp.asarray(out, jnp.float32)


def _shift(pattern, vh, vw):
    """Moves a top-left pattern [B, H, W, ...] to start at row vh, column vw, per example."""
    return jax.vmap(lambda p, a, b: jnp.roll(p, (a, b), axis=(0, 1)))(pattern, vh, vw)


def square(
    logits_fn,
    x,
    y,
    *,
    key,
    threat,
    num_queries=5000,
    p_init=0.8,
    rescale_schedule=False,
    active=None,
):
    """Square Attack on the margin loss, untargeted, one run (AutoAttack's setting: 5000
    queries, ``p_init = 0.8``, the schedule not rescaled).

    Args:
      logits_fn: ``x -> logits [B, K]``; only its values are used.
      x: images [B, H, W, C] in [0, 1] with H == W (the windows are squares); y: labels [B].
      key: PRNG key.
      threat: an `LpBall` (ℓ∞ or ℓ2; a mask restricts where windows act).
      num_queries: queries after the start.
      p_init: the starting fraction of pixels a window covers.
      rescale_schedule: stretch the schedule of p from 10,000 queries to `num_queries`.
      active: optional bool [B]: only these points are attacked (the others keep delta 0).

    Returns:
      A `SquareResult`.

    References:
      Andriushchenko et al. 2020, ECCV.
    """
    n, h, w, c = x.shape
    if threat.norm not in ("linf", "l2"):
        raise ValueError(f"square: norm {threat.norm!r} is not supported; use 'linf' or 'l2'.")
    if h != w:
        raise ValueError(f"square: images must be square (H == W), got {h} x {w}.")
    if int(num_queries) < 0 or not 0.0 < p_init <= 1.0:
        raise ValueError(
            f"square: num_queries={num_queries} must be >= 0 and p_init={p_init} in (0, 1]."
        )
    active = jnp.ones((n,), bool) if active is None else active
    eps = threat.epsilon
    axes = (1, 2, 3)

    def margin_at(delta):
        return margin(logits_fn(x + delta), y)

    def l2_normalized(d):
        return d / (jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True)) + 1e-12)

    key, init_key = jax.random.split(key)
    if threat.norm == "linf":
        signs = jnp.sign(jax.random.uniform(init_key, (n, 1, w, c), x.dtype, -1.0, 1.0))
        delta = threat.project(eps * jnp.broadcast_to(signs, x.shape), x)
    else:
        # A grid of windows of side H // 5 (at least 2), each with its own sign per channel.
        side = max(h // 5, 2)
        start = max((h - side * 5) // 2, 0)
        corners = [start + j * side for j in range(h // side) if start + (j + 1) * side <= h]
        signs = jnp.sign(
            jax.random.uniform(init_key, (len(corners) ** 2, n, 1, 1, c), x.dtype, -1.0, 1.0)
        )
        tile = jnp.zeros_like(x)
        for j, (r0, q0) in enumerate((r0, q0) for r0 in corners for q0 in corners):
            placed = np.zeros((h, w))
            placed[r0 : r0 + side, q0 : q0 + side] = _eta(side)
            tile = tile + jnp.asarray(placed, x.dtype)[None, :, :, None] * signs[j]
        delta = threat.project(eps * l2_normalized(tile), x)
    delta = jnp.where(active[:, None, None, None], delta, 0.0)
    best = margin_at(delta)
    patterns = _l2_patterns(h) if threat.norm == "l2" else None

    def side_at(i):
        p = fraction(i, p_init=p_init, num_queries=num_queries, rescale=rescale_schedule)
        s = jnp.maximum(jnp.round(jnp.sqrt(p * h * w)), 1 if threat.norm == "linf" else 3)
        if threat.norm == "l2":
            s = s + (s % 2 == 0)
        return jnp.minimum(s, h).astype(jnp.int32)

    def propose_linf(k, delta, s):
        k1, k2, k3 = jax.random.split(k, 3)
        window = _window(_corner(k1, h, s, n), _corner(k2, w, s, n), s, h, w)
        signs = jnp.sign(jax.random.uniform(k3, (n, 1, 1, c), x.dtype, -1.0, 1.0))
        return threat.project(delta + window * 2.0 * eps * signs, x)

    def propose_l2(k, delta, s):
        k1, k2, k3, k4, k5, k6 = jax.random.split(k, 6)  # corners, transpose, signs
        vh, vw = _corner(k1, h, s, n), _corner(k2, w, s, n)
        vh2, vw2 = _corner(k3, h, s, n), _corner(k4, w, s, n)
        window = _window(vh, vw, s, h, w)
        window2 = _window(vh2, vw2, s, h, w)
        union = jnp.maximum(window, window2)
        # The reference's norms are per channel, over the window's pixels.
        norm_window = jnp.sqrt(jnp.sum((delta * window) ** 2, axis=(1, 2), keepdims=True))
        norm_union = jnp.sqrt(jnp.sum((delta * union) ** 2, axis=(1, 2), keepdims=True))
        norm_image = jnp.sqrt(jnp.sum(delta**2, axis=axes, keepdims=True))
        pattern = jnp.broadcast_to(patterns[s], (n, h, w))
        pattern = _shift(pattern, vh, vw)[..., None]
        flip = jax.random.uniform(k5, (n, 1, 1, 1)) > 0.5
        pattern = jnp.where(flip, _transpose_window(pattern, vh, vw), pattern)
        signs = jnp.sign(jax.random.uniform(k6, (n, 1, 1, c), x.dtype, -1.0, 1.0))
        new = pattern * signs + delta * window / (norm_window + 1e-12)
        budget = jnp.maximum(eps**2 - norm_image**2, 0.0) / c + norm_union**2
        new_norm = jnp.sqrt(jnp.sum((new * window) ** 2, axis=(1, 2), keepdims=True))
        new = new * window / (new_norm + 1e-12) * jnp.sqrt(budget)
        proposal = delta * (1.0 - union) + new
        return threat.project(eps * l2_normalized(proposal), x)

    propose = propose_linf if threat.norm == "linf" else propose_l2

    def cond(carry):
        i, _, _, best, _ = carry
        return (i < num_queries) & jnp.any(active & (best > 0))

    def body(carry):
        i, k, delta, best, queries = carry
        k, step_key = jax.random.split(k)
        candidate = propose(step_key, delta, side_at(i))
        value = margin_at(candidate)
        todo = active & (best > 0)
        take = todo & (value < best)
        delta = jnp.where(take[:, None, None, None], candidate, delta)
        return i + 1, k, delta, jnp.where(take, value, best), queries + todo

    init = (jnp.int32(0), key, delta, best, active.astype(jnp.int32))
    _, _, delta, best, queries = jax.lax.while_loop(cond, body, init)
    return SquareResult(delta=delta, fooled=active & (best <= 0), margin=best, queries=queries)


def _transpose_window(pattern, vh, vw):
    """The window pattern [B, H, W, 1] at (vh, vw) transposed about its own corner (the
    reference transposes eta with probability 1/2): shift back, transpose, shift again."""
    back = jax.vmap(lambda p, a, b: jnp.roll(p, (-a, -b), axis=(0, 1)))(pattern, vh, vw)
    return _shift(jnp.swapaxes(back, 1, 2), vh, vw)
