"""UEraser's augmentations in JAX: plasma brightness / contrast, channel shuffle, TrivialAugment.

UEraser (Qin et al. 2023) trains on images passed through kornia's

    RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), p=1)
    RandomPlasmaContrast(roughness=(0.3, 0.7), p=1)
    RandomChannelShuffle(p=0.5)
    TrivialAugment()

(APBench's ``defense/ueraser.py``; its ``UEraser_jpeg`` for TAP and AR first JPEG-compresses at
a random quality in 10..99 and applies the plasma ops with p = 0.8). Every function here takes
a batch of float images ``[B, H, W, C]`` in [0, 1] and a key, draws its parameters per example,
is jit-able and vectorised over the batch (no Python loop over examples), and returns images of
the same shape in [0, 1].

* `plasma_fractal`: kornia's diamond-square fractal (``kornia.contrib.diamond_square``, after
  TorMentor), ported operation by operation: a 3 x m seed, then ``depth`` doublings in which a
  new point is ``(1 - s) * (mean of its 4 neighbours) + s * u``, u ~ U[0, 1), s = roughness^level;
  the neighbour means are kornia's ``filter2d`` (reflect padding) and the edge points of the
  square step are scaled by 4/3 as kornia's ``pad_compencate`` does. The maps are not normalised
  (kornia's plasma ops call it without ``normalize_range``): values are >= 0 with mean 0.40
  (roughness 0.1) to 0.50 (0.7); the border's 4/3 factor takes under 0.5 % of them above 1 (at
  most 1.43 in 2,000 32x32 maps). Larger roughness gives a rougher map. One map per example and
  channel.
* `plasma_brightness`: ``x + intensity * (2 map - 1)``; `plasma_contrast`:
  ``(x - 0.5) * 4 map + 0.5``; both clipped to [0, 1].
* `channel_shuffle`: a random permutation of the channels.
* `trivial_augment`: one op per example, chosen uniformly from kornia's ``TrivialAugment``
  default policy, with kornia's magnitude ranges (below).
* `random_jpeg`: JPEG (`compression`) at a random quality per example.
* `ueraser`: the whole chain.

kornia's TrivialAugment policy, as its ``auto.rand_augment.ops`` builds it (m ~ U(lo, hi) per
example):

==============  ==========================================================================
auto_contrast   per channel (x - min) / (max - min)
equalize        per channel histogram equalisation of the 8-bit values (PIL / torchvision)
rotate          angle m ∈ [0, 30] degrees about the centre, bilinear, zeros outside
posterize       keep the top floor(m) bits, m ∈ [0, 4) (0 bits: a black image, as kornia)
solarize        x ↦ 1 - x where x >= m, m ∈ [0, 1]
contrast        clip(m x), m ∈ [0.1, 1.9] (kornia's contrast is multiplicative)
brightness      clip(x + m - 1), m ∈ [0.1, 1.9]
sharpness       blend with the 3 x 3 smoothed image (centre 5, others 1, / 13), factor m ∈
                [0.1, 1.9], the border pixels kept
shear_x / _y    shear factor tan(π m), m ∈ [0, 0.3], about the centre
translate_x/_y  m W (or m H) pixels, m ∈ [0, 0.5]
==============  ==========================================================================

The "symmetric" ops (rotate, shear, translate) multiply m by a Bernoulli(0.5) draw in {0, 1}
(kornia's ``OperationBase._random_flip``, unchanged since kornia 0.6.10 introduced it): half of
them are the identity and the other half turn one way, never the other. This is what APBench
ran and is kept. Differences from kornia: the op is drawn per example (kornia draws one op for
the whole batch per call); the plasma seed's corners use one uniform draw where kornia draws
twice (the same distribution); equalisation bins ``round(255 x)``.

References:
  Qin, Chen, Wang, Tan, Li, Zhu. "Learning the Unlearnable: Adversarial Augmentations Suppress
  Unlearnable Example Attacks." arXiv:2303.15127, 2023 (code: lafeat/ueraser; APBench).
  Müller, Hutter. "TrivialAugment: Tuning-free Yet State-of-the-Art Data Augmentation." ICCV 2021.
  Castro, Anguelos et al. "TorMentor: Deterministic dynamic-path, data augmentations with
  fractals." 2022 (the plasma fractal).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.transforms import compression

# kornia's TrivialAugment default policy, in its order.
TRIVIAL_AUGMENT_OPS = (
    "auto_contrast",
    "equalize",
    "rotate",
    "posterize",
    "solarize",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_COLOR_OPS = TRIVIAL_AUGMENT_OPS[:2] + TRIVIAL_AUGMENT_OPS[3:8]
_GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

# The JPEG qualities of UEraser_jpeg (Python's random.randrange(10, 100)).
JPEG_QUALITIES = (10, 100)


def _plasma_sizes(h, w):
    """kornia's recursion depth and seed size (rows, cols) for an H x W map."""
    if h < 3 or w < 3:
        raise ValueError(f"plasma: images of {h}x{w} pixels; the fractal needs at least 3x3.")
    p2h = 2 ** math.ceil(math.log2(h - 1)) + 1
    p2w = 2 ** math.ceil(math.log2(w - 1)) + 1
    depth = int(min(math.log2(p2h - 1) - 1, math.log2(p2w - 1) - 1))
    return depth, (p2h - 1) // 2**depth + 1, (p2w - 1) // 2**depth + 1


