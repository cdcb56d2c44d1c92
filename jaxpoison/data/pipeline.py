"""The in-memory, on-device input pipeline: permutations, batches, jit-able augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def to_float(images):
    """uint8 0..255 -> float32 in [0, 1]; float images are passed through."""
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images


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
