"""The in-memory, on-device input pipeline: the image boundary, permutations, batches and
jit-able augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.data.sources import DataError, check_image_shape

# k -> k / 255 in float32, as numpy divides. A lookup, so jax arrays convert to the same bits:
# XLA compiles a division by the constant 255 into a multiplication by 1/255, which differs in the
# last bit for about half the values.
_UINT8_TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255)


def as_float_images(x, *, what="images"):
    """Images as float32 NHWC in [0, 1]: the one conversion at every boundary of the library.

    uint8 images are divided by 255 (0..255 -> [0, 1], the same float32 values as numpy's
    ``x.astype(np.float32) / 255`` for numpy and jax input alike); floating images must lie in
    [0, 1] and be finite, and are cast to float32. Anything else is refused, with the fix in the
    message: other dtypes, float images outside [0, 1] (e.g. 0..255 floats: divide by 255),
    NaN or inf, arrays that are not 4-d, and channel-first (N, C, H, W) arrays.

    The checks read the values, so call it on concrete arrays (outside `jax.jit`).

    Args:
      x: images [N, H, W, C], a numpy or a jax array.
      what: what the images are, for the error message (e.g. "poisons.craft: images").

    Returns:
      float32 [N, H, W, C] in [0, 1]: a numpy array for numpy (or array-like) input, a jax array,
      on the same device, for jax input.

    Raises:
      DataError: naming the problem and the fix.
    """
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x)
    check_image_shape(x.shape, what)
    if x.dtype == np.uint8:
        return xp.asarray(_UINT8_TO_FLOAT)[x]
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DataError(
            f"{what} of dtype {x.dtype} are neither uint8 (0..255) nor float in [0, 1]; "
            "convert 0..255 integers with x.astype(np.uint8)."
        )
    if x.size:
        if not bool(xp.isfinite(x).all()):
            raise DataError(f"{what} hold NaN or inf pixels; fix or drop those images.")
        lo, hi = float(x.min()), float(x.max())
        if hi > 1.0:
            fix = "divide by 255 (x / 255.0)" if hi > 2.0 else "clip them (np.clip(x, 0, 1))"
            raise DataError(
                f"{what} as floats must lie in [0, 1], got max {hi:g}; {fix}, or pass uint8."
            )
        if lo < 0.0:
            raise DataError(
                f"{what} as floats must lie in [0, 1], got min {lo:g} (normalised by mean and "
                "std?); pass the unnormalised images in [0, 1], or uint8."
            )
    return x if x.dtype == np.float32 else x.astype(np.float32)  # no copy of float32 images


def device_float(x):
    """Images as float32 in [0, 1] inside a compiled program, where `as_float_images` cannot read
    values: uint8 through the same lookup (the same bits as ``x / 255`` in numpy), anything
    else cast to float32 unchecked.

    The trainer keeps uint8 images as uint8 on the devices (`training.TrainData`) and converts
    each batch after gathering it, so a dataset's only float copy is the batch in flight.
    """
    if x.dtype == jnp.uint8:
        return jnp.asarray(_UINT8_TO_FLOAT)[x]
    return x.astype(jnp.float32)


def to_float(images):
    """The same as `as_float_images` (kept for existing callers)."""
    return as_float_images(images)


def epoch_batches(key, num_examples, batch_size):
    """A random permutation cut into `num_examples // batch_size` batches of indices, [steps, B].

    The remainder is dropped (a different remainder each epoch), as PyTorch's drop_last does.
    """
    steps = num_examples // batch_size
    if steps == 0:
        raise ValueError(f"batch_size={batch_size} exceeds the {num_examples} training examples.")
    perm = jax.random.permutation(key, num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def augment(key, images, *, crop_padding=0, flip=False):
    """Random crops after zero padding and random horizontal flips, per example.

    Args:
      key: PRNG key.
      images: float [B, H, W, C].
      crop_padding: pad by this many pixels on each side, then crop back at a random offset.
      flip: flip each image left-right with probability 1/2.
    """
    if not crop_padding and not flip:
        return images
    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * p + 1)

        def crop(img, off):
            return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

        images = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(do_flip, images[:, :, ::-1, :], images)
    return images
