"""Functional poisons: each training image is changed by a small *function* of the image, not by
an additive δ.

* ``stadv``: a per-example flow field f [N, H, W, 2] moves every pixel's sampling position by at
  most ``max_flow`` pixels per axis; the poisoned image is the clean one resampled bilinearly at
  the displaced grid, ``warp(x, f)`` (Xiao et al. 2018).
* ``recoloradv``: a per-example colour function, a lookup grid of R x R x R control points over
  RGB whose displacements are bounded by ``epsilon`` per channel, interpolated trilinearly; the
  poisoned pixel is ``c + g(c)`` (Laidlaw & Feizi 2019). 3-channel images only.

Both are crafted as P1 / error-maximizing poisons are (`adversarial.attack_poison`): a fixed
crafting model trained on clean data, one attack per batch, the target π(y) (``goal="target"``,
default y + 1 mod K) or the error on y (``goal="error"``), here signed (ℓ∞) projected gradient
steps on the function's parameters, with the papers' smoothness penalty added to the loss.
Labels are unchanged and the output stays in [0, 1] (a convex combination of pixels, resp. a
clip). The images leave any ℓp ball by design, so both are `UNBOUNDED` for the registry's ℓp
bound checks: their own bound is on the function (`max_flow` pixels, `epsilon` colour units).

References:
  Xiao, Zhu, Li, He, Liu, Song. "Spatially Transformed Adversarial Examples." ICLR 2018 (StAdv).
  Laidlaw, Feizi. "Functional Adversarial Attacks." NeurIPS 2019 (ReColorAdv; code:
  github.com/cassidylaidlaw/ReColorAdv).
  Tao et al. "Better Safe Than Sorry: Preventing Delusive Adversaries with Adversarial
  Training." NeurIPS 2021 (P1, the targeted poison objective).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.poisons.base import Poison, label_map

_SQRT_EPS = 1e-8  # inside the smoothness terms' square roots: a finite gradient at 0


@flax.struct.dataclass
class FunctionalState:
    """The per-example parameters of a functional poison, looked up by the batch's 'index'."""

    values: jax.Array  # [N, H, W, 2] flow fields or [N, R, R, R, 3] colour-grid displacements


def _gather(table, index):
    """``table[b, index[b, p]]`` for table [N, M, C] and int index [N, P]: [N, P, C]."""
    return jnp.take_along_axis(table, index[..., None], axis=1)


def warp(x, flow):
    """Resamples images at a displaced grid: ``x'[p] = Σ_q x[q] (1 - |r_p - r_q|)(1 - |c_p - c_q|)``
    over the 4 pixels q around the sampling point ``(r_p, c_p) = p + flow[p]`` (Xiao et al. Eq. 1).

    Border: the sampling point is clipped to the image (replicate padding, as the StAdv reference
    code clamps its grid), so a flow pointing outside repeats the edge pixel. Zero flow is the
    identity exactly and a flow of whole pixels is a shift (on the interior) exactly: the
    fractional weights are then 0 and 1.

    Args:
      x: [N, H, W, C] images.
      flow: [N, H, W, 2] displacements in pixels, (rows, columns).

    Returns:
      [N, H, W, C], each pixel a convex combination of pixels of `x`.
    """
    n, h, w, c = x.shape
    rows = jnp.clip(jnp.arange(h, dtype=x.dtype)[:, None] + flow[..., 0], 0, h - 1)
    cols = jnp.clip(jnp.arange(w, dtype=x.dtype)[None, :] + flow[..., 1], 0, w - 1)
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    wr, wc = (rows - r0).reshape(n, -1, 1), (cols - c0).reshape(n, -1, 1)
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)
    r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
    table = x.reshape(n, h * w, c)
    at = lambda r, cc: _gather(table, (r * w + cc).reshape(n, -1))
    out = (
        at(r0, c0) * (1 - wr) * (1 - wc)
        + at(r0, c1) * (1 - wr) * wc
        + at(r1, c0) * wr * (1 - wc)
        + at(r1, c1) * wr * wc
    )
    return out.reshape(x.shape)


