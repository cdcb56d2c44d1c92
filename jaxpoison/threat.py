"""Threat models: the set of perturbations an attacker (or a defender's inner attack) may use.

A threat model is a small frozen pytree. `LpBall(epsilon, norm, mask)` is the ℓ∞ or ℓ2 ball of
radius `epsilon`, optionally restricted to the pixels where `mask == 1`, always intersected with
the image box: `x + delta` stays in [0, 1].

The same `LpBall` is passed as ``threat=`` to poisons, objectives (the defender's inner attack)
and evaluators. Objectives and evaluators also take its fields (``norm``, ``epsilon``, ``mask``)
as plain keywords, so a config can stay plain data; `resolve` chooses between the two and has no
default radius: a radius must always be given.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

NORMS = ("linf", "l2")


def _per_example_norm(v):
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(1, v.ndim)), keepdims=True))


@flax.struct.dataclass
class LpBall:
    """The ℓp ball ``{δ : ||mask * δ||_p <= epsilon, δ = mask * δ, x + δ in [0,1]}``.

    Attributes:
      epsilon: radius, in the units of images scaled to [0, 1] (8/255 for the usual CIFAR ℓ∞).
      norm: ``"linf"`` or ``"l2"``; the ℓ2 norm is taken per example over all pixels.
      mask: optional array broadcastable to one image (H, W, C), 1 where pixels may move, 0 where
        they may not (e.g. only the MNIST half of an MNIST-CIFAR image).
      quantize: if True, `project` also rounds `x + delta` to the 8-bit grid (toward `x`, so the
        rounded delta never leaves the ball when `x` itself is on the grid).
    """

    epsilon: float
    norm: str = flax.struct.field(pytree_node=False, default="linf")
    mask: jax.Array | None = None
    quantize: bool = flax.struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"Unknown norm {self.norm!r}: use one of {NORMS}.")
        eps = self.epsilon
        if isinstance(eps, (int, float)):
            if not math.isfinite(eps) or eps < 0:
                raise ValueError(f"epsilon={eps} is invalid: it must be a finite number >= 0.")
            if self.norm == "linf" and eps > 1:
                raise ValueError(
                    f"epsilon={eps} > 1 for the linf ball, but images are scaled to [0, 1]: "
                    f"pass epsilon as a fraction of the pixel range (e.g. 8/255 = {8 / 255:.4f})."
                )

    def _mask(self, delta):
        return delta if self.mask is None else delta * self.mask

    def project(self, delta, x):
        """Projects `delta` into the ball, onto the mask, and so that `x + delta` is in [0, 1]."""
        delta = self._mask(delta)
        if self.norm == "linf":
            delta = jnp.clip(delta, -self.epsilon, self.epsilon)
        else:
            norm = _per_example_norm(delta)
            delta = delta * jnp.minimum(1.0, self.epsilon / jnp.maximum(norm, 1e-12))
        delta = jnp.clip(x + delta, 0.0, 1.0) - x
        if self.quantize:
            # Truncate toward x (the tolerance absorbs float error such as 8/255*255 = 7.99999).
            delta = jnp.trunc(delta * 255.0 + jnp.sign(delta) * 1e-3) / 255.0
        return delta

    def random_init(self, key, x):
        """A random point of the ball (uniform per pixel for ℓ∞, uniform direction for ℓ2)."""
        if self.norm == "linf":
            delta = jax.random.uniform(key, x.shape, x.dtype, -self.epsilon, self.epsilon)
        else:
            dkey, rkey = jax.random.split(key)
            direction = self._mask(jax.random.normal(dkey, x.shape, x.dtype))
            direction = direction / jnp.maximum(_per_example_norm(direction), 1e-12)
            radius = jax.random.uniform(rkey, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
            delta = direction * radius * self.epsilon
        return self.project(delta, x)

    def step_direction(self, g):
        """Steepest-ascent direction of unit norm: sign(g) for ℓ∞, g / ||g||_2 for ℓ2."""
        g = self._mask(g)
        if self.norm == "linf":
            return jnp.sign(g)
        return g / jnp.maximum(_per_example_norm(g), 1e-12)

    def norm_of(self, delta):
        """Per-example norm of `delta` in this ball's norm, shape (N,)."""
        flat = delta.reshape(delta.shape[0], -1)
        if self.norm == "linf":
            return jnp.max(jnp.abs(flat), axis=1)
        return jnp.linalg.norm(flat, axis=1)


def make(*, epsilon, norm="linf", mask=None, quantize=False):
    """Builds an `LpBall` from config values (a mask may be given as a nested list)."""
    if mask is not None:
        mask = jnp.asarray(mask, jnp.float32)
    return LpBall(epsilon=float(epsilon), norm=norm, mask=mask, quantize=quantize)


def resolve(threat=None, *, norm=None, epsilon=None, mask=None, what):
    """The ball a factory runs in: `threat` as given, or one built from `norm`, `epsilon`, `mask`.

    Objectives and evaluators take either form (`LpBall` objects for code, its fields for
    configs); this is the one place that chooses. There is no default radius.

    Args:
      threat: an `LpBall` (the same object the poisons take), or None.
      norm: ``"linf"`` (when None) or ``"l2"``; only without `threat`.
      epsilon: the radius; only without `threat`, and needed then.
      mask: optional pixel mask (see `LpBall`); only without `threat`.
      what: the factory's name, for the error messages (e.g. ``"pgd_at"``).

    Returns:
      An `LpBall`.

    Raises:
      ValueError: neither `threat` nor `epsilon` is given, `threat` is not an `LpBall`, or
        `threat` is given together with any of the fields.
    """
    if threat is not None:
        if not isinstance(threat, LpBall):
            raise ValueError(
                f"{what}: threat= must be a threat.LpBall, got {type(threat).__name__}; build one "
                "with threat.make(epsilon=..., norm=...) or pass epsilon= / norm= instead."
            )
        fields = {"norm": norm, "epsilon": epsilon, "mask": mask}
        given = sorted(k for k, v in fields.items() if v is not None)
        if given:
            raise ValueError(
                f"{what}: got threat= and {', '.join(f'{k}=' for k in given)}; pass the ball "
                "either as threat= (an LpBall) or as its fields, not both."
            )
        return threat
    if epsilon is None:
        raise ValueError(
            f"{what} needs a radius: pass threat= (an LpBall) or epsilon=; in a config it comes "
            "from config.threat."
        )
    return make(epsilon=epsilon, norm="linf" if norm is None else norm, mask=mask)
