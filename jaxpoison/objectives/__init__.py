"""Training objectives (= defenses). All share one signature:

    objective(variables, batch, key, *, apply_fn) -> (loss, aux)

`variables` is ``{'params': ..., **model_state}``, `batch` a dict with 'image' and 'label',
`loss` a scalar (the mean over the batch) and ``aux = {'model_state': ..., 'metrics': {...}}``.
A factory ``make(**hyperparameters)`` returns the objective; the trainer takes the gradient of
`loss` with respect to ``variables['params']`` and never needs to know which objective it runs.
"""

from jaxpoison.objectives import erm

OBJECTIVES = {
    "erm": erm.make,
}


def make(name, **kwargs):
    """Builds the objective `name` of `OBJECTIVES` with its hyperparameters."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; use one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name](**kwargs)


__all__ = ["OBJECTIVES", "make"]
