"""Dataset-level poisons, one registry and one interface (see `base.Poison`).

`POISONS[name](*, threat, num_classes, image_shape, **hyperparameters) -> Poison`. Poisons that
need a trained crafting model also take ``apply_fn`` and ``variables`` (see `REQUIRES_MODEL`);
the experiment trains that model on clean data with the victim trainer first.

Any poison can be restricted to part of the training set: ``make(name, fraction=..., classes=...)``
wraps it with `partial.restrict`.
"""

from jaxpoison.poisons import (
    adversarial,
    classwise,
    error_minimizing,
    l2c,
    partial,
    substandard,
    universal,
)
from jaxpoison.poisons.base import ClassWiseState, Poison, SampleWiseState
from jaxpoison.poisons.engine import apply_all, craft

POISONS = {
    "random": classwise.random,
    "regions": classwise.regions,
    "low_frequency": classwise.low_frequency,
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
}

# Names of POISONS whose factory takes a trained model (apply_fn, variables).
REQUIRES_MODEL = frozenset(
    {
        "adversarial",
        "error_maximizing",
        "mifgsm",
        "hypocritical",
        "universal_adversarial",
        "universal_hypocritical",
    }
)

# Names of POISONS that change labels or leave the threat model's ball by design.
UNBOUNDED = frozenset({"noise", "mislabeling"})


def make(name, *, fraction=None, classes=None, **kwargs):
    """Builds the poison `name` of `POISONS`, applied to a `fraction` of the training examples
    (of the given `classes`) when either is given (see `partial.restrict`)."""
    if name not in POISONS:
        raise ValueError(f"Unknown poison {name!r}; use one of {sorted(POISONS)}.")
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
]
