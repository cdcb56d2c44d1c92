"""Noise generators of Learning to Confuse: an image-to-perturbation network g_ξ(x).

Both generators map float images [B, H, W, C] in [0, 1] to perturbations of the same shape
whose every pixel lies in [-ε, ε] by construction (``ε·tanh`` of the last layer); with
``norm='l2'`` the output is further scaled per example onto the ℓ2 ball of radius ε (a smooth
projection, so gradients pass through it). Images whose sides are not multiples of the total
downsampling factor are zero-padded at the bottom/right and the output cropped back, so MNIST's
28x28 and CIFAR's 32x32 both work.

Every convolution but the output one is followed by a normalization, and the output one too
before ``ε·tanh``: the paper's networks put BatchNorm there. Without it nothing bounds the
pre-tanh activations; Adam grows them until the tanh saturates and the meta-gradient vanishes
(measured: after 300 meta-steps at Adam 1e-3 the MNIST generator's pre-tanh output had mean
magnitude 164 and every pixel sat at ±ε; docs/l2c.md). ``normalization='instance'`` (default)
normalises each example's channels over space, with a learned scale and bias, so g(x) depends on
x alone: no batch statistics to carry through the unrolled victim, and poisoning a dataset in
batches gives the same noise as one example at a time. ``'batch'`` is the released DeepConfuse
code's BatchNorm: called with ``train=True`` (crafting) it normalises by the batch's statistics
and updates running averages in the ``batch_stats`` collection (momentum 0.9, PyTorch's default
0.1; ε 1e-5); with ``train=False`` (the poison as applied) by those running averages, so each
image's noise keeps the offset and scale the batch gave it. ``'none'`` is the bare network.

The convolutions go through `jaxpoison.models.layers.Conv` (the CPU-friendly GEMM kernel
gradient). The decoders upsample by nearest-neighbour repetition followed by a convolution
("resize-convolution") instead of transposed convolutions: same receptive field and parameter
count per layer, no checkerboard artefacts, and every convolution stays on the fast path.

References:
  Feng, Cai & Zhou, "Learning to Confuse: Generating Training Time Adversarial Data with
  Auto-Encoder", NeurIPS 2019 (the encoder-decoder with 4x4 convolutions of 16/32/64/128
  channels each way, and a U-Net for CIFAR-10).
  Ronneberger, Fischer & Brox, "U-Net", MICCAI 2015.
  Odena, Dumoulin & Olah, "Deconvolution and Checkerboard Artifacts", Distill 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpoison.models.layers import Conv, max_pool


def _c(channels, width):
    return max(1, int(round(channels * width)))


def _pad_to_multiple(x, factor):
    h, w = x.shape[1:3]
    ph, pw = -h % factor, -w % factor
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0))), (h, w)


def _upsample(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


NORMALIZATIONS = ("instance", "batch", "none")


def check_normalization(kind):
    """Raises one clear error line unless `kind` is one of `NORMALIZATIONS`."""
    if kind not in NORMALIZATIONS:
        raise ValueError(
            f"generator normalization={kind!r} is not one of {NORMALIZATIONS}; use 'instance' "
            "(per image, the default), 'batch' (BatchNorm, the released code's) or 'none'."
        )


def _normalize(h, kind, dtype, train):
    """Instance normalization (per example and channel, over space), BatchNorm, or nothing."""
    check_normalization(kind)
    if kind == "instance":
        return nn.GroupNorm(num_groups=None, group_size=1, dtype=dtype)(h)
    if kind == "batch":
        # PyTorch's BatchNorm2d defaults: running = 0.9 running + 0.1 batch, ε = 1e-5.
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)(
            h
        )
    return h


def bound_output(raw, *, epsilon, norm):
    """``ε·tanh(raw)`` (every pixel in [-ε, ε]); for ℓ2 also scaled to per-example norm ≤ ε."""
    delta = epsilon * jnp.tanh(raw)
    if norm == "l2":
        sq = jnp.sum(jnp.square(delta), axis=tuple(range(1, delta.ndim)), keepdims=True)
        # sqrt(sq + tiny) keeps the gradient finite at delta = 0.
        scale = jnp.minimum(1.0, epsilon / jnp.sqrt(sq + 1e-24))
        delta = delta * scale
    elif norm != "linf":
        raise ValueError(f"norm must be 'linf' or 'l2', not {norm!r}.")
    return delta


class ConfuseAutoencoder(nn.Module):
    """The encoder-decoder of Learning to Confuse.

    Encoder: ``len(features)`` stride-2 4x4 convolutions (16, 32, 64, 128 channels at width 1),
    each followed by a normalization and a leaky ReLU. Decoder: the same number of (2x nearest
    upsampling, 4x4 convolution) layers back to the image size, with 64, 32, 16 channels and
    finally C; the last one is normalized (no activation) and feeds ``ε·tanh``.

    Attributes:
      epsilon: the perturbation bound.
      norm: ``'linf'`` or ``'l2'`` (see `bound_output`).
      normalization: ``'instance'``, ``'batch'`` or ``'none'`` (see the module docstring).
      features: encoder channels; the decoder mirrors them.
      width: channel multiplier (tests and CPU runs shrink it).
      dtype: computation dtype (None: inferred from inputs and parameters).
    """

    epsilon: float
    norm: str = "linf"
    features: Sequence[int] = (16, 32, 64, 128)
    width: float = 1.0
    normalization: str = "instance"
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x, train=False):
        channels = x.shape[-1]
        feats = [_c(f, self.width) for f in self.features]
        normalize = lambda h: _normalize(h, self.normalization, self.dtype, train)
        h, (height, wid) = _pad_to_multiple(x, 2 ** len(feats))
        for f in feats:
            h = Conv(f, (4, 4), strides=(2, 2), padding="SAME", dtype=self.dtype)(h)
            h = nn.leaky_relu(normalize(h), 0.2)
        decoder = [*feats[-2::-1], channels]
        for i, f in enumerate(decoder):
            h = Conv(f, (4, 4), padding="SAME", dtype=self.dtype)(_upsample(h))
            if i < len(decoder) - 1:
                h = nn.leaky_relu(normalize(h), 0.2)
        # The padded border is cropped before the output normalization sees it.
        raw = normalize(h[:, :height, :wid, :])
        return bound_output(raw, epsilon=self.epsilon, norm=self.norm)


class UNet(nn.Module):
    """A small U-Net: per level two 3x3 convolutions + normalization + ReLU, 2x2 max-pool down,
    nearest upsampling + concatenated skip connection up, 1x1 output convolution, normalized,
    into ``ε·tanh``.

    Attributes:
      epsilon, norm, width, normalization, dtype: as in `ConfuseAutoencoder`.
      features: channels per level; the last is the bottleneck.
    """

    epsilon: float
    norm: str = "linf"
    features: Sequence[int] = (16, 32, 64)
    width: float = 1.0
    normalization: str = "instance"
    dtype: jnp.dtype | None = None

    def _block(self, h, f, train):
        for _ in range(2):
            h = Conv(f, (3, 3), padding="SAME", dtype=self.dtype)(h)
            h = nn.relu(_normalize(h, self.normalization, self.dtype, train))
        return h

    @nn.compact
    def __call__(self, x, train=False):
        channels = x.shape[-1]
        feats = [_c(f, self.width) for f in self.features]
        h, (height, wid) = _pad_to_multiple(x, 2 ** (len(feats) - 1))
        skips = []
        for f in feats[:-1]:
            h = self._block(h, f, train)
            skips.append(h)
            h = max_pool(h, (2, 2), (2, 2))
        h = self._block(h, feats[-1], train)
        for f, skip in zip(feats[-2::-1], skips[::-1], strict=True):
            h = Conv(f, (3, 3), padding="SAME", dtype=self.dtype)(_upsample(h))
            h = self._block(jnp.concatenate([nn.relu(h), skip], axis=-1), f, train)
        raw = Conv(channels, (1, 1), dtype=self.dtype)(h)[:, :height, :wid, :]
        raw = _normalize(raw, self.normalization, self.dtype, train)
        return bound_output(raw, epsilon=self.epsilon, norm=self.norm)


GENERATORS = {
    "autoencoder": ConfuseAutoencoder,
    "unet": UNet,
}


def make(name, *, epsilon, norm="linf", **kwargs):
    """Builds the generator `name` of `GENERATORS` (sequence fields may come as lists)."""
    if name not in GENERATORS:
        raise ValueError(f"Unknown generator {name!r}; use one of {sorted(GENERATORS)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    check_normalization(kwargs.get("normalization", "instance"))
    return GENERATORS[name](epsilon=epsilon, norm=norm, **kwargs)


def init_variables(module, key, image_shape, dtype=jnp.float32):
    """The generator's variables for one image shape, in `dtype` (float64 for exactness tests):
    ``{'params': ...}``, with ``'batch_stats'`` (running averages) for BatchNorm."""
    variables = module.init(key, jnp.zeros((1, *image_shape), dtype))
    return jax.tree.map(lambda p: p.astype(dtype), dict(variables))


def init(module, key, image_shape, dtype=jnp.float32):
    """The generator's ``params`` for one image shape, in `dtype` (see `init_variables`)."""
    return init_variables(module, key, image_shape, dtype)["params"]


__all__ = [
    "GENERATORS",
    "NORMALIZATIONS",
    "ConfuseAutoencoder",
    "UNet",
    "bound_output",
    "check_normalization",
    "init",
    "init_variables",
    "make",
]
