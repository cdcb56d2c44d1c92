"""Threat models: the set of perturbations an attacker (or a defender's inner attack) may use.

A threat model is a small frozen pytree. `LpBall(epsilon, norm, mask)` is the ℓ∞ or ℓ2 ball of
radius `epsilon`, optionally restricted to the pixels where `mask == 1`, always intersected with
the image box: `x + delta` stays in [0, 1]. `L0Ball(pixels, mask)` is the ℓ0 ball: at most
`pixels` pixel positions of each image change, each to any value in the box (the one-pixel
shortcut's threat); it has no gradient step, so only poisons that search (``one_pixel``) and the
bound checks take it, and `resolve` refuses it for objectives and evaluators.

The same `LpBall` is passed as ``threat=`` to poisons, objectives (the defender's inner attack)
and evaluators. Objectives and evaluators also take its fields (``norm``, ``epsilon``, ``mask``)
as plain keywords, so a config can stay plain data; `resolve` chooses between the two and has no
default radius: a radius must always be given.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

NORMS = ("linf", "l2")
L0 = "l0"


def _concrete(value):
    """`value` as a float numpy array when it is a concrete number or array (a Python number,
    numpy, or a jax array outside a trace), else None (a tracer under jit/vmap, or a placeholder
    that tree utilities put in a pytree's leaves)."""
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (int, float, np.ndarray, np.generic, jax.Array)):
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.number) or array.dtype == bool:
            return array.astype(np.float64)
    return None


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
            hint = " (the l0 ball is threat.L0Ball)" if self.norm == L0 else ""
            raise ValueError(f"Unknown norm {self.norm!r}: use one of {NORMS}{hint}.")
        # Concrete values (Python or numpy numbers, jax arrays outside a trace) are checked;
        # tracers (an LpBall rebuilt inside jit) cannot be and are not.
        values = _concrete(self.epsilon)
        if values is not None:
            eps = values.item() if values.size == 1 else values
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise ValueError(f"epsilon={eps} is invalid: it must be a finite number >= 0.")
            if self.norm == "linf" and np.any(values > 1):
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


def _pixel_sizes(delta):
    """[N, H*W]: the ℓ2 size over channels of every pixel of `delta` [N, H, W, C]."""
    return jnp.sqrt(jnp.sum(jnp.square(delta), axis=-1)).reshape(delta.shape[0], -1)


def _keep_pixels(scores, k):
    """[N, H*W] 0/1 float: the `k` highest-scoring pixels of each example (ties: lower index)."""
    _, top = jax.lax.top_k(scores, k)
    return jnp.sum(jax.nn.one_hot(top, scores.shape[1], dtype=scores.dtype), axis=1)


