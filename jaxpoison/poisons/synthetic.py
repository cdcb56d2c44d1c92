"""Synthetic sample-wise poisons that need no model: linear-separable patches (LSP) and
autoregressive (AR) perturbations.

Both draw one perturbation per training example at `init` (``num_epochs=0``) from a class-wise
generator, so every class carries its own easy-to-learn pattern family (a shortcut), while no
two examples share the exact same noise:

* ``lsp``: per class a Gaussian cluster in a low-dimensional patch space, the clusters at
  distinct vertices of a hypercube (linearly separable); each example's point is upsampled to
  constant-colour patches.
* ``autoregressive``: per class a fixed causal 3x3 AR filter on each channel; each example's
  noise is the AR process run from its own Gaussian start.

Both are natively ℓ2 poisons (each example's δ is scaled to ``||δ||_2 = ε``); with an ℓ∞ threat
each δ is scaled to ``||δ||_∞ = ε`` instead (AR's Appendix A.6 variant; not in the LSP paper).

References:
  Yu, Zhang, Chen, Yin, Liu. "Availability Attacks Create Shortcuts", KDD 2022
  (github.com/dayu11/Availability-Attacks-Create-Shortcuts).
  Sandoval-Segura, Singla, Geiping, Goldblum, Goldstein, Jacobs. "Autoregressive Perturbations
  for Data Poisoning", NeurIPS 2022 (github.com/psandovalsegura/autoregressive-poisoning).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.poisons.base import Poison, SampleWiseState, apply_sample_wise
from jaxpoison.poisons.classwise import _distinct_signs


def _scale_each(threat, delta):
    """Scales every example of `delta` [N, ...] to norm ε in the threat's norm (ℓ2 or ℓ∞)."""
    axes = tuple(range(1, delta.ndim))
    if threat.norm == "linf":
        norm = jnp.max(jnp.abs(delta), axis=axes, keepdims=True)
    else:
        norm = jnp.sqrt(jnp.sum(delta**2, axis=axes, keepdims=True))
    return delta * (threat.epsilon / jnp.maximum(norm, 1e-12))


def lsp(*, threat, num_classes, image_shape, patch_size=8, class_sep=10.0):
    """Linear-separable synthetic patches (LSP): class-clustered, patch-constant noise.

    The image is cut into a ``ceil(H/p) x ceil(W/p)`` grid of p x p patches (p = `patch_size`),
    giving ``d = ceil(H/p) * ceil(W/p) * C`` features (one value per patch and channel). Class k
    gets a distinct vertex ``s_k in {-1, 1}^d`` and a random mixing matrix
    ``A_k ~ U[-1, 1]^{d x d}``; example i of class k draws

        u_i = class_sep * s_k + z_i A_k,   z_i ~ N(0, I_d),

    (sklearn's ``make_classification`` with one cluster per class, as the reference does), is
    upsampled to constant p x p patches (cropped at the bottom/right edge when p does not divide
    the image) and scaled to ``||δ_i|| = ε``. The classes are linearly separable in δ.

    The reference uses p = 8 on 32x32 images and the ℓ2 budget ``sqrt(H W C) * 6/255`` (1.30
    on CIFAR-10, as APBench); pass that as the threat's epsilon.

    Args:
      threat: the `LpBall`; ℓ2 (native) or ℓ∞ (each δ scaled to ℓ∞ norm ε instead).
      num_classes: K.
      image_shape: (H, W, C).
      patch_size: p, the side of a patch in pixels.
      class_sep: half the distance between cluster centres along each feature (the reference's
        ``class_sep=10``; the mixing noise has standard deviation about ``sqrt(d / 3)``).

    Returns:
      A `Poison` with a `SampleWiseState` drawn at `init` (``num_epochs=0``).

    Raises:
      ValueError: `patch_size` is not in 1..min(H, W), or the 2 ** d vertices are fewer than the
        classes.

    References:
      Yu et al., "Availability Attacks Create Shortcuts", KDD 2022.
    """
    h, w, c = image_shape
    if not 1 <= patch_size <= min(h, w):
        raise ValueError(f"lsp: patch_size={patch_size} must be in 1..{min(h, w)} for {h}x{w}.")
    if not class_sep > 0:
        raise ValueError(f"lsp: class_sep={class_sep} must be > 0.")
    grid = (math.ceil(h / patch_size), math.ceil(w / patch_size), c)
    dim = math.prod(grid)
    if 2**dim < num_classes:
        raise ValueError(
            f"lsp: {patch_size}x{patch_size} patches on a {h}x{w}x{c} image give {dim} features, "
            f"whose 2**{dim} cluster centres are fewer than the {num_classes} classes; use a "
            f"smaller patch_size."
        )

    def init(key, dataset):
        labels = dataset["label"]
        vkey, akey, zkey = jax.random.split(key, 3)
        centres = class_sep * _distinct_signs(vkey, num_classes, (dim,))  # [K, d]
        mixing = jax.random.uniform(akey, (num_classes, dim, dim), minval=-1.0, maxval=1.0)
        z = jax.random.normal(zkey, (labels.shape[0], dim))

        # One class at a time keeps memory O(N d) (gathering A[y] would be O(N d^2)).
        def add_class(k, u):
            return jnp.where((labels == k)[:, None], centres[k] + z @ mixing[k], u)

        u = jax.lax.fori_loop(0, num_classes, add_class, jnp.zeros_like(z))
        patches = u.reshape(-1, *grid)
        delta = jnp.repeat(jnp.repeat(patches, patch_size, axis=1), patch_size, axis=2)
        return SampleWiseState(delta=_scale_each(threat, delta[:, :h, :w]))

    return Poison(init=init, update=None, apply=apply_sample_wise(threat), num_epochs=0)