def _plasma_seed(u):
    """kornia's ``_diamond_square_seed`` on uniforms ``u`` [N, 3, m] (m odd)."""
    r = u
    r = r.at[:, 1, 1::2].set((r[:, 0, :-2:2] + r[:, 2, :-2:2] + r[:, 0, 2::2] + r[:, 2, 2::2]) / 4)
    corner = r[:, 2, 0]
    r = r.at[:, 1, 0].set(r[:, 0, 0] + r[:, 1, 1] + corner)
    r = r.at[:, 1, -1].set(r[:, -1, -1] + r[:, 1, -2] + corner)
    middle = r[:, 1, 1::2]
    r = r.at[:, 0, 1::2].set(r[:, 0, :-2:2] + r[:, 0, 2::2] + middle)
    r = r.at[:, 2, 1::2].set(r[:, 2, :-2:2] + r[:, 2, 2::2] + middle)
    return r / 3.0


def _neighbour_mean(x, diagonal):
    """kornia's ``filter2d`` (reflect padding) of [N, H, W] with the diamond (`diagonal`) or
    square 3 x 3 kernel of four 0.25 weights."""
    p = jnp.pad(x, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    h, w = x.shape[1:]
    if diagonal:
        parts = (p[:, :h, :w], p[:, :h, 2:], p[:, 2:, :w], p[:, 2:, 2:])
    else:
        parts = (p[:, :h, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :w], p[:, 1:-1, 2:])
    return 0.25 * sum(parts)


def _interleave_zeros(x, axis):
    """Zeros between the entries of `x` along `axis` (size n -> 2n - 1); a reshape, not a
    scatter, which is slow on CPU."""
    stacked = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] *= 2
    return jax.lax.slice_in_dim(stacked.reshape(shape), 0, 2 * x.shape[axis] - 1, axis=axis)


def _diamond_square_step(img, u, scale):
    """kornia's ``_one_diamond_one_square``: [N, h, w] -> [N, 2h - 1, 2w - 1]; `u` the new
    level's uniforms, `scale` [N] its randomness."""
    n, h, w = img.shape
    s = scale[:, None, None]
    new = _interleave_zeros(_interleave_zeros(img, 2), 1)
    edge = np.ones(new.shape[1:], np.float32)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = 1 / 0.75
    noise = u * s
    diamond = _neighbour_mean(new, diagonal=True)
    centres = (diamond > 0).astype(img.dtype)
    new = new + (1 - s) * diamond * centres + centres * noise
    square = _neighbour_mean(new, diagonal=False) * edge
    centres = (square > 0).astype(img.dtype)
    return new + centres * noise + (1 - s) * centres * square


def _plasma_from_uniforms(uniforms, roughness, shape):
    """The fractal from its uniform draws: ``uniforms[0]`` the seed's [N, 3, m], then one
    [N, rows, cols] per level; `roughness` [N]."""
    h, w = shape
    depth, _, seed_w = _plasma_sizes(h, w)
    img = _plasma_seed(uniforms[0])
    if seed_w == 3:
        # kornia builds the seed as 3 x m and transposes it when its width is 3 (square too).
        img = jnp.swapaxes(img, 1, 2)
    scale = jnp.ones_like(roughness)
    for level in range(depth):
        scale = scale * roughness
        img = _diamond_square_step(img, uniforms[level + 1], scale)
    return img[:, :h, :w]


def _plasma_uniform_shapes(n, h, w):
    depth, seed_h, seed_w = _plasma_sizes(h, w)
    shapes = [(n, 3, seed_h if seed_w == 3 else seed_w)]
    rows, cols = seed_h, seed_w
    for _ in range(depth):
        rows, cols = 2 * rows - 1, 2 * cols - 1
        shapes.append((n, rows, cols))
    return shapes


