"""Dataset-level poisons, one registry and one interface (see `base.Poison`).

`POISONS[name](*, threat, num_classes, image_shape, **hyperparameters) -> Poison`. Poisons that
need a trained crafting model also take ``apply_fn`` and ``variables`` (see `REQUIRES_MODEL`);
the experiment trains that model on clean data with the victim trainer first.
"""

from jaxpoison.poisons import classwise
from jaxpoison.poisons.base import ClassWiseState, Poison, SampleWiseState
from jaxpoison.poisons.engine import apply_all, craft

POISONS = {
    "random": classwise.random,
    "regions": classwise.regions,
    "low_frequency": classwise.low_frequency,
}

# Names of POISONS whose factory takes a trained model (apply_fn, variables).
REQUIRES_MODEL = frozenset()


def make(name, **kwargs):
    """Builds the poison `name` of `POISONS`."""
    if name not in POISONS:
        raise ValueError(f"Unknown poison {name!r}; use one of {sorted(POISONS)}.")
    return POISONS[name](**kwargs)


__all__ = [
    "POISONS",
    "REQUIRES_MODEL",
    "ClassWiseState",
    "Poison",
    "SampleWiseState",
    "apply_all",
    "craft",
    "make",
]
