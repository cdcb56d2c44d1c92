"""Class-wise synthetic poisons that need no model: random noise (P5), Regions, low-frequency.

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


def random(*, threat, num_classes, image_shape, distribution="uniform"):
    """P5: for each class one fixed random perturbation, uniform in [-ε, ε] per pixel (``uniform``,
    as Tao et al.'s code draws it) or ±ε with equal probability (``sign``)."""
    scale = _scaler(threat)

    def make_delta(key):
        shape = (num_classes, *image_shape)
        if distribution == "uniform":
            d = jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
        elif distribution == "sign":
            d = jnp.where(jax.random.bernoulli(key, 0.5, shape), 1.0, -1.0)
        else:
            raise ValueError(f"distribution must be 'uniform' or 'sign', not {distribution!r}.")
        return scale(d)

    return _static(threat, make_delta)


def patch_grid(num_patches):
    """(rows, cols) of the patch grid for Regions-n: the most square power-of-two split."""
    if num_patches < 1 or num_patches & (num_patches - 1):
        raise ValueError(f"num_patches={num_patches} must be a power of two (1, 2, 4, 16, ...).")
    rows = 2 ** (int(math.log2(num_patches)) // 2)
    return rows, num_patches // rows


def regions(*, threat, num_classes, image_shape, num_patches=4):
    """Regions-n: the image is cut into an n-patch grid; in each class every patch is one fixed
    colour whose channels are ±ε with equal probability."""
    h, w, c = image_shape
    rows, cols = patch_grid(num_patches)
    if rows > h or cols > w:
        raise ValueError(f"{num_patches} patches do not fit a {h}x{w} image.")
    # Pixel -> patch index maps (patch borders as even as integer division allows).
    row_of = np.minimum(np.arange(h) * rows // h, rows - 1)
    col_of = np.minimum(np.arange(w) * cols // w, cols - 1)
    scale = _scaler(threat)

    def make_delta(key):
        colours = jnp.where(jax.random.bernoulli(key, 0.5, (num_classes, rows, cols, c)), 1.0, -1.0)
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
    `frequency`), zero-padded to the image size, inverse-DCT'd, scaled so its ℓ∞ norm is ε."""
    h, w, c = image_shape
    if not 1 <= frequency <= min(h, w):
        raise ValueError(f"frequency={frequency} must be in 1..{min(h, w)}.")
    dh, dw = _idct_matrix(h), _idct_matrix(w)
    scale = _scaler(threat)

    def make_delta(key):
        coef = jax.random.normal(key, (num_classes, frequency, frequency, c))
        coef = jnp.pad(coef, ((0, 0), (0, h - frequency), (0, w - frequency), (0, 0)))
        spatial = jnp.einsum("hk,nklc,wl->nhwc", dh.T, coef, dw.T)
        peak = jnp.max(jnp.abs(spatial), axis=(1, 2, 3), keepdims=True)
        return scale(spatial / jnp.maximum(peak, 1e-12))

    return _static(threat, make_delta)