def ar_generate(coefficients, start):
    """Runs causal 3x3 autoregressive processes over `start`, one per channel, in raster order.

    Every pixel from row 2 and column 2 on is replaced, top-left to bottom-right, by the
    weighted sum of the 8 pixels before it in its 3x3 window (the pixel is the window's
    bottom-right corner):

        x[r, c] = sum_{a, b in 0..2, (a, b) != (2, 2)} B[a, b] * x[r - 2 + a, c - 2 + b],

    so only rows 0-1 and columns 0-1 keep their start values. A row needs the two finished rows
    above it (a 2x3 correlation, vectorised) and its own two previous pixels (an order-2 linear
    recurrence, a scan over columns).

    Args:
      coefficients: [C, 3, 3] (the same processes for every signal) or [B, C, 3, 3] (one set per
        signal); the bottom-right entries are ignored (taken as 0).
      start: [B, H, W, C] start signals, H, W >= 3.

    Returns:
      [B, H, W, C], the processes' outputs.
    """
    num, _, width, channels = start.shape
    b = jnp.broadcast_to(coefficients, (num, channels, 3, 3))

    def row_step(above, row):
        r2, r1 = above  # the two finished rows above, [B, W, C]
        drive = sum(
            b[:, None, :, 0, j] * r2[:, j : width - 2 + j]
            + b[:, None, :, 1, j] * r1[:, j : width - 2 + j]
            for j in range(3)
        )  # [B, W - 2, C]

        def col_step(prev, d):
            y2, y1 = prev
            y = d + b[:, :, 2, 0] * y2 + b[:, :, 2, 1] * y1
            return (y1, y), y

        _, ys = jax.lax.scan(col_step, (row[:, 0], row[:, 1]), jnp.moveaxis(drive, 1, 0))
        new = jnp.concatenate([row[:, :2], jnp.moveaxis(ys, 0, 1)], axis=1)
        return (r1, new), new

    _, rows = jax.lax.scan(row_step, (start[:, 0], start[:, 1]), jnp.moveaxis(start[:, 2:], 1, 0))
    return jnp.concatenate([start[:, :2], jnp.moveaxis(rows, 0, 1)], axis=1)


