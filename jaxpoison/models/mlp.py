"""Multi-layer perceptron."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """Flatten, then `len(hidden)` ReLU layers of `width * hidden[i]` units, then logits."""

    num_classes: int
    width: float = 1.0
    hidden: Sequence[int] = (512, 512)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        for h in self.hidden:
            x = nn.relu(nn.Dense(max(1, int(h * self.width)), dtype=self.dtype)(x))
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
