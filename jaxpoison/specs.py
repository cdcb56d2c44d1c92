"""From a config to the objects it names: the threat ball, models, victims and poisons.

Every trainer builds these through this module, so one config field means one thing everywhere,
and every artifact's *record* (what determined it; `jaxpoison.workdir`) is made in one place.

* `threat`: the config's one `LpBall` (``config.threat``, or a poison spec's own ``threat``).
* `model_spec`: a model spec with ``name='auto'`` resolved from the data's image shape, checked
  to build on that shape before any work is done.
* `victim` / `surrogate`: the victim (crafting-model) spec, merged with per-architecture
  overrides, its model resolved.
* `poison_spec` / `make_poison` / `poison_record`: a run of ``config.poisons`` parsed, built,
  and keyed.
* `objective` / `evaluator`: an objective or evaluator spec with the config's one threat ball
  where the spec does not set its own radius.
* `selected`: the entries of ``config.poisons`` / ``objectives`` / ``victims`` chosen by
  ``config.select``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxpoison import _registry, models, objectives, poisons, privacy, train_state, transforms
from jaxpoison import threat as threat_lib
from jaxpoison.progress import say
from jaxpoison.workdir import ARTIFACT_VERSION, plain

# Fields of a poison spec that are not the factory's keyword arguments.
_RUN_FIELDS = ("name", "threat", "batch_size", "clean_extra", "surrogate")

# The model ``name='auto'`` stands for, by number of channels, and the shapes the named models
# were designed for (another shape works, with a note: a CNN's dense layer adapts).
AUTO_MODELS = {1: "cnn_mnist", 3: "cnn_cifar"}
DESIGNED_FOR = {"cnn_mnist": (28, 28, 1), "cnn_cifar": (32, 32, 3)}


def threat(config, spec=None):
    """The `LpBall` of ``spec['threat']`` when a poison spec has its own, else ``config.threat``
    (an `L0Ball` when its ``norm`` is ``'l0'``: then ``pixels`` is its radius, not ``epsilon``)."""
    fields = plain((spec or {}).get("threat") or config.threat)
    if fields.get("norm") == threat_lib.L0:
        if "pixels" not in fields:
            raise ValueError(
                f"threat {fields} has no pixels; norm='l0' needs pixels (e.g. 1), the number of "
                "pixels each image may change."
            )
        return threat_lib.make(**fields)
    if "epsilon" not in fields:
        raise ValueError(
            f"threat {fields} has no epsilon; set config.threat.epsilon (e.g. 8/255): jaxpoison "
            "has no default radius."
        )
    return threat_lib.make(**fields)


def selected(config, field):
    """``config[field]`` (a dict of named specs) restricted to ``config.select[field]``.

    An empty or absent selection keeps every entry. Unknown names are refused with the list.
    """
    table = plain(config.get(field) or {})
    chosen = tuple(plain((config.get("select") or {}).get(field) or ()))
    if not chosen:
        return table
    missing = sorted(set(chosen) - set(table))
    if missing:
        raise ValueError(
            f"config.select.{field}={chosen}: {missing} not among config.{field} ({sorted(table)})."
        )
    return {k: v for k, v in table.items() if k in chosen}


@functools.lru_cache(maxsize=64)
def _check_builds(name, width, image_shape, num_classes, options="{}"):
    """Traces the model `name` on `image_shape`; `options`: its other fields, as JSON."""
    module = models.make(name, num_classes=num_classes, width=width, **json.loads(options))
    x = jnp.zeros((1, *image_shape), jnp.float32)
    jax.eval_shape(lambda: module.apply(module.init(jax.random.key(0), x), x, train=False))


def _builds(*args):
    try:
        _check_builds(*args)
    except Exception:  # any failure: the model cannot take the shape
        return False
    return True


def model_spec(spec, image_shape, *, num_classes, what="model"):
    """`spec` (``{'name', 'width', ...}``) with ``name='auto'`` resolved for `image_shape`.

    Raises:
      ValueError: when the model cannot take images of `image_shape` (checked by tracing it,
        before any work), or 'auto' has no default for the number of channels.
    """
    spec = dict(plain(spec))
    image_shape = tuple(int(d) for d in image_shape)
    name = spec.get("name", "auto")
    if name == "auto":
        if image_shape[-1] not in AUTO_MODELS:
            raise ValueError(
                f"{what}: no default model for {image_shape} images; set its model.name to one "
                f"of {sorted(models.MODELS)}."
            )
        name = AUTO_MODELS[image_shape[-1]]
    elif DESIGNED_FOR.get(name, image_shape) != image_shape:
        say(
            f"note: {what} is {name}, designed for {DESIGNED_FOR[name]} images, on "
            f"{image_shape} images (model.name='auto' picks one for the data)."
        )
    if name not in models.MODELS:
        raise ValueError(
            f"{what}: unknown model {name!r}; use 'auto' or one of {sorted(models.MODELS)}."
        )
    # The model's own fields (normalization, pool, dtype, ...), as the trainer passes them: a bad
    # one is refused here, before any work, in its own line (not after hours of crafting).
    options = {k: v for k, v in spec.items() if k not in ("name", "width")}
    args = (name, float(spec.get("width", 1.0)), image_shape, int(num_classes))
    try:
        _check_builds(*args, json.dumps(options, sort_keys=True))
    except Exception as e:  # flax/XLA raise many types for a shape a model cannot take
        if options and isinstance(e, ValueError) and _builds(*args):  # the options are at fault
            raise ValueError(f"{what}: {str(e).splitlines()[0]}") from e
        raise ValueError(
            f"{what}: model {name!r} cannot take {image_shape} images "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); choose another model.name "
            "(or 'auto')."
        ) from e
    spec["name"] = name
    return spec


def _merged(base, overrides):
    """`base` (plain dicts) updated recursively by `overrides`."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Victim-spec sizes: field -> smallest allowed whole number.
