"""The noise-prediction U-Net of DDPM (Ho et al. 2020), in Flax, laid out as score_sde's
``models/ddpm.py`` so that its checkpoints load as they are (`jaxpoison.diffusion.io`).

Given x_t in [-1, 1] and the integer timestep t (as a float), it predicts the noise ε of
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε. The layout: a 3x3 convolution to ``nf`` channels; per
resolution ``num_res_blocks`` residual blocks of ``nf * ch_mult[level]`` channels (self-attention
after each at the sizes in ``attn_resolutions``) and a downsampling; a middle of residual block,
attention, residual block; the mirror image upwards with skip connections (``num_res_blocks + 1``
blocks per level); GroupNorm, swish and a 3x3 convolution back to the image's channels. The
timestep enters every residual block through a sinusoidal embedding and two dense layers
(``4 nf`` features). Dropout (``dropout``) runs only with ``train=True``.

Submodules keep score_sde's names (``ResnetBlockDDPM_i``, ``AttnBlock_i``, ``NIN_i`` with
parameters ``W`` and ``b``, ``Downsample_i``, ``Upsample_i``, flax's auto-named ``Conv_i``,
``Dense_i``, ``GroupNorm_i``), created in its order, so the parameter trees are equal. GroupNorm
uses gcd(``num_groups``, channels) groups: 32 for score_sde's widths (multiples of 32), fewer for
the small widths the tests train on CPU; the parameters do not depend on it.

score_sde's CIFAR-10 DDPM (``configs/vp/ddpm/cifar10.py``): nf 128, ch_mult (1, 2, 2, 2),
num_res_blocks 2, attn_resolutions (16,), dropout 0.1, resamp_with_conv True: `UNet()`.

References:
  Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models." NeurIPS 2020.
  Song et al. ICLR 2021, yang-song/score_sde: ``models/ddpm.py``, ``models/layers.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpoison import ops


def _init(scale=1.0):
    """DDPM's initialiser: variance scaling (fan_avg, uniform); scale 0 becomes 1e-10."""
    return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def _conv3x3(x, features, *, stride=1, init_scale=1.0):
    return nn.Conv(
        features,
        (3, 3),
        strides=(stride, stride),
        padding="SAME",
        kernel_init=_init(init_scale),
        bias_init=nn.initializers.zeros,
        conv_general_dilated=ops.conv_general_dilated,  # oneDNN / fast kernels on CPU
    )(x)


def _group_norm(x, num_groups):
    return nn.GroupNorm(num_groups=math.gcd(num_groups, x.shape[-1]), epsilon=1e-6)(x)


