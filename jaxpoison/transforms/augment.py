"""Augmentations that APBench and its papers count as defenses, on device and jit-compiled.

* `gaussian_blur`: a k x k Gaussian filter of standard deviation σ, reflect-padded as
  torchvision's ``GaussianBlur`` (APBench: 3 x 3, σ = 0.1), applied once to the training set.
  At σ = 0.1 the off-centre weights are exp(-50) ≈ 2e-22 of the centre's, so APBench's setting
  leaves 8-bit images unchanged; larger σ blurs.
* `cutout` (DeVries & Taylor 2017): a ``length`` x ``length`` square (APBench: 16), centred on a
  uniform random pixel of each image and clipped at the border, set to 0.
* `mixup` (Zhang et al. 2018): x = λ x_i + (1 - λ) x_j with j a random permutation of the batch
  and λ ~ Beta(α, α) per example (α = 1: uniform, as kornia's ``RandomMixUpV2`` of APBench).
* `cutmix` (Yun et al. 2019): a box of x_j pasted into x_i; the box's area fraction 1 - λ with
  λ ~ Beta(α, α), its centre uniform, clipped at the border; the label weight is the area
  actually kept.

`cutout`, `mixup` and `cutmix` run in the training step after the random crop and flip, with
a new draw per example and step: ``fn(key, batch) -> batch``. `mixup` and `cutmix` add
``batch['mix'] = {'label': y_j, 'weight': λ}``; the `erm` objective then trains on
λ CE(f(x), y_i) + (1 - λ) CE(f(x), y_j), APBench's loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _positive(name, field, value, *, integer=False):
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: {field}={value!r} must be {kind}.")


def gaussian_blur(*, kernel_size=3, sigma=0.1):
    """A `kernel_size` x `kernel_size` Gaussian filter of standard deviation `sigma` per channel."""
    _positive("gaussian_blur", "kernel_size", kernel_size, integer=True)
    _positive("gaussian_blur", "sigma", sigma)
    if kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur: kernel_size={kernel_size} must be odd (e.g. 3).")
    half = kernel_size // 2
    t = np.arange(-half, half + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (t / sigma) ** 2)
    weights = jnp.asarray(weights / weights.sum(), jnp.float32)

    def fn(images):
        pad = ((0, 0), (half, half), (half, half), (0, 0))
        x = jnp.pad(images, pad, mode="reflect")
        h, w = images.shape[1:3]
        x = sum(weights[i] * x[:, i : i + h] for i in range(kernel_size))
        return sum(weights[i] * x[:, :, i : i + w] for i in range(kernel_size))

    return fn


def _boxes(key, b, h, w, box_h, box_w):
    """Per-example boolean masks [B, H, W] of boxes of size (box_h, box_w) [B] centred on uniform
    random pixels and clipped at the border."""
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (b, 1, 1), 0, h)
    cx = jax.random.randint(kx, (b, 1, 1), 0, w)
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    bh, bw = box_h[:, None, None], box_w[:, None, None]
    inside_r = (rows >= cy - bh // 2) & (rows < cy + (bh - bh // 2))
    inside_c = (cols >= cx - bw // 2) & (cols < cx + (bw - bw // 2))
    return inside_r & inside_c


def cutout(*, length=16):
    """Zeroes a `length` x `length` square (clipped at the border) of every image."""
    _positive("cutout", "length", length, integer=True)

    def fn(key, batch):
        x = batch["image"]
        b, h, w = x.shape[:3]
        size = jnp.full((b,), length)
        mask = _boxes(key, b, h, w, size, size)
        return dict(batch, image=jnp.where(mask[..., None], 0.0, x))

    return fn


def _partner(key, batch):
    perm = jax.random.permutation(key, batch["label"].shape[0])
    return perm, batch["image"][perm], batch["label"][perm]


def mixup(*, alpha=1.0):
    """Convex combinations of pairs of examples and of their losses, λ ~ Beta(α, α)."""
    _positive("mixup", "alpha", alpha)

    def fn(key, batch):
        perm_key, lam_key = jax.random.split(key)
        _, x_j, y_j = _partner(perm_key, batch)
        lam = jax.random.beta(lam_key, alpha, alpha, batch["label"].shape)
        x = batch["image"]
        mixed = lam[:, None, None, None] * x + (1.0 - lam[:, None, None, None]) * x_j
        return dict(batch, image=mixed, mix={"label": y_j, "weight": lam})

    return fn


def cutmix(*, alpha=1.0):
    """A box of a partner image pasted into each image; the loss weighted by the areas kept."""
    _positive("cutmix", "alpha", alpha)

    def fn(key, batch):
        perm_key, lam_key, box_key = jax.random.split(key, 3)
        _, x_j, y_j = _partner(perm_key, batch)
        x = batch["image"]
        b, h, w = x.shape[:3]
        lam = jax.random.beta(lam_key, alpha, alpha, (b,))
        side = jnp.sqrt(1.0 - lam)
        box_h = jnp.round(side * h).astype(jnp.int32)
        box_w = jnp.round(side * w).astype(jnp.int32)
        mask = _boxes(box_key, b, h, w, box_h, box_w)
        kept = 1.0 - jnp.mean(mask, axis=(1, 2))
        mixed = jnp.where(mask[..., None], x_j, x)
        return dict(batch, image=mixed, mix={"label": y_j, "weight": kept})

    return fn
