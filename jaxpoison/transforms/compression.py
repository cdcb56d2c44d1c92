"""Image Shortcut Squeezing (Liu, Zhao & Larson, ICML 2023): compress the training images so that
a small perturbation does not survive, then train as usual.

* `grayscale`: luma Y = 0.299 R + 0.587 G + 0.114 B, copied to every channel (torchvision's
  ``Grayscale(3)``, ITU-R 601-2); it removes class-wise colour patterns.
* `bit_depth`: keep the top ``bits`` bits of each 8-bit value (torchvision's ``RandomPosterize``
  with p = 1, APBench's ``bdr``: 2 bits, values {0, 64, 128, 192} / 255).
* `jpeg`: baseline JPEG encode + decode at a quality in [1, 100] (the IJG quantisation tables
  scaled as libjpeg does, 4:2:0 chroma subsampling as Pillow's default, "fancy" triangle
  upsampling as libjpeg's decoder), written in `jax.numpy` so it is jit-compiled and runs on the
  device. ``differentiable=True`` passes gradients through every rounding (straight-through), for
  attacks that must see the defense.

Each factory returns ``fn(images) -> images`` on float images [B, H, W, C] in [0, 1], applied
once to the training set (APBench applies them before cropping, as the first transforms). The
images are read as 8-bit values first (``round(255 x)``), as the reference code does with PIL.

References:
  Liu, Zhao, Larson. "Image Shortcut Squeezing: Countering Perturbative Availability Poisons
  with Compression." ICML 2023.
  ITU-T T.81 (JPEG), Annex K: the example quantisation tables; IJG libjpeg: quality scaling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ITU-T T.81 Annex K, tables K.1 (luminance) and K.2 (chrominance).
_LUMA_TABLE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    np.float32,
)
_CHROMA_TABLE = np.full((8, 8), 99, np.float32)
_CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def _round(x, straight_through):
    """Rounding; with `straight_through` its gradient is the identity's."""
    if straight_through:
        return x + jax.lax.stop_gradient(jnp.round(x) - x)
    return jnp.round(x)


def _to_8bit(images, straight_through):
    return jnp.clip(_round(images * 255.0, straight_through), 0.0, 255.0)


def grayscale():
    """The luma of each image in every channel (one-channel images are returned unchanged)."""

    def fn(images):
        if images.shape[-1] == 1:
            return images
        luma = images[..., :3] @ jnp.asarray([0.299, 0.587, 0.114], images.dtype)
        return jnp.broadcast_to(luma[..., None], images.shape)

    return fn


