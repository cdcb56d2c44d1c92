"""What the registries (`poisons.POISONS`, `objectives.OBJECTIVES`, `models.MODELS`,
`evaluation.EVALUATORS`) share: adding a user's factory, and checking a factory's keywords
before it is called, so a misspelt or leaked config key is one clear line, not a `TypeError`
from deep inside (a `TypeError` the factory itself raises is left alone).
"""

from __future__ import annotations

import inspect

_KEYWORD = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _parameters(factory, hidden):
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a signature (a builtin): nothing to check
        return None
    return {n: p for n, p in params.items() if n not in hidden}


def accepts(factory, argument):
    """Whether ``factory(**{argument: ...})`` binds (true for a factory taking ``**kwargs``)."""
    params = _parameters(factory, ())
    if params is None:
        return True
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or (
        argument in params and params[argument].kind in _KEYWORD
    )


def check_arguments(kind, name, factory, kwargs, *, hidden=()):
    """Raises ValueError unless ``factory(**kwargs)`` binds: no unknown and no missing keyword.

    Args:
      kind: what the factory builds, for the message ("poison", "objective", ...).
      name: its registry name.
      factory: the registered callable.
      kwargs: the keywords it is about to be called with.
      hidden: parameters that exist but are neither accepted nor listed (flax's ``parent``).
    """
    params = _parameters(factory, hidden)
    if params is None:
        return
    accepted = [n for n, p in params.items() if p.kind in _KEYWORD]
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ValueError(
                f"{kind} {name!r} does not take argument(s) {unknown}; it accepts: {accepted}."
            )
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and (n not in kwargs or p.kind is p.POSITIONAL_ONLY)
    ]
    if missing:
        raise ValueError(
            f"{kind} {name!r} needs argument(s) {missing}, which were not given; it accepts: "
            f"{accepted}."
        )


def add(registry, name, factory, *, kind, overwrite):
    """``registry[name] = factory``; refuses a non-callable, or a taken name unless `overwrite`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"A {kind} name must be a non-empty string, got {name!r}.")
    if not callable(factory):
        raise ValueError(f"The {kind} factory for {name!r} must be callable, got {factory!r}.")
    if name in registry and not overwrite:
        raise ValueError(
            f"{kind} {name!r} is already registered; pick another name or pass overwrite=True."
        )
    registry[name] = factory
