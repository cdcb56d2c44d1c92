"""Dataset-level poisons, one registry and one interface (see `base.Poison`).

`POISONS[name](*, threat, num_classes, image_shape, **hyperparameters) -> Poison`. Poisons that
need a trained crafting model also take ``apply_fn`` and ``variables`` (see `REQUIRES_MODEL`);
the experiment trains that model on clean data with the victim trainer first.

Any poison can be restricted to part of the training set: ``make(name, fraction=..., classes=...)``
wraps it with `partial.restrict`. Add your own poison with `register`.
"""

from jaxpoison import _registry
from jaxpoison.poisons import (
    adversarial,
    classwise,
    error_minimizing,
    from_file,
    l2c,
    partial,
    substandard,
    synthetic,
    universal,
)
from jaxpoison.poisons.base import ClassWiseState, Poison, SampleWiseState
from jaxpoison.poisons.engine import apply_all, craft

POISONS = {
    "random": classwise.random,
    "regions": classwise.regions,
    "low_frequency": classwise.low_frequency,
    "lsp": synthetic.lsp,
    "autoregressive": synthetic.autoregressive,
    "adversarial": adversarial.adversarial,
    "error_maximizing": adversarial.error_maximizing,
    "mifgsm": adversarial.mifgsm,
    "hypocritical": adversarial.hypocritical,
    "universal_adversarial": universal.universal_adversarial,
    "universal_hypocritical": universal.universal_hypocritical,
    "error_minimizing": error_minimizing.error_minimizing,
    "noise": substandard.noise,
    "mislabeling": substandard.mislabeling,
    "l2c": l2c.l2c,
    "from_file": from_file.from_file,
}

# Names of POISONS whose factory takes a trained model (apply_fn, variables); `register` adds to it.
REQUIRES_MODEL = set(
    {
        "adversarial",
        "error_maximizing",
        "mifgsm",
        "hypocritical",
        "universal_adversarial",
        "universal_hypocritical",
    }
)

# Names of POISONS that change labels or leave the threat model's ball by design; `register` adds
# to it.
UNBOUNDED = {"noise", "mislabeling"}


def register(name, factory, *, requires_model=False, unbounded=False, overwrite=False):
    """Adds a poison to `POISONS`, so `make`, the configs and the report know it.

    The factory follows `base.Poison`'s contract: it takes keyword arguments ``threat`` (an
    `LpBall`), ``num_classes``, ``image_shape`` (H, W, C) and its own hyperparameters, and returns a
    `Poison` whose functions are pure (they are jitted by `craft` and `apply_all`).

    Args:
      name: the name configs use (``config.poisons.<run>.name``).
      factory: ``factory(*, threat, num_classes, image_shape, **hyperparameters) -> Poison``.
      requires_model: the factory also takes ``apply_fn`` and ``variables``, a crafting model that
        the experiment trains on clean data first (added to `REQUIRES_MODEL`).
      unbounded: the poison changes labels or leaves the threat model's ball by design, so the
        bound checks skip it (added to `UNBOUNDED`).
      overwrite: replace a poison already registered under `name` (a built-in one included).

    Example::

      def my_poison(*, threat, num_classes, image_shape, strength=1.0):
          ...  # return base.Poison(init=..., update=..., apply=..., num_epochs=...)

      poisons.register("mine", my_poison)
      poison = poisons.make("mine", threat=tm, num_classes=10, image_shape=(32, 32, 3))
    """
    _registry.add(POISONS, name, factory, kind="poison", overwrite=overwrite)
    for names, member in ((REQUIRES_MODEL, requires_model), (UNBOUNDED, unbounded)):
        if member:
            names.add(name)
        else:
            names.discard(name)


def make(name, /, *, fraction=None, classes=None, **kwargs):
    """Builds the poison `name` of `POISONS`, applied to a `fraction` of the training examples
    (of the given `classes`) when either is given (see `partial.restrict`).

    Raises:
      ValueError: `name` is not registered, or `kwargs` hold a keyword its factory does not take
        (the message lists those it does) or lack one it needs.
    """
    if name not in POISONS:
        raise ValueError(f"Unknown poison {name!r}; use one of {sorted(POISONS)}.")
    _registry.check_arguments("poison", name, POISONS[name], kwargs)
    poison = POISONS[name](**kwargs)
    if fraction is None and classes is None:
        return poison
    return partial.restrict(poison, fraction=1.0 if fraction is None else fraction, classes=classes)


__all__ = [
    "POISONS",
    "REQUIRES_MODEL",
    "ClassWiseState",
    "Poison",
    "SampleWiseState",
    "UNBOUNDED",
    "apply_all",
    "craft",
    "make",
    "register",
]
