"""One-pixel shortcut (OPS): in every image of a class, one pixel set to one colour.

For each class the search picks the pixel position and the colour (a corner of the colour cube:
8 for RGB, 2 for gray) that the class's own images are farthest from, and most consistently so,
and sets that pixel of every training image of the class to that colour. A network learns the
pixel-label correlation at once and nothing else; the change is one pixel per image, an ℓ0
perturbation that ℓ∞ / ℓ2 adversarial training does not remove.

The search is one vectorised pass over the whole dataset: the per-class mean and variance of
every pixel and channel (`class_moments`), from which the objective of every (position, colour)
pair follows in closed form (`scores`); any image shape, 1 or more channels, any number of
classes.

References:
  Wu, Chen, Zheng, Xu, Ma, Wang, Sun, Jiang. "One-Pixel Shortcut: On the Learning Preference of
  Deep Neural Networks", ICLR 2023 (github.com/cychomatica/One-Pixel-Shotcut).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison import threat as threat_lib
from jaxpoison.poisons.base import Poison, perturb

# Variances below this are float rounding of a constant pixel (a class whose images all share
# the pixel's value); on the 8-bit grid a non-constant pixel of a class of n <= 10^6 images has
# variance >= (1/255)^2 / n > 1.5e-11.
_VARIANCE_FLOOR = 1e-12


@flax.struct.dataclass
class OnePixelState:
    """Per class the pixels and colours that every image of the class is given."""

    position: jax.Array  # int32 [K, m]: flat pixel index h * W + w
    colour: jax.Array  # float32 [K, m, C]: 0 or 1 per channel


def corner_colours(channels):
    """The 2**C corners of the colour cube, [2**C, C] float32; colour v has channel c equal to
    bit C-1-c of v (for RGB: 0 black, 4 red, 2 green, 1 blue, 7 white)."""
    v = np.arange(2**channels)[:, None]
    return jnp.asarray((v >> (channels - 1 - np.arange(channels))) & 1, jnp.float32)


def class_moments(x, y, *, num_classes, chunk=1024):
    """Per-class count, mean and variance of every pixel and channel, in two passes over chunks.

    Args:
      x: [N, H, W, C] images; y: [N] int labels in 0..K-1.
      num_classes: K.
      chunk: examples per step (bounds the temporary memory to one chunk of images).

    Returns:
      (count [K], mean [K, H, W, C], variance [K, H, W, C]); population variance (ddof 0),
      computed around the mean (no cancellation), 0 for an empty class.
    """
    n = x.shape[0]
    pad = -n % chunk
    xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(-1, chunk, *x.shape[1:])
    ys = jnp.pad(y, (0, pad), constant_values=num_classes).reshape(-1, chunk)  # pad: dropped

    def summed(f):
        def body(total, xy):
            xb, yb = xy
            return total + jax.ops.segment_sum(f(xb, yb), yb, num_classes), None

        zeros = jnp.zeros((num_classes, *x.shape[1:]), x.dtype)
        return jax.lax.scan(body, zeros, (xs, ys))[0]

    count = jax.ops.segment_sum(jnp.ones_like(y, x.dtype), y, num_classes)
    norm = jnp.maximum(count, 1.0)[:, None, None, None]
    mean = summed(lambda xb, yb: xb) / norm
    centred = lambda xb, yb: jnp.square(xb - mean[jnp.minimum(yb, num_classes - 1)])
    return count, mean, summed(centred) / norm


def scores(mean, variance):
    """The OPS objective of every (class, pixel, colour): mean / std of ``|colour - x|``.

    For class k, pixel p and corner colour ξ, ``d = |ξ - x_p|`` over the class's images and the
    C channels has (ξ_c is 0 or 1, so ``|ξ_c - x| = ξ_c + (1 - 2 ξ_c) x``)

        mean  μ  = mean_c e_c,               e_c = ξ_c + (1 - 2 ξ_c) mean_c
        var   σ² = mean_c var_c + mean_c (e_c - μ)²

    (the variance over images and channels together, as the reference's ``np.std`` of the
    N x C array). The objective is μ / σ: large deviation, small spread.

    Args:
      mean, variance: [K, H, W, C] per-class pixel moments (`class_moments`).

    Returns:
      (objective [K, H*W, V], μ [K, H*W, V]) with V = 2**C colours in `corner_colours` order;
      σ = 0 gives +inf when μ > 0 and 0 when μ = 0 (the reference's 0/0 NaN would rank first).
    """
    k, h, w, c = mean.shape
    xi = corner_colours(c)  # [V, C]
    m = mean.reshape(k, h * w, 1, c)
    v = jnp.where(variance < _VARIANCE_FLOOR, 0.0, variance).reshape(k, h * w, 1, c)
    e = xi + (1.0 - 2.0 * xi) * m  # [K, P, V, C]
    mu = jnp.mean(e, axis=-1)
    var = jnp.mean(v, axis=-1) + jnp.mean(jnp.square(e - mu[..., None]), axis=-1)
    sigma = jnp.sqrt(var)
    objective = jnp.where(
        sigma > 0, mu / jnp.where(sigma > 0, sigma, 1.0), jnp.where(mu > 0, jnp.inf, 0.0)
    )
    return objective, mu


def search(x, y, *, key, num_classes, num_pixels=1):
    """The pixels and colours of the one-pixel shortcut, class by class.

    Class k takes the (pixel, colour) pair of highest objective (`scores`), among the pairs no
    earlier class took (as the reference excludes them), and with ``num_pixels > 1`` the next
    best pairs at other pixels. Ties go to the larger mean deviation μ, then to a pair drawn
    uniformly with `key`: on MNIST every border pixel is black in every image (objective +inf
    for white), and taking the first of them would put the classes' pixels side by side in the
    top row, where a convolution followed by pooling hardly tells them apart. Without ties (as
    on CIFAR-10) the key plays no part.

    Args:
      x: [N, H, W, C] clean training images in [0, 1]; y: [N] labels.
      key: PRNG key for the ties.
      num_classes: K.
      num_pixels: m, the pixels per class.

    Returns:
      (position int32 [K, m] flat pixel indices, colour float32 [K, m, C]).
    """
    _, mean, variance = class_moments(x, y, num_classes=num_classes)
    objective, mu = scores(mean, variance)
    _, pixels, colours = objective.shape
    flat_obj = objective.reshape(num_classes, -1)
    flat_mu = mu.reshape(num_classes, -1)
    pixel_of = jnp.arange(pixels * colours) // colours

    def best(obj, deviation, excluded, tie_key):
        obj = jnp.where(excluded, -jnp.inf, obj)
        top = (obj == jnp.max(obj)) & ~excluded
        deviation = jnp.where(top, deviation, -jnp.inf)
        top = top & (deviation == jnp.max(deviation))
        return jnp.argmax(jnp.where(top, jax.random.uniform(tie_key, obj.shape), -1.0))

    def one_class(taken, inputs):
        obj, deviation, class_key = inputs
        excluded, chosen = taken, []
        for j in range(num_pixels):
            i = best(obj, deviation, excluded, jax.random.fold_in(class_key, j))
            chosen.append(i)
            excluded = excluded | (pixel_of == pixel_of[i])  # one colour per pixel of a class
            taken = taken.at[i].set(True)
        return taken, jnp.stack(chosen)

    taken = jnp.zeros(pixels * colours, bool)
    keys = jax.random.split(key, num_classes)
    _, chosen = jax.lax.scan(one_class, taken, (flat_obj, flat_mu, keys))  # [K, m]
    position = (chosen // colours).astype(jnp.int32)
    colour = corner_colours(x.shape[-1])[chosen % colours]
    return position, colour


def one_pixel(*, threat, num_classes, image_shape, num_pixels=1):
    """One-pixel shortcut (OPS): per class `num_pixels` pixels set to the searched colours.

    `init` runs `search` on the clean training set (the key only breaks exact ties);
    `apply` sets each image's class pixels to their colours, ``δ = colour - x`` there and 0
    elsewhere, projected into `threat`.

    The paper's threat is the ℓ0 ball, `threat.L0Ball` (``threat=dict(norm='l0', pixels=1)`` in
    a config), with ``pixels >= num_pixels``: the pixels take their colours exactly. With an
    ℓ∞ / ℓ2 ball (not in the paper) the same pixels move toward the colours only as far as the
    ball allows (δ projected into it): a budgeted one-pixel shortcut, much weaker.

    Args:
      threat: an `L0Ball` (the paper's) or an `LpBall` (the budgeted variant above).
      num_classes: K.
      image_shape: (H, W, C), any size and number of channels.
      num_pixels: m, pixels per class (the paper's sparsity, 1).

    Returns:
      A `Poison` with a `OnePixelState` found at `init` (``num_epochs=0``).

    Raises:
      ValueError: `num_pixels` < 1, more than the ℓ0 ball's ``pixels``, or too many for the
        image's pixels and colours to give every class its own.

    References:
      Wu et al., "One-Pixel Shortcut: On the Learning Preference of Deep Neural Networks",
      ICLR 2023.
    """
    h, w, c = image_shape
    if num_pixels < 1:
        raise ValueError(f"one_pixel: num_pixels={num_pixels} must be >= 1.")
    if isinstance(threat, threat_lib.L0Ball) and threat.pixels < num_pixels:
        raise ValueError(
            f"one_pixel: num_pixels={num_pixels} per image, but the l0 threat allows only "
            f"pixels={threat.pixels}; raise threat.pixels or lower num_pixels."
        )
    colours = 2**c
    # Class k needs m free pixels after the earlier classes took (k - 1) m pairs: enough when
    # H W V >= (K - 1 + V) m.
    if h * w * colours < (num_classes - 1 + colours) * num_pixels:
        raise ValueError(
            f"one_pixel: {h}x{w} pixels x {colours} colours are too few for {num_classes} "
            f"classes of {num_pixels} pixels each; lower num_pixels."
        )

    def init(key, dataset):
        position, colour = search(
            dataset["image"],
            dataset["label"],
            key=key,
            num_classes=num_classes,
            num_pixels=num_pixels,
        )
        return OnePixelState(position=position, colour=colour)

    def apply(state, batch):
        x, y = batch["image"], batch["label"]
        n = x.shape[0]
        where = jax.nn.one_hot(state.position[y], h * w, dtype=x.dtype)  # [B, m, HW]
        target = jnp.einsum("bmp,bmc->bpc", where, state.colour[y].astype(x.dtype))
        at = jnp.sum(where, axis=1).reshape(n, h, w, 1)
        delta = at * (target.reshape(n, h, w, c) - x)
        return dict(batch, image=perturb(threat, x, delta))

    return Poison(init=init, update=None, apply=apply, num_epochs=0)