def _neighbour_smoothness(values, axes):
    """Σ over neighbouring positions along `axes` of sqrt(||v_p - v_q||² + 1e-8), per example
    (the last axis is the vector); each unordered pair once."""
    total = 0.0
    for axis in axes:
        diff = jnp.diff(values, axis=axis)
        size = jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + _SQRT_EPS)
        total = total + jnp.sum(size.reshape(values.shape[0], -1), axis=1)
    return total


def flow_loss(flow):
    """Xiao et al.'s L_flow (Eq. 4): Σ_p Σ_{q ∈ N(p)} sqrt(||Δu_p - Δu_q||² + ||Δv_p - Δv_q||²),
    over the 4-neighbours q of every pixel p (each pair counted twice, as in the double sum; a
    replicated border adds only constants). [N, H, W, 2] -> [N]."""
    return 2.0 * _neighbour_smoothness(flow, axes=(1, 2))


def recolor(x, grid):
    """``c + g(c)`` clipped to [0, 1]: g trilinearly interpolated from its R³ control points on the
    uniform RGB lattice {0, 1/(R-1), ..., 1}³. A zero grid is the identity exactly, and any g
    that is affine in c is reproduced exactly.

    Args:
      x: [N, H, W, 3] images in [0, 1].
      grid: [N, R, R, R, 3] colour displacements at the control points (R >= 2).

    Returns:
      [N, H, W, 3] in [0, 1].
    """
    n, r = x.shape[0], grid.shape[1]
    u = jnp.clip(x.reshape(n, -1, 3), 0.0, 1.0) * (r - 1)
    low = jnp.minimum(jnp.floor(u), r - 2)
    frac, low = u - low, low.astype(jnp.int32)
    table = grid.reshape(n, r**3, 3)
    shift = 0.0
    for corner in range(8):
        bits = jnp.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        idx = low + bits
        weight = jnp.prod(jnp.where(bits == 1, frac, 1.0 - frac), axis=-1, keepdims=True)
        shift = shift + weight * _gather(table, (idx[..., 0] * r + idx[..., 1]) * r + idx[..., 2])
    return jnp.clip(x + shift.reshape(x.shape), 0.0, 1.0)


def color_smoothness(grid):
    """Laidlaw & Feizi's smoothness of a colour function: Σ over control points p and their grid
    neighbours q of ||g(p) - g(q)||₂ (each pair twice, as the reference's ``norms.smoothness``).
    [N, R, R, R, 3] -> [N]."""
    return 2.0 * _neighbour_smoothness(grid, axes=(1, 2, 3))


def _check(name, value, *, positive=True, whole=False):
    if whole:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: give a whole number >= 0.")
        return
    if isinstance(value, (bool, str)) or not hasattr(value, "__float__"):
        raise ValueError(f"{name}={value!r} is not a number.")
    if not math.isfinite(float(value)) or float(value) < 0 or (positive and float(value) == 0):
        least = "> 0" if positive else ">= 0"
        raise ValueError(f"{name}={value!r} is invalid: give a finite number {least}.")