_VICTIM_SIZES = {"epochs": 0, "batch_size": 1, "num_seeds": 1, "eval_batch_size": 1}


def _check_sizes(spec, what):
    for field, least in _VICTIM_SIZES.items():
        value = spec.get(field, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{what}.{field}={value!r}: give a whole number >= {least}.")
    every = spec.get("checkpoint_every", 0)
    if not isinstance(every, int) or every < 0:
        raise ValueError(
            f"{what}.checkpoint_every={every!r}: give a whole number of epochs >= 0 (0: the end)."
        )
    width = spec.get("model", {}).get("width", 1.0)
    if not isinstance(width, (int, float)) or not 0 < width < float("inf"):
        raise ValueError(f"{what}.model.width={width!r}: give a positive number (1.0 = full).")
    optimizer = dict(spec.get("optimizer", {}))
    rate = optimizer.get("learning_rate", 1.0)
    if not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
        raise ValueError(f"{what}.optimizer.learning_rate={rate!r}: give a positive number.")
    decay = optimizer.get("weight_decay", 0.0)
    if not isinstance(decay, (int, float)) or not 0 <= decay < float("inf"):
        raise ValueError(f"{what}.optimizer.weight_decay={decay!r}: give a number >= 0.")
    momentum = optimizer.get("momentum") or 0.0
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"{what}.optimizer.momentum={momentum!r}: give a number in [0, 1).")
    groups, seeds = spec.get("seed_devices", 1), spec.get("num_seeds", 1)
    devices = jax.device_count()
    if (
        not isinstance(groups, int)
        or isinstance(groups, bool)
        or groups < 1
        or devices % groups
        or seeds % groups
    ):
        raise ValueError(
            f"{what}.seed_devices={groups!r}: give a divisor of both the {devices} devices and "
            f"num_seeds={seeds} (1: every device trains every seed)."
        )
    strategy = spec.get("seed_strategy", "auto")
    if strategy not in ("auto", "vmap", "map"):
        raise ValueError(f"{what}.seed_strategy={strategy!r}: use 'auto', 'vmap' or 'map'.")
    try:  # the optimizer's name, schedule and warmup, as training will build it
        train_state.make_optimizer(
            epochs=spec.get("epochs", 1),
            steps_per_epoch=1000,
            **{"learning_rate": 1.0, **optimizer},
        )
    except TypeError as e:
        raise ValueError(
            f"{what}.optimizer: {e}; its fields are those of train_state.make_optimizer."
        ) from None
    except ValueError as e:
        raise ValueError(f"{what}.optimizer: {e}") from None


def victim(config, overrides=None, *, image_shape, num_classes, field="victim"):
    """``config[field]`` updated by `overrides` (e.g. an entry of ``config.victims``), its model
    resolved (`model_spec`), as a ConfigDict for `training.Trainer.from_config`.

    Raises:
      ValueError: a size that is not a whole number in range (epochs, batch sizes, seeds), a
        width or learning rate that is not positive, or a model the data cannot feed.
    """
    spec = _merged(plain(config[field]), plain(overrides or {}))
    _check_sizes(spec, f"config.{field}")
    spec["model"] = model_spec(
        spec.get("model", {"name": "auto"}),
        image_shape,
        num_classes=num_classes,
        what=f"config.{field}",
    )
    return ml_collections.ConfigDict(spec)


