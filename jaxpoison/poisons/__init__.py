"""Dataset-level poisons, one registry and one interface (see `base.Poison`).

`POISONS[name](*, threat, num_classes, image_shape, **hyperparameters) -> Poison`. Poisons that
need a trained crafting model also take ``apply_fn`` and ``variables`` (see `REQUIRES_MODEL`);
the experiment trains that model on clean data with the victim trainer first.

Any poison can be restricted to part of the training set: ``make(name, fraction=..., classes=...)``
wraps it with `partial.restrict`. Add your own poison with `register`.
"""

from jaxpoison import _registry
from jaxpoison import threat as threat_lib
from jaxpoison.poisons import (
    adversarial,
    badnets,
    classwise,
    convolution,
    error_minimizing,
    from_file,
    functional,
    l2c,
    meta_poison,
    ntga,
    one_pixel,
    partial,
    robust,
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
    "one_pixel": one_pixel.one_pixel,
    "cuda": convolution.cuda,
    "adversarial": adversarial.adversarial,
    "error_maximizing": adversarial.error_maximizing,
    "tap": adversarial.tap,
    "mifgsm": adversarial.mifgsm,
    "hypocritical": adversarial.hypocritical,
    "universal_adversarial": universal.universal_adversarial,
    "universal_hypocritical": universal.universal_hypocritical,
    "error_minimizing": error_minimizing.error_minimizing,
    "robust_error_minimizing": robust.robust_error_minimizing,
    "stable_error_minimizing": robust.stable_error_minimizing,
    "noise": substandard.noise,
    "mislabeling": substandard.mislabeling,
    "l2c": l2c.l2c,
    "meta_poison": meta_poison.meta_poison,
    "ntga": ntga.ntga,
    "from_file": from_file.from_file,
    "badnets": badnets.badnets,
    "stadv": functional.stadv,
    "recoloradv": functional.recoloradv,
}

# Names of POISONS whose factory takes a trained model (apply_fn, variables); `register` adds to it.
REQUIRES_MODEL = set(
    {
        "adversarial",
        "error_maximizing",
        "tap",
        "mifgsm",
        "hypocritical",
        "universal_adversarial",
        "universal_hypocritical",
        "stadv",
        "recoloradv",
    }
)

# Names of POISONS that change labels or leave the threat model's ball by design; `register` adds
# to it.
UNBOUNDED = {"noise", "mislabeling", "cuda", "badnets", "stadv", "recoloradv"}

# Names of POISONS that take the l0 ball (`threat.L0Ball`, ``norm='l0'``): those that search or
# ignore the ball; the others take gradient steps or scale to an lp radius and refuse it.
# `register` adds to it.
L0_POISONS = {"one_pixel", "cuda", "noise", "mislabeling", "from_file", "badnets"}


def register(name, factory, *, requires_model=False, unbounded=False, l0=False, overwrite=False):
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
      l0: the factory also takes an `threat.L0Ball` as ``threat`` (added to `L0_POISONS`).
      overwrite: replace a poison already registered under `name` (a built-in one included).

    Example::

      def my_poison(*, threat, num_classes, image_shape, strength=1.0):
          ...  # return base.Poison(init=..., update=..., apply=..., num_epochs=...)

      poisons.register("mine", my_poison)
      poison = poisons.make("mine", threat=tm, num_classes=10, image_shape=(32, 32, 3))
    """
    _registry.add(POISONS, name, factory, kind="poison", overwrite=overwrite)
    for names, member in (
        (REQUIRES_MODEL, requires_model),
        (UNBOUNDED, unbounded),
        (L0_POISONS, l0),
    ):
        if member:
            names.add(name)
        else:
            names.discard(name)


def make(name, /, *, fraction=None, classes=None, per_class=False, **kwargs):
    """Builds the poison `name` of `POISONS`, applied to a `fraction` of the training examples
    (of the given `classes`; of each class with `per_class`) when either is given (see
    `partial.restrict`).

    Raises:
      ValueError: `name` is not registered, `kwargs` hold a keyword its factory does not take
        (the message lists those it does) or lack one it needs, or the threat is the l0 ball and
        the poison does not take it (not in `L0_POISONS`).
    """
    if name not in POISONS:
        raise ValueError(f"Unknown poison {name!r}; use one of {sorted(POISONS)}.")
    if isinstance(kwargs.get("threat"), threat_lib.L0Ball) and name not in L0_POISONS:
        raise ValueError(
            f"poison {name!r} needs an l-infinity or l2 ball (threat norm 'linf' or 'l2'); the l0 "
            f"ball (norm='l0') is taken by {sorted(L0_POISONS)}."
        )
    _registry.check_arguments("poison", name, POISONS[name], kwargs)
    poison = POISONS[name](**kwargs)
    if fraction is not None or classes is not None:
        fraction = 1.0 if fraction is None else fraction
        poison = partial.restrict(poison, fraction=fraction, classes=classes, per_class=per_class)
    return poison._replace(num_classes=kwargs.get("num_classes"))


__all__ = [
    "POISONS",
    "REQUIRES_MODEL",
    "ClassWiseState",
    "Poison",
    "SampleWiseState",
    "UNBOUNDED",
    "L0_POISONS",
    "apply_all",
    "craft",
    "make",
    "register",
]