def functional_poison(
    *,
    shape,
    transform,
    smoothness,
    bound,
    smoothness_weight,
    threat,
    apply_fn,
    variables,
    num_classes,
    num_steps,
    step_size,
    goal,
    permutation,
    random_start,
    num_epochs,
):
    """A sample-wise functional poison crafted by signed PGD on the function's parameters θ.

    θ starts at 0 (or uniform in [-bound, bound]) for every example; in each of `num_epochs`
    passes over the data, the θ of a batch continues from where it is with `num_steps` steps
    ``θ <- clip(θ - step_size · sign ∇_θ J, -bound, bound)`` on
    ``J = s · CE(model(transform(x, θ)), goal(y)) + smoothness_weight · smoothness(θ)``, with
    s = +1 toward π(y) (``goal="target"``) and s = -1 away from y (``goal="error"``).

    Args:
      shape: the parameters of one example (e.g. (H, W, 2)).
      transform: ``(x [B, ...], θ [B, *shape]) -> x'``.
      smoothness: ``θ [B, *shape] -> [B]``.
      bound: the ℓ∞ bound on every entry of θ.
      smoothness_weight: the penalty's weight (0: none).
      threat: the config's ball; only its ``quantize`` is used (the output rounded to 8 bits).
      apply_fn, variables: the crafting model, trained on clean data.
      num_classes, permutation: K and the target map (see `base.label_map`).
      num_steps, step_size, random_start: the attack (steps per pass).
      goal: ``"target"`` or ``"error"``.
      num_epochs: passes over the training set (a killed craft resumes between passes).

    Returns:
      A `Poison` with a `FunctionalState` and `num_epochs`.
    """
    if goal not in ("target", "error"):
        raise ValueError(f"goal must be 'target' or 'error', not {goal!r}.")
    _check("num_steps", num_steps, whole=True)
    _check("num_epochs", num_epochs, whole=True)
    _check("step_size", step_size)
    _check("smoothness_weight", smoothness_weight, positive=False)
    targets = label_map(num_classes, permutation)
    goal_of = (lambda y: targets[y]) if goal == "target" else (lambda y: y)
    sign = 1.0 if goal == "target" else -1.0
    quantize = getattr(threat, "quantize", False)

    def logits_of(x, theta):
        return apply_fn(variables, transform(x, theta), train=False)[0]

    def objective(theta, x, y):
        ce = losses.cross_entropy(logits_of(x, theta), goal_of(y))
        return jnp.sum(sign * ce + smoothness_weight * smoothness(theta))

    grad_fn = jax.grad(objective)

    def attack(theta, x, y):
        def step(theta, _):
            theta = theta - step_size * jnp.sign(grad_fn(theta, x, y))
            return jnp.clip(theta, -bound, bound), None

        return jax.lax.scan(step, theta, length=num_steps)[0]

    def init(key, dataset):
        size = (dataset["image"].shape[0], *shape)
        dtype = dataset["image"].dtype
        if random_start:
            return FunctionalState(values=jax.random.uniform(key, size, dtype, -bound, bound))
        return FunctionalState(values=jnp.zeros(size, dtype))

    def update(state, batch, key):
        del key  # the attack is deterministic given its start, drawn at init
        x, y = batch["image"], batch["label"]
        theta = attack(state.values[batch["index"]], x, y)
        logits = logits_of(x, theta)
        metrics = {
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "loss": jnp.mean(losses.cross_entropy(logits, y)),
            "smoothness": jnp.mean(smoothness(theta)),
        }
        if goal == "target":
            metrics["target_rate"] = jnp.mean(losses.accuracy(logits, targets[y]))
        return state.replace(values=state.values.at[batch["index"]].set(theta)), metrics

    def apply(state, batch):
        theta = jnp.clip(state.values[batch["index"]], -bound, bound)
        image = jnp.clip(transform(batch["image"], theta), 0.0, 1.0)
        if quantize:
            image = jnp.round(image * 255.0) / 255.0
        return dict(batch, image=image)

    return Poison(init=init, update=update, apply=apply, num_epochs=num_epochs)


