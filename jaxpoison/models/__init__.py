"""Flax classifiers, each with a `width` multiplier so tests and CPU runs can shrink them.

`MODELS[name](num_classes=..., width=...)` builds a module whose `__call__(x, train)` maps float
images in [0, 1] to logits (add your own flax module with `register`). `make_apply_fn` wraps a
module into the one calling convention the rest of the library uses:
``apply_fn(variables, x, *, train) -> (logits, new_model_state)``.
Every classifier also sows its penultimate features (the input of its last linear layer) into the
``intermediates`` collection; `make_features_fn` reads them (linear probes, `jaxpoison.ssl`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpoison import _registry
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


def register(name, module_factory, *, overwrite=False):
    """Adds a classifier to `MODELS`, so every place that takes a model name accepts it (the victim,
    the surrogate, error-minimizing noise's crafting model, L2C's victim).

    The contract: ``module_factory(*, num_classes, **hyperparameters)`` (a flax module class
    is one) returns a flax module whose ``__call__(x, train)`` maps float32 images
    [B, H, W, C] in [0, 1] to logits [B, num_classes]. ``train`` is a keyword: True during
    training (dropout on, BatchNorm on batch statistics, which it keeps in the ``batch_stats``
    collection), False for evaluation and for the attacks run against the model. The module
    should work for any H, W (the data decide them). If it also takes ``width`` (a multiplier of
    its channels), configs can shrink it; if it sows its penultimate features
    (``self.sow('intermediates', 'features', h)``), `make_features_fn` and linear probes work too.

    Args:
      name: the name configs use (``config.victim.model.name``).
      module_factory: the flax module class, or a function returning a module.
      overwrite: replace a model already registered under `name`.

    Example::

      class Tiny(nn.Module):
          num_classes: int

          @nn.compact
          def __call__(self, x, train):
              return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))

      models.register("tiny", Tiny)
      module = models.make("tiny", num_classes=10)
    """
    _registry.add(MODELS, name, module_factory, kind="model", overwrite=overwrite)


# Fields added to a model after artifacts were first keyed by it, with the defaults that build the
# earlier model: a victim's checkpoints are keyed by its module's repr, a poison's record holds the
# model specs it names (L2C's crafting victim, error-minimizing noise's model). `keyed_fields`
# leaves these fields out at their defaults, so adding them kept every earlier key.
ADDED_FIELDS = {MnistCNN: {"normalization": "none", "pool": "max"}}


def keyed_fields(factory, fields):
    """`fields` (a model's hyperparameters by name) without the `ADDED_FIELDS` of `factory` (a
    class of `MODELS`) that hold their defaults: what an artifact's key records of the model.

    Nor those of another model, at their defaults, that `factory` does not take: a config that
    holds cnn_mnist's ``normalization='none', pool='max'`` may name another model
    (``--config.poisons.l2c.victim.name=mlp``), which is then built and keyed as without them.
    """
    added = dict(ADDED_FIELDS.get(factory, {}))
    if factory is not None:
        for other, defaults in ADDED_FIELDS.items():
            added |= {
                k: v
                for k, v in defaults.items()
                if other is not factory and not _registry.accepts(factory, k)
            }
    return {k: v for k, v in fields.items() if k not in added or added[k] != v}


# A model spec's ``dtype`` (the computation's precision; parameters, optimizer state and logits
# stay float32): mixed precision with ``bfloat16`` halves activation memory on GPU/TPU.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def make(name, /, *, num_classes, width=1.0, **kwargs):
    """Builds the model `name` of `MODELS`.

    `width` is passed when the model takes it; a model without a ``width`` field accepts only the
    default 1.0. A ``dtype`` given by name (``"bfloat16"``, from a config) is converted with
    `COMPUTE_DTYPES`.

    Raises:
      ValueError: `name` is not registered, or `kwargs` hold a keyword the model does not take
        (the message lists those it does) or lack one it needs.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; use one of {sorted(MODELS)}.")
    factory = MODELS[name]
    kwargs = dict(kwargs, num_classes=num_classes)
    if isinstance(kwargs.get("dtype"), str):  # a config's "bfloat16"
        if kwargs["dtype"] not in COMPUTE_DTYPES:
            raise ValueError(
                f"model {name!r}: dtype={kwargs['dtype']!r}; use one of {sorted(COMPUTE_DTYPES)} "
                "(the computation's precision; parameters stay float32)."
            )
        kwargs["dtype"] = COMPUTE_DTYPES[kwargs["dtype"]]
    if width != 1.0 or _registry.accepts(factory, "width"):
        kwargs["width"] = width
    # flax modules take `parent` too, which is wired by flax and no business of a config.
    _registry.check_arguments("model", name, factory, kwargs, hidden=("parent",))
    return factory(**kwargs)


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


__all__ = [
    "ADDED_FIELDS",
    "MODELS",
    "init",
    "keyed_fields",
    "make",
    "make_apply_fn",
    "make_features_fn",
    "register",
]
