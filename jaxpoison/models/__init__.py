"""Flax classifiers, each with a `width` multiplier so tests and CPU runs can shrink them.

`MODELS[name](num_classes=..., width=...)` builds a module whose `__call__(x, train)` maps float
images in [0, 1] to logits. `make_apply_fn` wraps a module into the one calling convention the
rest of the library uses: ``apply_fn(variables, x, *, train) -> (logits, new_model_state)``.
Every classifier also sows its penultimate features (the input of its last linear layer) into the
``intermediates`` collection; `make_features_fn` reads them (linear probes, `jaxpoison.ssl`).
"""

from __future__ import annotations

import functools

import jax

from jaxpoison.models.cnn import CifarCNN, MnistCNN
from jaxpoison.models.linf_dist import LinfDistNet
from jaxpoison.models.mlp import MLP
from jaxpoison.models.resnet import ResNet18, ResNet50, WideResNet28
from jaxpoison.models.vgg import VGG

MODELS = {
    "mlp": MLP,
    "cnn_mnist": MnistCNN,
    "cnn_cifar": CifarCNN,
    "vgg11": functools.partial(VGG, depth=11),
    "vgg16": functools.partial(VGG, depth=16),
    "vgg19": functools.partial(VGG, depth=19),
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "wrn28_10": WideResNet28,
    "linf_dist": LinfDistNet,
}


def make(name, *, num_classes, width=1.0, **kwargs):
    """Builds the model `name` of `MODELS`."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; use one of {sorted(MODELS)}.")
    return MODELS[name](num_classes=num_classes, width=width, **kwargs)


def make_apply_fn(module):
    """``apply_fn(variables, x, *, train) -> (logits, model_state)`` for `module`.

    In training mode BatchNorm uses batch statistics and the updated running statistics are
    returned as `model_state` (``{'batch_stats': ...}``); in eval mode the running statistics
    are used and `model_state` is the one passed in. Models without BatchNorm return ``{}``.
    """

    def apply_fn(variables, x, *, train):
        state = {k: v for k, v in variables.items() if k != "params"}
        if train and "batch_stats" in state:
            logits, new_state = module.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, dict(new_state)
        return module.apply(variables, x, train=train), state

    return apply_fn


def make_features_fn(module):
    """``features_fn(variables, x) -> [B, D]``: the eval-mode penultimate features of `module`.

    They are what each model sows as ``intermediates/features`` just before its last linear
    layer; the logits and the variables are unchanged (``init`` and ``apply`` do not keep the
    ``intermediates`` collection unless asked to).
    """

    def features_fn(variables, x):
        _, state = module.apply(variables, x, train=False, mutable=["intermediates"])
        return state["intermediates"]["features"][0]

    return features_fn


def init(module, key, image_shape):
    """Initial variables (``{'params': ..., maybe 'batch_stats': ...}``) for one image shape."""
    x = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
    return dict(module.init(key, x, train=False))


__all__ = ["MODELS", "init", "make", "make_apply_fn", "make_features_fn"]