def stadv(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    max_flow=None,
    smoothness_weight=None,
    num_steps=100,
    step_size=None,
    goal="target",
    permutation=None,
    random_start=True,
    num_epochs=1,
):
    """StAdv flow-field poison: each image warped by its own flow, |f| <= `max_flow` pixels.

    Xiao et al. minimise L_adv + τ·L_flow with L-BFGS and no hard bound (τ = 0.05). Here, as in
    Laidlaw & Feizi's StAdv threat (their code's ``stadv``: ℓ∞ bound 0.05 on the flow in
    grid_sample's [-1, 1] coordinates, L_flow with weight 0.05), the flow is bounded per pixel
    and axis (the ℓ∞ "flow" ball of radius `max_flow` pixels; default their 0.05 in pixels,
    0.025·(H - 1): 0.775 on 32x32) and L_flow is added to the loss; crafted with P1's signed PGD
    on the cross-entropy (the reference: 100 Adam steps of 0.001 on a CW loss). Border:
    replicate (see `warp`).

    Args:
      threat: the config's ball; ignored except its ``quantize`` (the flow has its own bound).
      num_classes, image_shape: K and (H, W, C) (any C).
      apply_fn, variables: the crafting model, trained on clean data.
      max_flow: the largest displacement in pixels, per axis (None: 0.025·(H - 1)).
      smoothness_weight: τ, the weight of L_flow on flows in pixels (None: 0.1 / (H - 1), the
        reference's 0.05 on flows in [-1, 1] coordinates).
      num_steps: PGD steps (default 100, as P1).
      step_size: PGD step in pixels (default max_flow / 5, as P1's ε/5).
      goal: ``"target"`` (toward π(y), P1's objective) or ``"error"`` (away from y).
      permutation: the target map (default y + 1 mod K).
      random_start: start from a uniformly random flow in the ball (else from 0).
      num_epochs: passes over the training set, each continuing from the last (default 1).

    References:
      Xiao et al. 2018, "Spatially Transformed Adversarial Examples", ICLR.
    """
    h, w = image_shape[:2]
    max_flow = 0.025 * (h - 1) if max_flow is None else max_flow
    smoothness_weight = 0.1 / (h - 1) if smoothness_weight is None else smoothness_weight
    _check("max_flow", max_flow)
    return functional_poison(
        shape=(h, w, 2),
        transform=warp,
        smoothness=flow_loss,
        bound=float(max_flow),
        smoothness_weight=smoothness_weight,
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=float(max_flow) / 5 if step_size is None else step_size,
        goal=goal,
        permutation=permutation,
        random_start=random_start,
        num_epochs=num_epochs,
    )


def recoloradv(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    epsilon=0.06,
    resolution=16,
    smoothness_weight=0.05,
    num_steps=100,
    step_size=None,
    goal="target",
    permutation=None,
    random_start=True,
    num_epochs=1,
):
    """ReColorAdv colour-function poison: each image recoloured by its own smooth colour map.

    The map is ``c -> c + g(c)`` with g trilinear between `resolution`³ control points over RGB,
    each displaced by at most `epsilon` per channel, and the grid's smoothness added to the loss
    with weight 0.05 (the reference's ``recoloradv``: ε = 0.06 per channel, weight 0.05).
    Departures from the reference: RGB, not its CIELUV, and a cubic grid (it uses 16 x 32 x 32);
    P1's signed PGD on the cross-entropy (it uses 100 Adam steps of 0.001 on a CW loss).

    Args:
      threat: the config's ball; ignored except its ``quantize``.
      num_classes, image_shape: K and (H, W, 3).
      apply_fn, variables: the crafting model, trained on clean data.
      epsilon: the largest displacement of a control point per channel (units of [0, 1];
        the reference's 0.06).
      resolution: R, control points per colour axis (>= 2).
      smoothness_weight: the weight of the grid's smoothness (`color_smoothness`).
      num_steps: PGD steps (default 100).
      step_size: PGD step (default epsilon / 5).
      goal, permutation, random_start, num_epochs: as `stadv`.

    Raises:
      ValueError: the images do not have 3 channels, or a bad resolution / epsilon.

    References:
      Laidlaw, Feizi 2019, "Functional Adversarial Attacks", NeurIPS.
    """
    if image_shape[-1] != 3:
        raise ValueError(
            f"recoloradv recolours RGB images, but image_shape={tuple(image_shape)} has "
            f"{image_shape[-1]} channel(s); use stadv (any channels) for this data."
        )
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution={resolution!r}: give a whole number >= 2 of grid points.")
    _check("epsilon", epsilon)
    return functional_poison(
        shape=(resolution, resolution, resolution, 3),
        transform=recolor,
        smoothness=color_smoothness,
        bound=float(epsilon),
        smoothness_weight=smoothness_weight,
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=float(epsilon) / 5 if step_size is None else step_size,
        goal=goal,
        permutation=permutation,
        random_start=random_start,
        num_epochs=num_epochs,
    )