def _residual_response(coefficients, patterns):
    """The reference's response of AR filters to patterns: ``sum ReLU(conv(f, p))`` with f the
    filters (coefficients, -1 at the bottom-right) summed over channels; zero for a pattern of
    the filter's own process.

    Args:
      coefficients: [K, C, 3, 3]; patterns: [M, H, W, C], each of ℓ2 norm 1.

    Returns:
      [K, M] responses (float64, numpy).
    """
    f = np.array(coefficients, np.float64)
    f[:, :, 2, 2] = -1.0
    windows = np.lib.stride_tricks.sliding_window_view(
        np.asarray(patterns, np.float64), (3, 3), (1, 2)
    )
    residual = np.einsum("kcab,mhwcab->kmhw", f, windows)
    return np.maximum(residual, 0.0).sum(axis=(2, 3))


@functools.lru_cache(maxsize=16)
def ar_coefficients(
    *,
    num_classes,
    image_shape,
    crop=4,
    seed=0,
    min_response=10.0,
    num_draws=8192,
    num_trials=3,
    max_rms=1.5,
    min_rms=1e-3,
):
    """K class AR processes found by the reference's kind of search, degenerate draws refused.

    A channel's coefficients are 8 standard normals (the bottom-right entry 0) divided by their
    sum, so that they sum to 1. Dividing by a sum near 0 makes them huge, and many draws
    diverge (outputs up to 1e40, or NaN); an unchecked NaN class is blacked out, a bug of the
    reference's coefficients that APBench records. A draw is therefore kept only if, from
    `num_trials` Gaussian starts of size (H + crop) x (W + crop), its cropped outputs are finite
    with an RMS in [min_rms, max_rms] (``max_rms=1.5``: about the reference's bound, ℓ2 norm 50
    on a 32x32 output). The kept channels are sorted by coefficient norm, largest first (their
    residual filters respond most strongly to other processes: the reference's search over 10^6
    draws keeps such filters), and taken C at a time as a class; a class is accepted if each
    accepted class's residual filter responds to its ℓ2-normalised trial patterns by at least

        min_response * sqrt(H W C / 3072)

    on average (`_residual_response`; the reference requires 10 at 32x32x3 for 10 classes, 3 for
    100; the response of unit-norm patterns grows as sqrt(H W C), hence the scaling).

    Args:
      num_classes: K.
      image_shape: (H, W, C), H, W >= 3.
      crop: rows and columns dropped at the top-left (the reference: 4 on CIFAR), >= 2 so that
        every kept pixel comes from the process, not from the start.
      seed: the seed of the search (the coefficients are the poison's fixed definition, as the
        reference's published ones, not drawn from the run's key).
      min_response: the required separation between classes, at the 32x32x3 scale.
      num_draws: candidate channels drawn (in rounds of 1,024).
      num_trials, max_rms, min_rms: the stability test above.

    Returns:
      float32 numpy array [K, C, 3, 3] with entries [:, :, 2, 2] = 0 and each channel summing to 1.

    Raises:
      ValueError: the image is too small, `crop` < 2, or fewer than K processes pass the tests
        (lower `min_response` or raise `num_draws`).
    """
    h, w, c = image_shape
    if min(h, w) < 3:
        raise ValueError(f"autoregressive: {h}x{w} images are too small for 3x3 AR filters.")
    if crop < 2:
        raise ValueError(f"autoregressive: crop={crop} must be >= 2 (rows 0-1 are the start).")
    generate = jax.jit(ar_generate)
    key = jax.random.key(seed)
    stable = []  # (coefficients [3, 3], trial outputs [T, H, W]) of the kept channels
    for round_ in range(math.ceil(num_draws / 1024)):
        bkey, skey = jax.random.split(jax.random.fold_in(key, round_))
        raw = jax.random.normal(bkey, (1024, 3, 3)).at[:, 2, 2].set(0.0)
        cand = np.asarray(raw / jnp.sum(raw, axis=(1, 2), keepdims=True))
        # The candidates are the channels of `num_trials` signals.
        start = jax.random.normal(skey, (num_trials, h + crop, w + crop, 1024))
        out = np.asarray(generate(cand, start), np.float64)[:, crop:, crop:]
        with np.errstate(all="ignore"):
            rms = np.sqrt(np.mean(np.square(out), axis=(1, 2)))  # [T, 1024]
            ok = np.all(np.isfinite(rms) & (rms >= min_rms) & (rms <= max_rms), axis=0)
        ok &= np.all(np.isfinite(cand), axis=(1, 2))
        stable += [(cand[i], out[..., i]) for i in np.flatnonzero(ok)]
    stable.sort(key=lambda channel: -np.sum(channel[0] ** 2))
    threshold = min_response * math.sqrt(h * w * c / 3072)
    coefs = []
    for first in range(0, len(stable) - c + 1, c):
        coef = np.stack([f for f, _ in stable[first : first + c]])  # [C, 3, 3]
        pattern = np.stack([p for _, p in stable[first : first + c]], axis=-1)  # [T, H, W, C]
        pattern /= np.sqrt(np.sum(pattern**2, axis=(1, 2, 3), keepdims=True))
        if coefs and _residual_response(np.stack(coefs), pattern).mean(axis=1).min() < threshold:
            continue
        coefs.append(coef)
        if len(coefs) == num_classes:
            return np.stack(coefs).astype(np.float32)
    raise ValueError(
        f"autoregressive: found only {len(coefs)} of {num_classes} distinct stable AR processes "
        f"for {h}x{w}x{c} images (min_response={min_response}, {num_draws} draws); lower "
        f"min_response or raise num_draws."
    )