def surrogate(config, overrides=None, *, image_shape, num_classes):
    """The crafting model's spec: ``config.surrogate`` updated by a poison's ``surrogate``."""
    if not config.get("surrogate"):
        raise ValueError(
            "a poison needs a crafting model but the config has no surrogate block; add "
            "config.surrogate (a victim-style spec: model, epochs, batch_size, optimizer)."
        )
    return victim(
        config, overrides, image_shape=image_shape, num_classes=num_classes, field="surrogate"
    )


def _with_threat(kind, registry, spec, config):
    """`spec` with the config's threat fields (``norm``, ``epsilon``, ``mask``) filled in where its
    factory takes them and the spec does not set them: one ball for attacker, defender and
    evaluation unless a spec names its own."""
    spec = dict(plain(spec))
    name = spec.get("name")
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; use one of {sorted(registry)}.")
    fields = plain(config.get("threat") or {})
    for field in ("norm", "epsilon", "mask"):
        if field in fields and field not in spec and _registry.accepts(registry[name], field):
            spec[field] = fields[field]
    return spec


def objective(config, spec):
    """An objective spec (``{'name', **kwargs}`` of `objectives.OBJECTIVES`) with the config's
    threat fields where it takes them and does not set them."""
    return _with_threat("objective", objectives.OBJECTIVES, spec, config)


class Defense(NamedTuple):
    """A defense, built: its objective, data-side transforms and DP-SGD settings (or None)."""

    objective: Callable
    transforms: transforms.Pipeline
    privacy: privacy.DPSGD | None


def defense(spec, *, num_classes=None):
    """Builds an objective spec: ``{'name', **kwargs}`` of `objectives.OBJECTIVES`, optionally
    ``transforms`` (`jaxpoison.transforms`; they get `num_classes` where they take it) and
    ``privacy`` (DP-SGD's fields, `jaxpoison.privacy`). Returns a `Defense`.

    Raises:
      ValueError: an unknown objective or transform, a keyword either does not take, a
        label-mixing transform with an objective other than ``erm``, or bad DP-SGD settings.
    """
    fields = dict(plain(spec))
    name = fields.pop("name", None)
    pipeline = transforms.make(fields.pop("transforms", None), num_classes=num_classes)
    if pipeline.mixes_labels and name != "erm":
        raise ValueError(
            f"transforms {list(pipeline.names)} mix labels, which only objective 'erm' trains "
            f"on, not {name!r}; drop the mixing transform or use erm."
        )
    dp = privacy.make(fields.pop("privacy", None))
    return Defense(objectives.make(name, **fields), pipeline, dp)


def evaluator(config, spec):
    """An evaluator spec (``{'name', **kwargs}`` of `risk.EVALUATORS`) with the config's threat
    fields where it takes them and does not set them."""
    from jaxpoison.evaluation import risk

    return _with_threat("evaluator", risk.EVALUATORS, spec, config)


@dataclasses.dataclass(frozen=True)
class PoisonSpec:
    """One run of ``config.poisons``, parsed.

    Attributes:
      run: the run's name (key in ``config.poisons``).
      name: the poison's name in `poisons.POISONS`.
      kwargs: the factory's keyword arguments (``fraction`` / ``classes`` included).
      threat: the `LpBall` it is crafted in, and `threat_fields` the config fields it came from.
      craft: keyword arguments of `poisons.craft` (``batch_size``).
      surrogate: overrides of ``config.surrogate`` for its own crafting model, or None.
      clean_extra: clean examples added to its training set (see the grid trainer).
    """

    run: str
    name: str
    kwargs: dict
    threat: threat_lib.LpBall
    threat_fields: dict
    craft: dict
    surrogate: dict | None
    clean_extra: int

    @property
    def requires_model(self):
        return self.name in poisons.REQUIRES_MODEL


def poison_spec(config, run, *, image_shape, num_classes):
    """Parses ``config.poisons[run]``; a crafting model named in it (``model``) is resolved."""
    spec = plain(config.poisons[run])
    name = spec.get("name")
    if name not in poisons.POISONS:
        raise ValueError(
            f"poisons.{run}.name={name!r} is unknown; use one of {sorted(poisons.POISONS)}."
        )
    kwargs = {k: v for k, v in spec.items() if k not in _RUN_FIELDS}
    if isinstance(kwargs.get("model"), dict):
        kwargs["model"] = model_spec(
            kwargs["model"], image_shape, num_classes=num_classes, what=f"poisons.{run}.model"
        )
    ball = threat(config, spec)
    return PoisonSpec(
        run=run,
        name=name,
        kwargs=kwargs,
        threat=ball,
        threat_fields=plain(spec.get("threat") or config.threat),
        craft={k: spec[k] for k in ("batch_size",) if k in spec},
        surrogate=spec.get("surrogate"),
        clean_extra=int(spec.get("clean_extra", 0) or 0),
    )


