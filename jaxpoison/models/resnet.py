"""ResNet-18/50 (CIFAR stem; He et al. 2016) and WideResNet-28-10 (Zagoruyko & Komodakis 2016)."""

import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxpoison.models.layers import Conv


def _bn(train, dtype):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


class BasicBlock(nn.Module):
    channels: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        y = conv(self.channels, (3, 3), self.stride, padding=1)(x)
        y = nn.relu(_bn(train, self.dtype)(y))
        y = conv(self.channels, (3, 3), padding=1)(y)
        y = _bn(train, self.dtype)(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = _bn(train, self.dtype)(conv(self.channels, (1, 1), self.stride)(x))
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    channels: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        y = nn.relu(_bn(train, self.dtype)(conv(self.channels, (1, 1))(x)))
        y = conv(self.channels, (3, 3), self.stride, padding=1)(y)
        y = nn.relu(_bn(train, self.dtype)(y))
        y = _bn(train, self.dtype)(conv(4 * self.channels, (1, 1))(y))
        if self.stride != 1 or x.shape[-1] != 4 * self.channels:
            x = _bn(train, self.dtype)(conv(4 * self.channels, (1, 1), self.stride)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    num_classes: int
    block: type = BasicBlock
    stage_sizes: tuple = (2, 2, 2, 2)
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = x.astype(self.dtype)
        base = max(1, int(64 * self.width))
        x = Conv(base, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(_bn(train, self.dtype)(x))
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                x = self.block(base * 2**i, stride, dtype=self.dtype)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, block=BasicBlock, stage_sizes=(2, 2, 2, 2))
ResNet50 = functools.partial(ResNet, block=Bottleneck, stage_sizes=(3, 4, 6, 3))


class WideBlock(nn.Module):
    """Pre-activation wide block."""

    channels: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train):
        conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
        o = nn.relu(_bn(train, self.dtype)(x))
        y = conv(self.channels, (3, 3), self.stride, padding=1)(o)
        y = nn.relu(_bn(train, self.dtype)(y))
        y = conv(self.channels, (3, 3), padding=1)(y)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = conv(self.channels, (1, 1), self.stride)(o)
        return x + y


class WideResNet28(nn.Module):
    """WRN-28-k: 4 blocks per stage, widening factor k (10 by default) times `width`.

    ``width=0.1`` is WRN-28-1 (stages of 16/32/64 channels), the CPU-sized member.
    """

    num_classes: int
    widen_factor: int = 10
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = x.astype(self.dtype)
        k = self.widen_factor * self.width
        # The stem has 16 channels at every widening factor (Zagoruyko & Komodakis, Table 1).
        x = Conv(16, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
        for i, ch in enumerate((16, 32, 64)):
            for j in range(4):
                stride = 2 if i > 0 and j == 0 else 1
                x = WideBlock(max(1, int(ch * k)), stride, dtype=self.dtype)(x, train)
        x = nn.relu(_bn(train, self.dtype)(x))
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