def plasma_fractal(key, shape, roughness):
    """Diamond-square plasma maps as kornia's ``diamond_square(shape, roughness)``.

    Args:
      key: PRNG key.
      shape: ``(N, H, W)``, N maps of H x W pixels (H, W >= 3).
      roughness: [N], the factor by which the randomness shrinks per level (kornia: 0.1–0.7).

    Returns:
      [N, H, W] float32 maps, not normalised: >= 0, mostly below 1 (the border's 4/3 factor
      takes a few above 1, as kornia's).
    """
    n, h, w = shape
    shapes = _plasma_uniform_shapes(n, h, w)
    # One draw cut into the levels' uniforms: one random-bits computation to compile, not five.
    sizes = [math.prod(s) for s in shapes]
    flat = jax.random.uniform(key, (sum(sizes),))
    cuts = np.cumsum(sizes)[:-1]
    uniforms = [u.reshape(s) for u, s in zip(jnp.split(flat, cuts), shapes, strict=True)]
    return _plasma_from_uniforms(uniforms, jnp.asarray(roughness, jnp.float32), (h, w))


def _per_example(key, b, low, high):
    return jax.random.uniform(key, (b,), minval=low, maxval=high)


def _maybe(key, images, out, p):
    """`out` where a Bernoulli(p) draw per example says so, else `images`."""
    if p >= 1.0:
        return out
    on = jax.random.bernoulli(key, p, (images.shape[0],))
    return jnp.where(on[:, None, None, None], out, images)


def _maps(key, images, roughness, copies=1):
    """`copies` plasma maps per example and channel, [copies, B, H, W, C], from one fractal call
    (`roughness` [copies, B])."""
    b, h, w, c = images.shape
    n = copies * b * c
    maps = plasma_fractal(key, (n, h, w), jnp.repeat(roughness.reshape(-1), c))
    return jnp.moveaxis(maps.reshape(copies, b, c, h, w), 2, -1)


def _brightness(images, maps, intensity):
    return jnp.clip(images + (2.0 * maps - 1.0) * intensity[:, None, None, None], 0.0, 1.0)


def _contrast(images, maps):
    return jnp.clip((images - 0.5) * 4.0 * maps + 0.5, 0.0, 1.0)


def plasma_brightness(key, images, *, roughness=(0.3, 0.7), intensity=(0.5, 1.0), p=1.0):
    """kornia's ``RandomPlasmaBrightness``: ``clip(x + intensity * (2 map - 1))``, roughness and
    intensity uniform per example, applied with probability `p` per example."""
    kr, ki, km, kp = jax.random.split(key, 4)
    b = images.shape[0]
    maps = _maps(km, images, _per_example(kr, b, *roughness))[0]
    out = _brightness(images, maps, _per_example(ki, b, *intensity))
    return _maybe(kp, images, out, p)


def plasma_contrast(key, images, *, roughness=(0.3, 0.7), p=1.0):
    """kornia's ``RandomPlasmaContrast``: ``clip((x - 0.5) * 4 map + 0.5)``, roughness uniform
    per example, applied with probability `p` per example."""
    kr, km, kp = jax.random.split(key, 3)
    maps = _maps(km, images, _per_example(kr, images.shape[0], *roughness))[0]
    return _maybe(kp, images, _contrast(images, maps), p)


def channel_shuffle(key, images, *, p=0.5):
    """kornia's ``RandomChannelShuffle``: a uniform random permutation of the channels of each
    example, with probability `p` per example."""
    b, c = images.shape[0], images.shape[-1]
    u = jax.random.uniform(key, (b, c + 1))
    perm = jnp.argsort(u[:, :c], axis=1)  # a uniform random permutation per example
    out = jnp.take_along_axis(images, perm[:, None, None, :], axis=-1)
    return jnp.where((u[:, c] < p)[:, None, None, None], out, images)


def _auto_contrast(x):
    lo = jnp.min(x, axis=(1, 2), keepdims=True)
    hi = jnp.max(x, axis=(1, 2), keepdims=True)
    return jnp.clip((x - lo) / (hi - lo + 1e-6), 0.0, 1.0)