def autoregressive(
    *,
    threat,
    num_classes,
    image_shape,
    crop=4,
    coefficient_seed=0,
    min_response=10.0,
    num_draws=8192,
):
    """Autoregressive (AR) perturbations: per class a fixed 3x3 AR process on each channel,
    run from a fresh Gaussian start for every example.

    Class k has coefficients ``B_k[c]`` (3x3, bottom-right entry 0, summing to 1; see
    `ar_coefficients`). Example i draws ``x ~ N(0, I)`` of size (H + crop) x (W + crop) x C,
    runs `ar_generate`, drops the first `crop` rows and columns and scales the result to
    ``||δ_i|| = ε``. The process's residual filter (``B_k`` with -1 at the bottom-right)
    annihilates its own class's noise and responds to every other class's: a 3x3 convolution,
    which a network learns at once, separates the classes.

    The reference uses the ℓ2 budget ε = 1 on CIFAR-10 (as APBench) and crop 4.

    Args:
      threat: the `LpBall`; ℓ2 (native) or ℓ∞ (each δ scaled to ℓ∞ norm ε, the paper's A.6).
      num_classes: K.
      image_shape: (H, W, C), H, W >= 3, any number of channels.
      crop: rows and columns of the process dropped at the top-left, >= 2.
      coefficient_seed: the seed of the coefficient search (`ar_coefficients`; fixed per poison,
        not per run, so every seed of a run shares the processes as the reference's do).
      min_response, num_draws: the search's class separation and size (`ar_coefficients`).

    Returns:
      A `Poison` with a `SampleWiseState` (``delta`` [N, H, W, C], ``extra`` the coefficients
      [K, C, 3, 3]) drawn at `init` (``num_epochs=0``).

    Raises:
      ValueError: see `ar_coefficients`.

    References:
      Sandoval-Segura et al., "Autoregressive Perturbations for Data Poisoning", NeurIPS 2022.
    """
    h, w, c = image_shape
    coefficients = ar_coefficients(
        num_classes=num_classes,
        image_shape=tuple(image_shape),
        crop=crop,
        seed=coefficient_seed,
        min_response=min_response,
        num_draws=num_draws,
    )

    def init(key, dataset):
        labels = dataset["label"]
        start = jax.random.normal(key, (labels.shape[0], h + crop, w + crop, c))
        noise = ar_generate(jnp.asarray(coefficients)[labels], start)
        delta = _scale_each(threat, noise[:, crop:, crop:])
        return SampleWiseState(delta=delta, extra=jnp.asarray(coefficients))

    return Poison(init=init, update=None, apply=apply_sample_wise(threat), num_epochs=0)
