"""Class-wise synthetic poisons that need no model: random noise (P5), Regions, low-frequency.

Every class gets its own pattern, and the patterns are guaranteed pairwise distinct: sign
patterns (Regions, P5 with ``distribution='sign'``) are drawn uniformly among the distinct
assignments, and a configuration with fewer possible patterns than classes is refused. Continuous
draws (P5 ``uniform``, low-frequency with more than one coefficient) coincide with probability 0.

References:
  Tao et al. 2021, "Better Safe Than Sorry" (P5: one random perturbation per class).
  Sandoval-Segura et al. 2022, "Poisons that are learned faster are more effective" (Regions-n,
  low-frequency DCT noise).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.poisons.base import ClassWiseState, Poison, apply_class_wise


def _static(threat, make_delta):
    """A poison whose class patterns are drawn once at `init` and never updated."""

    def init(key, dataset):
        del dataset
        return ClassWiseState(class_delta=make_delta(key))

    return Poison(init=init, update=None, apply=apply_class_wise(threat), num_epochs=0)


def _scaler(threat):
    """Patterns are drawn with ℓ∞ norm 1: scale them by ε for ℓ∞, to ℓ2 norm ε for ℓ2."""
    if threat.norm == "linf":
        return lambda d: d * threat.epsilon
    return lambda d: (
        d
        * threat.epsilon
        / jnp.maximum(jnp.sqrt(jnp.sum(d**2, axis=(1, 2, 3), keepdims=True)), 1e-12)
    )


def _num_distinct(num_bits, num_classes):
    """(whether `num_classes` distinct patterns of `num_bits` signs exist, the probability that
    as many independent uniform draws are pairwise distinct)."""
    total = 2**num_bits  # a Python int: exact for any size
    p = 1.0
    for i in range(min(num_classes, total + 1)):
        p *= 1.0 - i / total
    return total >= num_classes, p


def _distinct_signs(key, num_classes, shape):
    """``num_classes`` pairwise distinct ±1 patterns of `shape`, uniformly among such tuples.

    The first draw is ``bernoulli(key, 0.5, (num_classes, *shape))``; a draw with a repeated
    pattern is redrawn with ``fold_in(key, attempt)`` (rejection keeps the distribution uniform,
    and leaves every collision-free first draw as it was). When collisions are likely (fewer than
    2 ** 20 patterns, at most 1% of draws distinct), the patterns are instead the bits of
    `num_classes` codes sampled without replacement, the same distribution at a bounded cost.
    """
    num_bits = math.prod(shape)
    _, p_distinct = _num_distinct(num_bits, num_classes)
    if p_distinct < 0.01 and num_bits <= 20:
        codes = jax.random.choice(key, 2**num_bits, (num_classes,), replace=False)
        bits = (codes[:, None] >> jnp.arange(num_bits)) & 1
        return jnp.where(bits == 1, 1.0, -1.0).reshape(num_classes, *shape)

    def repeated(carry):
        flat = carry[1].reshape(num_classes, -1)
        same = jnp.all(flat[:, None] == flat[None], axis=-1)
        return jnp.any(same & ~jnp.eye(num_classes, dtype=bool))

    def redraw(carry):
        attempt = carry[0] + 1
        return attempt, jax.random.bernoulli(jax.random.fold_in(key, attempt), 0.5, bits.shape)

    bits = jax.random.bernoulli(key, 0.5, (num_classes, *shape))
    _, bits = jax.lax.while_loop(repeated, redraw, (0, bits))
    return jnp.where(bits, 1.0, -1.0)


def _shared_signs(key, num_classes, shape):
    """``num_classes`` ±1 patterns of `shape` when there are fewer patterns than classes: every
    pattern once, in random order, then again, until each class has one."""
    num_bits = math.prod(shape)
    repeats = -(-num_classes // 2**num_bits)
    keys = jax.random.split(key, repeats)
    codes = jnp.concatenate([jax.random.permutation(k, 2**num_bits) for k in keys])[:num_classes]
    bits = (codes[:, None] >> jnp.arange(num_bits)) & 1
    return jnp.where(bits == 1, 1.0, -1.0).reshape(num_classes, *shape)


def random(*, threat, num_classes, image_shape, distribution="uniform"):
    """P5: for each class one fixed random perturbation, uniform in [-ε, ε] per pixel (``uniform``,
    as Tao et al.'s code draws it) or ±ε with equal probability (``sign``, distinct per class)."""
    if distribution not in ("uniform", "sign"):
        raise ValueError(f"distribution must be 'uniform' or 'sign', not {distribution!r}.")
    if distribution == "sign" and not _num_distinct(math.prod(image_shape), num_classes)[0]:
        raise ValueError(
            f"random: {tuple(image_shape)} images allow only 2**{math.prod(image_shape)} sign "
            f"patterns, fewer than the {num_classes} classes; use distribution='uniform'."
        )
    scale = _scaler(threat)

    def make_delta(key):
        if distribution == "uniform":
            d = jax.random.uniform(key, (num_classes, *image_shape), minval=-1.0, maxval=1.0)
        else:
            d = _distinct_signs(key, num_classes, tuple(image_shape))
        return scale(d)

    return _static(threat, make_delta)


def patch_grid(num_patches):
    """(rows, cols) of the patch grid for Regions-n: the most square power-of-two split."""
    if num_patches < 1 or num_patches & (num_patches - 1):
        raise ValueError(f"num_patches={num_patches} must be a power of two (1, 2, 4, 16, ...).")
    rows = 2 ** (int(math.log2(num_patches)) // 2)
    return rows, num_patches // rows


def regions(*, threat, num_classes, image_shape, num_patches=4, distinct=True):
    """Regions-n: the image is cut into an n-patch grid; in each class every patch is one fixed
    colour whose channels are ±ε with equal probability, no two classes with the same pattern.

    With fewer sign patterns than classes (Regions-1 on CIFAR-10: 2 ** 3 = 8 colours for 10
    classes, as in Sandoval-Segura et al.) ``distinct=False`` accepts shared patterns: every
    pattern is used, each by at most ceil(K / 2 ** (n * C)) classes.

    Raises:
      ValueError: the patches do not fit the image, or (with `distinct`) the
        2 ** (num_patches * channels) sign patterns are fewer than the classes (e.g. Regions-2
        on one channel for 10 classes).
    """
    h, w, c = image_shape
    rows, cols = patch_grid(num_patches)
    if rows > h or cols > w:
        raise ValueError(f"{num_patches} patches do not fit a {h}x{w} image.")
    enough_patterns = _num_distinct(num_patches * c, num_classes)[0]
    if distinct and not enough_patterns:
        enough = next(2**k for k in range(64) if 2 ** (2**k * c) >= num_classes)
        raise ValueError(
            f"regions: num_patches={num_patches} on {c} channel(s) gives only "
            f"2**{num_patches * c} distinct patterns, fewer than the {num_classes} classes; "
            f"use num_patches >= {enough}, or distinct=False to let classes share patterns."
        )
    # Pixel -> patch index maps (patch borders as even as integer division allows).
    row_of = np.minimum(np.arange(h) * rows // h, rows - 1)
    col_of = np.minimum(np.arange(w) * cols // w, cols - 1)
    scale = _scaler(threat)

    def make_delta(key):
        if enough_patterns:
            colours = _distinct_signs(key, num_classes, (rows, cols, c))
        else:
            colours = _shared_signs(key, num_classes, (rows, cols, c))
        return scale(colours[:, row_of][:, :, col_of])

    return _static(threat, make_delta)


def _idct_matrix(n):
    """Orthonormal DCT-II matrix D (n x n); the inverse DCT of coefficients a is D.T @ a."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return jnp.asarray(d, jnp.float32)


def low_frequency(*, threat, num_classes, image_shape, frequency=4):
    """Low-frequency DCT noise: per class an n x n x C block of Gaussian DCT coefficients (n =
    `frequency`), zero-padded to the image size, inverse-DCT'd, scaled so its ℓ∞ norm is ε.

    With a single coefficient (frequency 1 on one channel) every pattern is ±ε everywhere: only
    two exist, so that case is refused for more than one class.
    """
    h, w, c = image_shape
    if not 1 <= frequency <= min(h, w):
        raise ValueError(f"frequency={frequency} must be in 1..{min(h, w)}.")
    if frequency * frequency * c == 1 and num_classes > 1:
        raise ValueError(
            f"low_frequency: frequency=1 on 1 channel makes every class pattern a constant ±ε "
            f"image, so the {num_classes} classes cannot all differ; use frequency >= 2."
        )
    dh, dw = _idct_matrix(h), _idct_matrix(w)
    scale = _scaler(threat)

    def make_delta(key):
        coef = jax.random.normal(key, (num_classes, frequency, frequency, c))
        coef = jnp.pad(coef, ((0, 0), (0, h - frequency), (0, w - frequency), (0, 0)))
        spatial = jnp.einsum("hk,nklc,wl->nhwc", dh.T, coef, dw.T)
        peak = jnp.max(jnp.abs(spatial), axis=(1, 2, 3), keepdims=True)
        return scale(spatial / jnp.maximum(peak, 1e-12))

    return _static(threat, make_delta)