def _equalize(x):
    """Histogram equalisation per example and channel (torchvision's ``_scale_channel``)."""
    b, h, w, c = x.shape
    v = jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.int32)
    v = jnp.moveaxis(v, -1, 1).reshape(b * c, h * w)
    rows = jnp.broadcast_to(jnp.arange(b * c)[:, None], v.shape)
    hist = jnp.zeros((b * c, 256), jnp.int32).at[rows, v].add(1)
    last = 255 - jnp.argmax(hist[:, ::-1] > 0, axis=1)
    step = (h * w - jnp.take_along_axis(hist, last[:, None], axis=1)) // 255
    safe = jnp.maximum(step, 1)
    lut = (jnp.cumsum(hist, axis=1) + safe // 2) // safe
    lut = jnp.clip(jnp.pad(lut[:, :-1], ((0, 0), (1, 0))), 0, 255)
    out = jnp.where(step > 0, jnp.take_along_axis(lut, v, axis=1), v).astype(x.dtype) / 255.0
    return jnp.moveaxis(out.reshape(b, c, h, w), 1, -1)


def _posterize(x, bits):
    shift = (2.0 ** (8 - bits))[:, None, None, None]
    out = jnp.floor(jnp.floor(x * 255.0) / shift) * shift / 255.0
    return jnp.where(bits[:, None, None, None] == 0, 0.0, out)


def _sharpness(x, factor):
    h, w = x.shape[1:3]
    window = sum(x[:, i : i + h - 2, j : j + w - 2] for i in range(3) for j in range(3))
    smooth = jnp.clip((window + 4.0 * x[:, 1:-1, 1:-1]) / 13.0, 0.0, 1.0)
    degenerate = x.at[:, 1:-1, 1:-1].set(smooth)
    return jnp.clip(degenerate + (x - degenerate) * factor[:, None, None, None], 0.0, 1.0)


def _color_ops(x, m):
    """Every colour op of the policy on every example, [7, B, H, W, C]; `m` [B] in [0, 1)."""
    b4 = (slice(None), None, None, None)
    factor = 0.1 + 1.8 * m
    return jnp.stack(
        [
            _auto_contrast(x),
            _equalize(x),
            _posterize(x, jnp.floor(4.0 * m)),
            jnp.where(x >= m[b4], 1.0 - x, x),
            jnp.clip(x * factor[b4], 0.0, 1.0),
            jnp.clip(x + factor[b4] - 1.0, 0.0, 1.0),
            _sharpness(x, factor),
        ]
    )


def _affine(op, m, on, h, w):
    """Forward 3 x 3 affine matrices [B, 3, 3] in (col, row) pixel coordinates: the geometric
    op of each example (identity for the colour ops)."""
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    zero, one = jnp.zeros_like(m), jnp.ones_like(m)

    def matrix(rows):
        return jnp.stack([jnp.stack(r, -1) for r in rows], -2)

    angle = jnp.deg2rad(30.0 * m * on)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    rotate = matrix(
        [
            [cos, sin, (1 - cos) * cx - sin * cy],
            [-sin, cos, sin * cx + (1 - cos) * cy],
            [zero, zero, one],
        ]
    )
    shear = jnp.tan(jnp.pi * 0.3 * m * on)
    shear_x = matrix([[one, shear, -shear * cy], [zero, one, zero], [zero, zero, one]])
    shear_y = matrix([[one, zero, zero], [shear, one, -shear * cx], [zero, zero, one]])
    shift = 0.5 * m * on
    translate_x = matrix([[one, zero, shift * w], [zero, one, zero], [zero, zero, one]])
    translate_y = matrix([[one, zero, zero], [zero, one, shift * h], [zero, zero, one]])
    identity = matrix([[one, zero, zero], [zero, one, zero], [zero, zero, one]])
    by_name = dict(
        rotate=rotate, shear_x=shear_x, shear_y=shear_y, translate_x=translate_x,
        translate_y=translate_y,
    )  # fmt: skip
    table = jnp.stack(
        [by_name.get(name, identity) for name in TRIVIAL_AUGMENT_OPS]
    )  # [ops, B, 3, 3]
    return jnp.take_along_axis(table, op[None, :, None, None], axis=0)[0]


def _warp(x, forward):
    """Bilinear resampling of [B, H, W, C] under forward affine maps [B, 3, 3], zeros outside."""
    b, h, w, c = x.shape
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=x.dtype), jnp.arange(w, dtype=x.dtype), indexing="ij"
    )
    grid = jnp.stack([cols.ravel(), rows.ravel(), jnp.ones(h * w, x.dtype)])  # [3, HW]
    src = jnp.linalg.inv(forward) @ grid  # [B, 3, HW]
    col, row = src[:, 0], src[:, 1]
    c0, r0 = jnp.floor(col), jnp.floor(row)
    flat = x.reshape(b, h * w, c)
    out = jnp.zeros((b, h * w, c), x.dtype)
    for dr in (0, 1):
        for dc in (0, 1):
            r, cc = r0 + dr, c0 + dc
            weight = (1 - jnp.abs(row - r)) * (1 - jnp.abs(col - cc))
            inside = (r >= 0) & (r <= h - 1) & (cc >= 0) & (cc <= w - 1)
            index = (jnp.clip(r, 0, h - 1) * w + jnp.clip(cc, 0, w - 1)).astype(jnp.int32)
            pixels = jnp.take_along_axis(flat, index[:, :, None], axis=1)
            out = out + jnp.where(inside, weight, 0.0)[:, :, None] * pixels
    return out.reshape(b, h, w, c)


