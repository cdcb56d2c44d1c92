"""Layers shared by the models: flax's Conv and max-pool on `jaxpoison.ops` (faster on CPU)."""

import functools

import flax.linen as nn

from jaxpoison import ops

Conv = functools.partial(nn.Conv, conv_general_dilated=ops.conv_general_dilated)
max_pool = ops.max_pool
