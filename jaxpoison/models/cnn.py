"""The two victim CNNs of Learning to Confuse (Feng, Cai & Zhou, NeurIPS 2019)."""

import flax.linen as nn
import jax.numpy as jnp

from jaxpoison.models.layers import Conv, max_pool


def _c(channels, width):
    return max(1, int(round(channels * width)))


class MnistCNN(nn.Module):
    """LeNet-style MNIST classifier: conv5x5(20)-pool-conv5x5(50)-pool-FC(500)-FC(K).

    The defaults are jaxpoison's L2C victim: ReLU, 2x2 max-pools, no normalization; 431,080
    parameters at width 1 on 28x28x1 images. ``normalization='batch', pool='avg'`` is the
    released Learning to Confuse code's victim (github kingfengji/DeepConfuse, ``MNIST/models.py``
    ``create_net``, trained by its ``test_model.py`` with Adam 0.01 for 2 epochs, batch 64):
    BatchNorm after both convolutions and the hidden FC layer (each before its ReLU) and on the
    logits, 2x2 average pools; 432,240 parameters and 1,160 running statistics at width 1
    (PyTorch's BatchNorm: momentum 0.1 on the running averages, flax's 0.9; epsilon 1e-5).

    Attributes:
      normalization: ``none`` or ``batch`` (BatchNorm, its running averages in the
        ``batch_stats`` collection).
      pool: ``max`` or ``avg``, the two 2x2 pools.
    """

    num_classes: int
    width: float = 1.0
    normalization: str = "none"
    pool: str = "max"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        if self.normalization not in ("none", "batch"):
            raise ValueError(
                f"MnistCNN normalization={self.normalization!r}; use 'none' or 'batch'."
            )
        if self.pool not in ("max", "avg"):
            raise ValueError(f"MnistCNN pool={self.pool!r}; use 'max' or 'avg'.")
        pool = max_pool if self.pool == "max" else nn.avg_pool

        def norm(h):
            if self.normalization == "none":
                return h
            return nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
            )(h)

        x = x.astype(self.dtype)
        for ch in (20, 50):
            x = Conv(_c(ch, self.width), (5, 5), padding="VALID", dtype=self.dtype)(x)
            x = pool(nn.relu(norm(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(norm(nn.Dense(_c(500, self.width), dtype=self.dtype)(x)))
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        return norm(nn.Dense(self.num_classes, dtype=self.dtype)(x)).astype(jnp.float32)


class CifarCNN(nn.Module):
    """Five 3x3 conv layers (32, 64, 128, 128, 128 channels), each ReLU + 2x2 max-pool, then FC.

    About 390k parameters at width 1: the CIFAR-10 classifier of Learning to Confuse.

    `head` says how the last feature map reaches the FC layer: ``mean`` (global average
    pooling) or ``flatten``. On 32x32 and 28x28 inputs the map is 1x1 and the two are the same
    network. On larger inputs (MNIST-CIFAR's 64x32 leaves 2x1) ``mean`` adds the positions up,
    so the FC layer cannot tell the image's halves apart; ``flatten`` keeps them apart.
    """

    num_classes: int
    width: float = 1.0
    channels: tuple = (32, 64, 128, 128, 128)
    head: str = "mean"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = x.astype(self.dtype)
        for ch in self.channels:
            x = Conv(_c(ch, self.width), (3, 3), padding="SAME", dtype=self.dtype)(x)
            x = nn.relu(x)
            if x.shape[1] > 1:
                x = max_pool(x, (2, 2), (2, 2))
        if self.head == "mean":
            x = jnp.mean(x, axis=(1, 2))
        elif self.head == "flatten":
            x = x.reshape(x.shape[0], -1)
        else:
            raise ValueError(f"CifarCNN head={self.head!r}; use 'mean' or 'flatten'.")
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