def bit_depth(*, bits=2):
    """Keeps the `bits` most significant bits of each 8-bit value (APBench: 2)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit_depth: bits={bits!r} must be an integer in 1..8 (APBench uses 2).")
    step = 2.0 ** (8 - bits)

    def fn(images):
        return jnp.floor(_to_8bit(images, False) / step) * step / 255.0

    return fn


def quantization_tables(quality):
    """The (luminance, chrominance) tables libjpeg uses at `quality` (1..100), baseline-clipped."""
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    tables = [np.floor((t * scale + 50.0) / 100.0) for t in (_LUMA_TABLE, _CHROMA_TABLE)]
    return tuple(np.clip(t, 1.0, 255.0).astype(np.float32) for t in tables)


def _dct_matrix():
    """The orthonormal 8-point DCT-II matrix D: coefficients = D block Dᵀ."""
    k, i = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    d = np.cos((2 * i + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)


def _pad_to(plane, multiple):
    """Pads [N, H, W] to multiples of `multiple` by repeating the last row / column (libjpeg)."""
    h, w = plane.shape[1:]
    ph, pw = -h % multiple, -w % multiple
    return jnp.pad(plane, ((0, 0), (0, ph), (0, pw)), mode="edge") if ph or pw else plane


def _code_plane(plane, table, straight_through):
    """Level shift, 8x8 DCT, quantise / dequantise, inverse DCT of [N, H, W] (H, W % 8 == 0)."""
    n, h, w = plane.shape
    d = jnp.asarray(_dct_matrix())
    blocks = (plane - 128.0).reshape(n, h // 8, 8, w // 8, 8)
    coef = jnp.einsum("ki,nbiwj,lj->nbkwl", d, blocks, d)
    q = jnp.asarray(table)[None, None, :, None, :]
    coef = _round(coef / q, straight_through) * q
    blocks = jnp.einsum("ki,nbkwl,lj->nbiwj", d, coef, d)
    return blocks.reshape(n, h, w) + 128.0


def _downsample(plane):
    """2x2 box average of [N, H, W] (H, W even)."""
    n, h, w = plane.shape
    return plane.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _upsample_axis(plane, axis):
    """libjpeg's 'fancy' upsampling along `axis`: output 2i = (3 c[i] + c[i-1]) / 4 and 2i + 1 =
    (3 c[i] + c[i+1]) / 4, the edge sample repeated."""
    size = plane.shape[axis]
    prev = jnp.concatenate(
        [
            jax.lax.slice_in_dim(plane, 0, 1, axis=axis),
            jax.lax.slice_in_dim(plane, 0, size - 1, axis=axis),
        ],
        axis=axis,
    )
    nxt = jnp.concatenate(
        [
            jax.lax.slice_in_dim(plane, 1, size, axis=axis),
            jax.lax.slice_in_dim(plane, size - 1, size, axis=axis),
        ],
        axis=axis,
    )
    even, odd = 0.75 * plane + 0.25 * prev, 0.75 * plane + 0.25 * nxt
    stacked = jnp.stack([even, odd], axis=axis + 1)
    shape = list(plane.shape)
    shape[axis] *= 2
    return stacked.reshape(shape)


def jpeg(*, quality=10, differentiable=False):
    """Baseline JPEG compression and decompression at `quality` (APBench / ISS: 10).

    Args:
      quality: the libjpeg / Pillow quality, an integer in 1..100.
      differentiable: pass gradients through the roundings (straight-through estimator);
        otherwise the output is piecewise constant in the input and its gradient is zero.
    """
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(
            f"jpeg: quality={quality!r} must be an integer in 1..100 (APBench and ISS use 10)."
        )
    luma_q, chroma_q = quantization_tables(quality)

    def fn(images):
        return jpeg_codec(images, luma_q, chroma_q, differentiable=differentiable)

    return fn


def jpeg_codec(images, luma_q, chroma_q, *, differentiable=False):
    """JPEG encode + decode of [N, H, W, C] images in [0, 1] with the given (luminance,
    chrominance) quantisation tables [8, 8], which may be traced (a quality drawn per example:
    vmap this over examples and their tables). `jpeg` is this at the tables of one quality."""
    st = bool(differentiable)
    n, h, w, c = images.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg: images with {c} channels; JPEG codes 1 (gray) or 3 (RGB).")
    x = _to_8bit(images, st)
    if c == 1:
        y = _code_plane(_pad_to(x[..., 0], 8), luma_q, st)[:, :h, :w]
        return jnp.clip(_round(y, st), 0.0, 255.0)[..., None] / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    y, cb, cr = (jnp.clip(_round(p, st), 0.0, 255.0) for p in (y, cb, cr))
    y = _code_plane(_pad_to(y, 16), luma_q, st)
    chroma = []
    for p in (cb, cr):
        small = _code_plane(_pad_to(_downsample(_pad_to(p, 16)), 8), chroma_q, st)
        small = jnp.clip(_round(small, st), 0.0, 255.0)
        hs, ws = -(-h // 2), -(-w // 2)
        chroma.append(_upsample_axis(_upsample_axis(small[:, :hs, :ws], 1), 2))
    y = jnp.clip(_round(y, st), 0.0, 255.0)[:, :h, :w]
    cb, cr = (p[:, :h, :w] - 128.0 for p in chroma)
    rgb = jnp.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], axis=-1)
    return jnp.clip(_round(rgb, st), 0.0, 255.0) / 255.0
