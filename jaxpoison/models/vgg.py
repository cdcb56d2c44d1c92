"""VGG with BatchNorm, CIFAR variant (Simonyan & Zisserman 2015; one linear classifier)."""

import flax.linen as nn
import jax.numpy as jnp

from jaxpoison.models.layers import Conv, max_pool

CFG = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (
        64,
        64,
        "M",
        128,
        128,
        "M",
        256,
        256,
        256,
        256,
        "M",
        512,
        512,
        512,
        512,
        "M",
        512,
        512,
        512,
        512,
        "M",
    ),
}


class VGG(nn.Module):
    num_classes: int
    depth: int = 11
    width: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = x.astype(self.dtype)
        for v in CFG[self.depth]:
            if v == "M":
                if x.shape[1] > 1:
                    x = max_pool(x, (2, 2), (2, 2))
                continue
            x = Conv(
                max(1, int(v * self.width)),
                (3, 3),
                padding="SAME",
                use_bias=False,
                dtype=self.dtype,
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
            )(x)
            x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