@flax.struct.dataclass
class L0Ball:
    """The ℓ0 ball ``{δ : at most `pixels` positions (h, w) with δ[h, w, :] != 0, δ = mask * δ,
    x + δ in [0, 1]}``: a pixel is a position with all its channels (one RGB pixel counts once),
    and a changed pixel may take any value in the box.

    This is the threat of the one-pixel shortcut (``poisons.one_pixel``, Wu et al. 2023). It has
    no steepest-ascent step (`step_direction` refuses), so PGD-based poisons, objectives and
    evaluators refuse it; `project` is the Euclidean projection, so a search may use it.

    Attributes:
      pixels: k, the most pixels of an image that may change (the ball's radius; `epsilon` is
        the same number as a float, for code that records a radius).
      mask: optional array broadcastable to one image (H, W, C), 1 where pixels may move.
      quantize: if True, `project` also rounds `x + delta` to the 8-bit grid (toward `x`).
    """

    pixels: int = flax.struct.field(pytree_node=False, default=1)
    mask: jax.Array | None = None
    quantize: bool = flax.struct.field(pytree_node=False, default=False)

    norm = L0  # a class attribute, not a field: the ℓ0 ball has no other norm

    def __post_init__(self):
        if isinstance(self.pixels, bool) or not isinstance(self.pixels, (int, np.integer)):
            raise ValueError(f"pixels={self.pixels!r} must be a whole number of pixels (>= 0).")
        if self.pixels < 0:
            raise ValueError(f"pixels={self.pixels} is invalid: it must be >= 0.")

    @property
    def epsilon(self):
        """The radius as a float: the pixel count k (what `storage` and the reports record)."""
        return float(self.pixels)

    def _mask(self, delta):
        return delta if self.mask is None else delta * self.mask

    def project(self, delta, x):
        """The Euclidean projection of `delta` onto the ball (mask, then box, then k pixels).

        Each pixel's best value in the box is its clipped delta; keeping pixel p reduces the
        distance by ``||δ_p||² - ||δ_p - clip(δ_p)||²``, so the projection keeps the k pixels
        with the largest such gain (ties: the lower index) and zeros the others.
        """
        delta = self._mask(delta)
        boxed = jnp.clip(x + delta, 0.0, 1.0) - x
        n, h, w, _ = delta.shape
        if self.pixels < h * w:
            gain = jnp.square(_pixel_sizes(delta)) - jnp.square(_pixel_sizes(delta - boxed))
            keep = _keep_pixels(gain, self.pixels).reshape(n, h, w, 1)
            boxed = boxed * keep
        if self.quantize:
            boxed = jnp.trunc(boxed * 255.0 + jnp.sign(boxed) * 1e-3) / 255.0
        return boxed

    def random_init(self, key, x):
        """k distinct random pixels (among those the mask lets move) set to uniform box values."""
        pkey, vkey = jax.random.split(key)
        n, h, w, _ = x.shape
        scores = jax.random.uniform(pkey, (n, h * w))
        if self.mask is not None:
            movable = jnp.any(jnp.broadcast_to(self.mask, x.shape[1:]) != 0, axis=-1)
            scores = jnp.where(movable.reshape(1, -1), scores, -1.0)
        keep = _keep_pixels(scores, min(self.pixels, h * w)).reshape(n, h, w, 1)
        delta = (jax.random.uniform(vkey, x.shape, x.dtype) - x) * keep
        return self.project(delta, x)

    def step_direction(self, g):
        raise ValueError(
            "The l0 ball (threat.L0Ball) has no steepest-ascent step: PGD-based poisons, "
            "objectives and evaluators need an LpBall (norm 'linf' or 'l2')."
        )

    def norm_of(self, delta):
        """Per-example number of changed pixels (positions with any channel != 0), shape (N,)."""
        return jnp.sum(_pixel_sizes(delta) > 0, axis=1).astype(jnp.float32)


def make(*, epsilon=None, norm="linf", mask=None, quantize=False, pixels=None):
    """Builds an `LpBall` (or, with ``norm='l0'``, an `L0Ball`) from config values (a mask may be
    given as a nested list).

    Args:
      epsilon: the ℓ∞ / ℓ2 radius; needed for those norms, refused for ``'l0'``.
      norm: ``'linf'``, ``'l2'`` or ``'l0'``.
      mask, quantize: see `LpBall`.
      pixels: the ℓ0 radius k (pixels per image); needed for ``'l0'``, refused otherwise.

    Raises:
      ValueError: a radius is missing, not a number, or given in the other kind's field; the
        mask lets no pixel move.
    """
    if mask is not None:
        mask = jnp.asarray(mask, jnp.float32)
        if not bool(jnp.any(mask != 0)):
            raise ValueError(
                "the threat's mask is all zeros, so no pixel may move; set 1 where pixels may "
                "change (or give no mask)."
            )
    for name, value in (("epsilon", epsilon), ("pixels", pixels)):
        if value is not None and (
            isinstance(value, (str, bool)) or not hasattr(value, "__float__")
        ):
            raise ValueError(f"{name}={value!r} is not a number; give e.g. epsilon=8/255.")
    if norm == L0:
        if pixels is None or epsilon is not None:
            raise ValueError(
                f"norm='l0' counts changed pixels: give pixels= (e.g. 1) and no epsilon "
                f"(got pixels={pixels}, epsilon={epsilon})."
            )
        if isinstance(pixels, float) and pixels.is_integer():
            pixels = int(pixels)
        return L0Ball(pixels=pixels, mask=mask, quantize=quantize)
    if pixels is not None:
        raise ValueError(
            f"pixels={pixels} is the radius of the l0 ball; norm={norm!r} takes epsilon."
        )
    if epsilon is None:
        raise ValueError(f"norm={norm!r} needs a radius: give epsilon= (e.g. 8/255 for linf).")
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
      ValueError: neither `threat` nor `epsilon` is given, `threat` is not an `LpBall` (an
        `L0Ball` or ``norm='l0'`` included: these factories take gradient steps), or `threat` is
        given together with any of the fields.
    """
    if isinstance(threat, L0Ball) or norm == L0:
        raise ValueError(
            f"{what} needs an l-infinity or l2 ball (its inner attack takes gradient steps); "
            "the l0 ball (norm='l0') is only for poisons that search, such as one_pixel."
        )
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