def trivial_augment(key, images):
    """kornia's ``TrivialAugment()`` (default policy), the op drawn per example.

    Every colour op is computed for the whole batch and the geometric ops share one bilinear
    warp (one affine matrix per example), then each example takes its op's result: one pass per
    colour op and one warp, with no branch per example.
    """
    b, h, w, _ = images.shape
    # One draw for the op, the magnitude and kornia's {0, 1} factor (each random call is a
    # separate random-bits computation to compile).
    u = jax.random.uniform(key, (3, b))
    op = jnp.minimum(jnp.floor(u[0] * len(TRIVIAL_AUGMENT_OPS)), len(TRIVIAL_AUGMENT_OPS) - 1)
    op = op.astype(jnp.int32)
    m, on = u[1], (u[2] < 0.5).astype(images.dtype)
    warped = jnp.clip(_warp(images, _affine(op, m, on, h, w)), 0.0, 1.0)
    colour = _color_ops(images, m)
    slot = np.array([_COLOR_OPS.index(n) if n in _COLOR_OPS else 0 for n in TRIVIAL_AUGMENT_OPS])
    picked = jnp.take_along_axis(colour, jnp.asarray(slot)[op][None, :, None, None, None], 0)[0]
    geometric = np.array([n in _GEOMETRIC_OPS for n in TRIVIAL_AUGMENT_OPS])
    return jnp.where(jnp.asarray(geometric)[op][:, None, None, None], warped, picked)


def _jpeg_tables():
    """libjpeg's quantisation tables at each quality of `JPEG_QUALITIES`, [Q, 2, 8, 8]."""
    return np.stack([np.stack(compression.quantization_tables(q)) for q in range(*JPEG_QUALITIES)])


def random_jpeg(key, images):
    """JPEG compression and decompression (`compression.jpeg`'s codec) at a quality drawn
    uniformly from 10..99 per example (UEraser_jpeg; APBench draws one quality per batch)."""
    tables = jnp.asarray(_jpeg_tables())
    index = jax.random.randint(key, (images.shape[0],), 0, tables.shape[0])

    def one(image, table):
        return compression.jpeg_codec(image[None], table[0], table[1])[0]

    return jax.vmap(one)(images, tables[index])


def ueraser(key, images, *, jpeg=False):
    """UEraser's augmentation of a batch: plasma brightness, plasma contrast, channel shuffle
    (p = 0.5), TrivialAugment; with `jpeg`, a random-quality JPEG first and the plasma ops with
    p = 0.8 (APBench's ``UEraser`` and ``UEraser_jpeg``)."""
    kj, ku, km, ks, kt = jax.random.split(key, 5)
    b = images.shape[0]
    p = 1.0
    if jpeg:
        images, p = random_jpeg(kj, images), 0.8
    # Both plasma ops' maps from one fractal call and their parameters from one draw (the same
    # distribution as separate calls, less code to compile): roughness U(0.3, 0.7), intensity
    # U(0.5, 1.0), each op applied with probability p.
    u = jax.random.uniform(ku, (5, b))
    maps = _maps(km, images, 0.3 + 0.4 * u[:2], copies=2)
    on = (u[3:] < p)[:, :, None, None, None]
    images = jnp.where(on[0], _brightness(images, maps[0], 0.5 + 0.5 * u[2]), images)
    images = jnp.where(on[1], _contrast(images, maps[1]), images)
    images = channel_shuffle(ks, images, p=0.5)
    return trivial_augment(kt, images)


__all__ = [
    "JPEG_QUALITIES",
    "TRIVIAL_AUGMENT_OPS",
    "channel_shuffle",
    "plasma_brightness",
    "plasma_contrast",
    "plasma_fractal",
    "random_jpeg",
    "trivial_augment",
    "ueraser",
]