def make_poison(ps, *, image_shape, num_classes, apply_fn=None, variables=None):
    """Builds the `Poison` of a `PoisonSpec`; a crafting model's (apply_fn, variables) when it
    needs one (None is enough to *apply* a stored state)."""
    model = dict(apply_fn=apply_fn, variables=variables) if ps.requires_model else {}
    try:
        return poisons.make(
            ps.name,
            threat=ps.threat,
            num_classes=num_classes,
            image_shape=tuple(image_shape),
            **model,
            **ps.kwargs,
        )
    except ValueError as e:
        raise ValueError(f"poisons.{ps.run}: {e}") from e


def _check_mask(ball, image_shape, what):
    if ball.mask is None:
        return
    try:
        fits = jnp.broadcast_shapes(ball.mask.shape, tuple(image_shape)) == tuple(image_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{what}.mask of shape {tuple(ball.mask.shape)} does not fit {tuple(image_shape)} "
            "images; give one (H, W, C) or (H, W, 1) mask of the data's size."
        )


def check(config, *, image_shape, num_classes, victims=True):
    """Builds every selected spec of `config` that names a model or a poison, before any work.

    A bad model name, a model that cannot take the data's shape, an objective or evaluator that
    does not exist, an optimizer field training would refuse, a poison argument its factory
    does not take or a poison its factory refuses for this data (e.g. Regions-1 on one channel:
    2 sign patterns for 10 classes) is then one clear ValueError at the start of a run, not
    after hours of crafting. With ``victims=False`` the victim specs are left to the trainer.
    """
    shape = dict(image_shape=image_shape, num_classes=num_classes)
    if config.get("threat"):
        _check_mask(threat(config), image_shape, "config.threat")
    threshold = config.get("loss_threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0:
        raise ValueError(
            f"config.loss_threshold={threshold!r}: give a positive training loss (e.g. 0.5)."
        )
    for label, spec in selected(config, "objectives").items():
        try:
            defense(objective(config, spec), num_classes=num_classes)
        except ValueError as e:
            raise ValueError(f"objectives.{label}: {e}") from e
    for spec in plain(config.get("evals") or {}).values():
        evaluator(config, spec)
    if victims:
        for overrides in (selected(config, "victims") or {"": {}}).values():
            victim(config, overrides, **shape)
    for run in selected(config, "poisons"):
        ps = poison_spec(config, run, **shape)
        _check_mask(ps.threat, image_shape, f"poisons.{run}.threat")
        if ps.requires_model:
            surrogate(config, ps.surrogate, **shape)
        try:  # builds the factory's closures only (a crafting model is not needed for that)
            make_poison(ps, **shape)
        except ValueError as e:
            others = tuple(r for r in selected(config, "poisons") if r != run)
            raise ValueError(
                f'{e} (to run the others without it: --config.select.poisons="{others}")'
            ) from e


def _keyed_specs(value):
    """`value` with every model spec in it (a dict whose ``name`` is in `models.MODELS`) as
    `models.keyed_fields` keys it: fields added to the model later, at their defaults, left out."""
    if isinstance(value, dict):
        value = {k: _keyed_specs(v) for k, v in value.items()}
        name = value.get("name")
        return models.keyed_fields(
            models.MODELS.get(name) if isinstance(name, str) else None, value
        )
    if isinstance(value, (list, tuple)):
        return [_keyed_specs(v) for v in value]
    return value


def poison_record(ps, *, fingerprint, image_shape, num_classes, key, surrogate_key=None):
    """What determines a crafted poison: the content-key record of its artifact.

    A factory argument named ``path`` (a file the poison reads, e.g. ``from_file``'s) enters
    with the sha256 of the file's bytes, so a file changed on disk is read afresh. A model spec
    among the arguments (L2C's ``victim``) enters without the fields added to its model later
    at their defaults (`models.keyed_fields`), so the poisons crafted before keep their keys.
    """
    files = {}
    if isinstance(ps.kwargs.get("path"), str) and Path(ps.kwargs["path"]).is_file():
        files["path"] = hashlib.sha256(Path(ps.kwargs["path"]).read_bytes()).hexdigest()
    return {
        "files": files,
        "kind": "poison",
        "version": ARTIFACT_VERSION,
        "name": ps.name,
        "kwargs": _keyed_specs(ps.kwargs),
        "threat": ps.threat_fields,
        "craft": ps.craft,
        "data": fingerprint,
        "image_shape": list(image_shape),
        "num_classes": int(num_classes),
        "key": key,
        "surrogate": surrogate_key,
    }


__all__ = [
    "AUTO_MODELS",
    "PoisonSpec",
    "Defense",
    "check",
    "defense",
    "evaluator",
    "make_poison",
    "model_spec",
    "objective",
    "poison_record",
    "poison_spec",
    "selected",
    "surrogate",
    "threat",
    "victim",
]