def timestep_embedding(timesteps, dim, max_positions=10000):
    """Sinusoidal embedding [B, dim] of timesteps [B] (DDPM's, as in transformers)."""
    half = dim // 2
    scale = math.log(max_positions) / (half - 1)
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -scale)
    emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class NIN(nn.Module):
    """A 1x1 "network in network" layer: x @ W + b over the channel axis."""

    num_units: int
    init_scale: float = 0.1

    @nn.compact
    def __call__(self, x):
        w = self.param("W", _init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return jnp.tensordot(x, w, 1) + b


class AttnBlock(nn.Module):
    """Self-attention over the pixels of a feature map, added to its input."""

    num_groups: int = 32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _group_norm(x, self.num_groups)
        q, k, v = NIN(c)(h), NIN(c)(h), NIN(c)(h)
        w = jnp.einsum("bhwc,bHWc->bhwHW", q, k) * (c**-0.5)
        w = jax.nn.softmax(w.reshape(b, hgt, wid, hgt * wid), axis=-1)
        h = jnp.einsum("bhwHW,bHWc->bhwc", w.reshape(b, hgt, wid, hgt, wid), v)
        return x + NIN(c, init_scale=0.0)(h)


class Upsample(nn.Module):
    with_conv: bool = True

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = jax.image.resize(x, (b, hgt * 2, wid * 2, c), "nearest")
        return _conv3x3(h, c) if self.with_conv else h


class Downsample(nn.Module):
    with_conv: bool = True

    @nn.compact
    def __call__(self, x):
        if self.with_conv:
            return _conv3x3(x, x.shape[-1], stride=2)
        return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class ResnetBlockDDPM(nn.Module):
    """GroupNorm, swish, conv, + dense(temb), GroupNorm, swish, dropout, conv; a NIN shortcut
    where the channels change."""

    out_ch: int | None = None
    dropout: float = 0.1
    num_groups: int = 32

    @nn.compact
    def __call__(self, x, temb, train):
        out_ch = self.out_ch or x.shape[-1]
        h = _conv3x3(nn.swish(_group_norm(x, self.num_groups)), out_ch)
        h += nn.Dense(out_ch, kernel_init=_init())(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_group_norm(h, self.num_groups))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = _conv3x3(h, out_ch, init_scale=0.0)
        if x.shape[-1] != out_ch:
            x = NIN(out_ch)(x)
        return x + h


class UNet(nn.Module):
    """DDPM's ε-prediction U-Net: ``apply(variables, x [B,H,W,C] in [-1,1], t [B])`` -> ε.

    Attributes:
      nf: channels of the first level (score_sde CIFAR-10: 128).
      ch_mult: channel multiplier per resolution; one downsampling between levels.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: feature-map sizes (height) with self-attention after each block.
      dropout: in every residual block, with ``train=True`` (an rng ``dropout`` then).
      resamp_with_conv: learned 3x3 convolutions in the up/down sampling.
      num_groups: GroupNorm groups (gcd with the channels).
    """

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    num_groups: int = 32

    @nn.compact
    def __call__(self, x, t, train=False):
        block = lambda out_ch=None: ResnetBlockDDPM(out_ch, self.dropout, self.num_groups)
        attn = lambda: AttnBlock(self.num_groups)
        temb = timestep_embedding(t, self.nf)
        temb = nn.Dense(self.nf * 4, kernel_init=_init())(temb)
        temb = nn.Dense(self.nf * 4, kernel_init=_init())(nn.swish(temb))

        levels = len(self.ch_mult)
        hs = [_conv3x3(x, self.nf)]
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = block(self.nf * mult)(hs[-1], temb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn()(h)
                hs.append(h)
            if level != levels - 1:
                hs.append(Downsample(self.resamp_with_conv)(hs[-1]))

        h = hs[-1]
        h = block()(h, temb, train)
        h = attn()(h)
        h = block()(h, temb, train)

        for level in reversed(range(levels)):
            for _ in range(self.num_res_blocks + 1):
                h = block(self.nf * self.ch_mult[level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train
                )
            if h.shape[1] in self.attn_resolutions:
                h = attn()(h)
            if level != 0:
                h = Upsample(self.resamp_with_conv)(h)

        h = nn.swish(_group_norm(h, self.num_groups))
        return _conv3x3(h, x.shape[-1], init_scale=0.0)


def make(**spec):
    """A `UNet` from its fields (a config's ``model`` dict), checked.

    Raises:
      ValueError: a field the U-Net does not have, or a value out of range.
    """
    fields = {f for f in UNet.__dataclass_fields__ if f not in ("parent", "name")}
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise ValueError(
            f"score model: unknown field(s) {unknown}; the U-Net takes {sorted(fields)}."
        )
    for field in ("nf", "num_res_blocks", "num_groups"):
        value = spec.get(field, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"score model: {field}={value!r} must be a positive integer.")
    mult = tuple(spec.get("ch_mult", UNet.ch_mult))
    if not mult or not all(isinstance(m, int) and m > 0 for m in mult):
        raise ValueError(
            f"score model: ch_mult={mult!r} must be positive integers, e.g. (1, 2, 2)."
        )
    if not 0 <= spec.get("dropout", 0.0) < 1:
        raise ValueError(f"score model: dropout={spec['dropout']!r} must lie in [0, 1).")
    spec = dict(spec, ch_mult=mult, attn_resolutions=tuple(spec.get("attn_resolutions", (16,))))
    return UNet(**spec)


def check_image_shape(module, image_shape):
    """Raises ValueError when `image_shape`'s side does not halve ``len(ch_mult) - 1`` times."""
    side = image_shape[0]
    down = 2 ** (len(module.ch_mult) - 1)
    if side % down or image_shape[0] != image_shape[1]:
        raise ValueError(
            f"score model: images of shape {tuple(image_shape)} do not fit a U-Net with "
            f"{len(module.ch_mult)} levels (square sides divisible by {down}); change ch_mult."
        )


__all__ = ["UNet", "check_image_shape", "make", "timestep_embedding"]
