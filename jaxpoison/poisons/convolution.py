"""Convolution-based unlearnable data (CUDA): every image blurred by its class's random filter.

Each class k gets a private random k x k filter with non-negative entries; every training image
of the class is convolved with it (each channel alike, zero padding, same size) and rescaled so
that its largest value is 1. The network learns which blur goes with which label, a relation
the clean test images do not have. The poisoned image is not ``x + δ`` for a small δ (the blur
changes edges by a large amount), so the poison is registered ``unbounded``: no ℓp ball holds
it, and it is one that ℓ∞ / ℓ2 adversarial training with a small radius does not remove.

References:
  Sadasivan, Soltanolkotabi, Feizi. "CUDA: Convolution-based Unlearnable Datasets", CVPR 2023
  (arXiv 2303.04278).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison.poisons.base import Poison


@flax.struct.dataclass
class ConvolutionState:
    """One filter per class, applied to every channel of the class's images."""

    kernel: jax.Array  # float32 [K, k, k]


def class_filters(key, *, num_classes, kernel_size=3, blur_parameter=0.3, peak=1.0):
    """K random blur filters: entries uniform in [0, blur_parameter], one random entry `peak`.

    The entry set to `peak` keeps one shifted copy of the image dominant (the paper's filters
    blur without washing the image out); a larger `blur_parameter` blurs more.

    Returns:
      [K, k, k] float32.
    """
    ukey, pkey = jax.random.split(key)
    size = kernel_size * kernel_size
    kernel = jax.random.uniform(ukey, (num_classes, size), maxval=blur_parameter)
    where = jax.random.randint(pkey, (num_classes,), 0, size)
    kernel = kernel.at[jnp.arange(num_classes), where].set(peak)
    return kernel.reshape(num_classes, kernel_size, kernel_size)


def convolve(images, kernels):
    """Each image filtered by its own kernel, on every channel: a 'same'-size cross-correlation
    with zero padding (what a depthwise convolution layer computes).

    Args:
      images: [B, H, W, C]; kernels: [B, k, k] with k odd.

    Returns:
      [B, H, W, C]: ``out[b, i, j, c] = sum_{a, e} kernels[b, a, e] x[b, i + a - r, j + e - r, c]``
      with r = k // 2 and x = 0 outside the image.
    """
    _, h, w, _ = images.shape
    k = kernels.shape[-1]
    r = k // 2
    padded = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)))
    return sum(
        kernels[:, a, e, None, None, None] * padded[:, a : a + h, e : e + w, :]
        for a in range(k)
        for e in range(k)
    )


def cuda(*, threat, num_classes, image_shape, kernel_size=3, blur_parameter=0.3, class_wise=True):
    """CUDA: every training image convolved with its class's random filter, rescaled to max 1.

    ``x̃ = (x ⋆ H_y) / max(x ⋆ H_y)`` with ``H_y`` from `class_filters` drawn at `init` from the
    run's key (the paper's private key); the maximum is over the image's pixels and channels
    (an all-black image stays black). The filters are non-negative, so x̃ is in [0, 1]; with a
    quantizing threat x̃ is rounded to the 8-bit grid. Labels are unchanged.

    The paper's CIFAR-10 setting is a 3 x 3 filter and blur parameter 0.3 (the defaults here),
    the same filter on the three channels.

    Args:
      threat: only its ``quantize`` flag is used (the poison leaves every ℓp ball: ``unbounded``).
      num_classes: K.
      image_shape: (H, W, C), any number of channels.
      kernel_size: k, odd, at most min(H, W).
      blur_parameter: the upper end of the filters' uniform entries, > 0.
      class_wise: False draws one filter and gives it to every class: the control that blurs
        every image alike, so that what remains of the effect is the blur itself, not the
        filter-label relation the poison relies on.

    Returns:
      A `Poison` with a `ConvolutionState` (the K filters) drawn at `init` (``num_epochs=0``).

    Raises:
      ValueError: `kernel_size` is even or out of range, or `blur_parameter` <= 0.

    References:
      Sadasivan et al., "CUDA: Convolution-based Unlearnable Datasets", CVPR 2023.
    """
    h, w, _ = image_shape
    if kernel_size % 2 == 0 or not 1 <= kernel_size <= min(h, w):
        raise ValueError(
            f"cuda: kernel_size={kernel_size} must be odd and in 1..{min(h, w)} for {h}x{w} images."
        )
    if not blur_parameter > 0:
        raise ValueError(f"cuda: blur_parameter={blur_parameter} must be > 0.")

    def init(key, dataset):
        del dataset
        kernel = class_filters(
            key,
            num_classes=num_classes if class_wise else 1,
            kernel_size=kernel_size,
            blur_parameter=blur_parameter,
        )
        return ConvolutionState(kernel=jnp.broadcast_to(kernel, (num_classes, *kernel.shape[1:])))

    def apply(state, batch):
        x = batch["image"]
        out = convolve(x, state.kernel[batch["label"]].astype(x.dtype))
        peak = jnp.max(out, axis=(1, 2, 3), keepdims=True)
        out = jnp.clip(out / jnp.where(peak > 0, peak, 1.0), 0.0, 1.0)
        if threat.quantize:
            out = jnp.round(out * 255.0) / 255.0
        return dict(batch, image=out)

    return Poison(init=init, update=None, apply=apply, num_epochs=0)
