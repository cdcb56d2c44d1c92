"""The poisoning stage every trainer shares: crafting models, crafted poisons, clean additions.

Every artifact is content-addressed (`jaxpoison.workdir`): a surrogate's checkpoints live under
``checkpoints/surrogate[_<run>]/<key>``, a crafting run's under ``checkpoints/craft_<run>/<key>``
and the crafted poison under ``poison/<run>/<key>``, where ``<key>`` hashes everything that
determined it (the spec, the clean data, the PRNG key, the surrogate's own key, the code's
`workdir.ARTIFACT_VERSION`). A changed spec is crafted afresh; an unchanged one is reused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxpoison import checkpointing, data, poisons, specs, training
from jaxpoison.poisons import storage
from jaxpoison.progress import say
from jaxpoison.workdir import canonical, content_key, differences, keyed_dir, plain, run_key


@dataclasses.dataclass(frozen=True)
class Crafted:
    """A crafted poison run: the poisoned training set and where its artifact lives."""

    images: np.ndarray  # float32 [N, H, W, C] in [0, 1]
    labels: np.ndarray  # int32 [N]
    artifact: Path
    key: str  # the artifact's content key


def train_surrogate(
    config, dataset, *, key, workdir, progress, overrides=None, name="surrogate", num_models=1
):
    """Trains the crafting model on clean data, or an ensemble of `num_models` of them (seeds of
    one run, trained together on a leading axis).

    Returns:
      (apply_fn, variables, the checkpoints' content key): the variables of seed 0 for one model,
      else those of the `num_models` seeds stacked on a leading axis. The content key counts the
      seeds, so an ensemble's checkpoints never stand in for one model's.
    """
    spec = specs.surrogate(
        config, overrides, image_shape=dataset.image_shape, num_classes=dataset.num_classes
    )
    trainer = training.Trainer.from_config(
        spec, num_classes=dataset.num_classes, image_shape=dataset.image_shape
    )
    td = training.train_data_from(
        dataset.x_train,
        dataset.y_train,
        dataset,
        crop_padding=config.data.get("crop_padding", 0),
        flip=config.data.get("flip", False),
    )
    states, history = trainer.fit(
        td,
        key=key,
        num_seeds=num_models,
        name=name,
        progress=progress,
        ckpt_dir=Path(workdir) / "checkpoints" / name,
    )
    if num_models == 1:
        states = jax.tree.map(lambda a: a[0], states)
    variables = {"params": states.params, **states.model_state}
    accuracy = " ".join(f"{a:.4f}" for a in history["test/accuracy"][-1])
    say(f"{name}: clean test accuracy {accuracy}")
    record_key = content_key(trainer.record(td, key=key, num_seeds=num_models))
    return trainer.apply_fn, variables, record_key


def craft_poisons(config, dataset, *, key, workdir, progress=True):
    """Crafts (or reloads) every selected poison of ``config.poisons``: {run: `Crafted`}.

    A spec's ``surrogate`` (fields of ``config.surrogate``, e.g. ``model``) gives that poison
    its own crafting model (trained once per distinct spec); without it the poisons share
    ``config.surrogate``. A spec's ``num_models`` (a factory argument of the ensemble-capable
    poisons, e.g. ``tap``) asks for that many crafting models: the surrogate is trained as that
    many seeds of one run, and the poison receives their variables stacked on a leading axis.
    """
    out, surrogates = {}, {}
    x_clean = dataset.x_train  # uint8: converted per batch on the devices
    fingerprint = dataset.fingerprint()
    shape, k = dataset.image_shape, dataset.num_classes
    for run in specs.selected(config, "poisons"):
        ps = specs.poison_spec(config, run, image_shape=shape, num_classes=k)
        model, surrogate_key = {}, None
        if ps.requires_model:
            tag = f"surrogate_{run}" if ps.surrogate else "surrogate"
            spec_key = repr(plain(ps.surrogate or {}))
            num_models = ps.kwargs.get("num_models", 1)
            cache = (spec_key, num_models)
            if cache not in surrogates:
                surrogates[cache] = train_surrogate(
                    config,
                    dataset,
                    key=run_key(key, "surrogate" if not ps.surrogate else spec_key),
                    workdir=workdir,
                    progress=progress,
                    overrides=ps.surrogate,
                    name=tag,
                    num_models=num_models,
                )
            apply_fn, variables, surrogate_key = surrogates[cache]
            model = dict(apply_fn=apply_fn, variables=variables)
        poison = specs.make_poison(ps, image_shape=shape, num_classes=k, **model)
        pkey = run_key(key, f"poison/{run}")
        record = specs.poison_record(
            ps,
            fingerprint=fingerprint,
            image_shape=shape,
            num_classes=k,
            key=pkey,
            surrogate_key=surrogate_key,
        )
        artifact = keyed_dir(Path(workdir) / "poison" / run, record)
        if (artifact / "metadata.json").is_file():
            template = jax.eval_shape(
                poison.init,
                pkey,
                {
                    "image": jax.ShapeDtypeStruct(x_clean.shape, np.float32),
                    "label": jax.ShapeDtypeStruct(dataset.y_train.shape, np.int32),
                },
            )
            state, _ = storage.load(artifact, template, fingerprint=fingerprint, record=record)
            say(f"poison {run}: loaded from {artifact}")
        else:
            t0 = time.time()
            state, _ = poisons.craft(
                poison,
                x_clean,
                dataset.y_train,
                key=pkey,
                ckpt_dir=keyed_dir(Path(workdir) / "checkpoints" / f"craft_{run}", record),
                start_from=shorter_craft(workdir, run, record) if poison.extendable else None,
                name=f"craft {run}",
                progress=progress,
                **ps.craft,
            )
            storage.save(
                artifact,
                state,
                name=ps.name,
                spec=ps.kwargs,
                threat=ps.threat,
                dataset_name=dataset.name,
                fingerprint=fingerprint,
                record=record,
            )
            say(f"poison {run}: crafted in {time.time() - t0:.1f}s")
        images, labels = poisons.apply_all(poison, state, x_clean, dataset.y_train)
        if ps.name not in poisons.UNBOUNDED:
            check_bounds(ps, x_clean, dataset.y_train, images, labels)
        out[run] = Crafted(images, labels, artifact, content_key(record))
    return out


def shorter_craft(workdir, run, record):
    """The crafting checkpoints of the longest finished shorter craft of `run` in `workdir`
    that a craft of `record` continues, or None.

    A finished craft left its artifact under ``poison/<run>/``; one whose record is `record` but
    for a smaller ``kwargs.num_epochs``, and whose checkpoints still hold its last epoch, is the
    start of this craft when the poison is `extendable` (`poisons.craft`'s ``start_from``).
    """
    wanted = canonical(record)
    epochs = wanted["kwargs"].get("num_epochs")
    best = None
    for path in sorted((Path(workdir) / "poison" / run).glob("*/metadata.json")):
        try:
            stored = json.loads(path.read_text()).get("record")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged or foreign artifact is no start
        if not isinstance(stored, dict) or differences(stored, wanted) != ["kwargs.num_epochs"]:
            continue
        # A spec at the factory's default has no num_epochs in its record: no start, either way.
        done = stored["kwargs"].get("num_epochs")
        if not (isinstance(done, int) and isinstance(epochs, int) and done < epochs):
            continue
        ckpt = keyed_dir(Path(workdir) / "checkpoints" / f"craft_{run}", stored)
        if done in checkpointing.saved_steps(ckpt) and (best is None or done > best[0]):
            best = (done, ckpt)
    return None if best is None else best[1]


def artifacts(crafted, workdir):
    """``results.json``'s ``poisons``: {run: {artifact (relative to `workdir`), key}}."""
    return {
        run: {"artifact": str(c.artifact.relative_to(workdir)), "key": c.key}
        for run, c in crafted.items()
    }


def check_bounds(ps, x_clean, y_clean, images, labels, *, tolerance=1e-5, chunk=4096):
    """Refuses a poisoned training set that leaves its threat ball or changes a label.

    Every bounded poison of the registry stays inside by construction; this catches a poison
    read from a file (of another subset, order or budget) or a user's poison that does not.

    Raises:
      ValueError: naming the first offending example, its distance and the fix.
    """
    changed = np.flatnonzero(np.asarray(labels) != np.asarray(y_clean))
    if changed.size:
        raise ValueError(
            f"poisons.{ps.run}: {changed.size} labels differ from the clean ones (first: example "
            f"{changed[0]}); a delusive poison keeps labels: check the file's order and subset."
        )
    eps, norm = float(ps.threat.epsilon), ps.threat.norm
    for start in range(0, len(images), chunk):
        clean = data.to_float(x_clean[start : start + chunk])  # uint8 or float
        delta = (images[start : start + chunk] - clean).reshape(min(chunk, len(images) - start), -1)
        if norm == "l0":  # changed pixels (positions with any channel moved by > tolerance)
            n, c = len(delta), images.shape[-1]
            size = (np.abs(delta.reshape(n, -1, c)) > tolerance).any(-1).sum(1).astype(float)
        elif norm == "linf":
            size = np.abs(delta).max(1)
        else:
            size = np.linalg.norm(delta, axis=1)
        worst = int(np.argmax(size)) if size.size else 0
        if size.size and size[worst] > eps + tolerance:
            budget = f"pixels={eps:.0f}" if norm == "l0" else f"epsilon={eps:.5f}"
            field = "threat.pixels" if norm == "l0" else "threat.epsilon"
            raise ValueError(
                f"poisons.{ps.run}: example {start + worst} lies {size[worst]:.5f} ({norm}) from "
                f"its clean image, outside {budget}; check that the poison was made for "
                f"this data (subset and order) and budget ({field})."
            )


def artifact_dir(workdir, run):
    """The directory of run `run`'s poison artifact in `workdir`.

    It is the one ``results.json`` names (``poisons[run].artifact``), or, for a run still in
    progress, the only artifact under ``poison/<run>/``.

    Raises:
      storage.PoisonFileError: when there is none, or several and no results.json names one.
    """
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.is_file():
        entry = json.loads(results_path.read_text()).get("poisons", {}).get(run)
        if entry:
            return workdir / entry["artifact"]
    found = sorted(p.parent for p in (workdir / "poison" / run).glob("*/metadata.json"))
    if len(found) != 1:
        raise storage.PoisonFileError(
            f"{workdir}: {len(found)} artifacts of run {run!r} under poison/{run}/ and no "
            "results.json naming one; finish the run (same command) first."
        )
    return found[0]


def load_poison(config, run, dataset, workdir):
    """(poison, state) of run `run` of `workdir` (see `artifact_dir`), without its crafting
    model (applying a stored state needs none)."""
    config = ml_collections.ConfigDict(plain(config))
    shape = dict(image_shape=dataset.image_shape, num_classes=dataset.num_classes)
    poison = specs.make_poison(specs.poison_spec(config, run, **shape), **shape)
    template = jax.eval_shape(
        poison.init,
        jax.random.key(0),
        {
            "image": jax.ShapeDtypeStruct(
                (*dataset.y_train.shape, *shape["image_shape"]), np.float32
            ),
            "label": jax.ShapeDtypeStruct(dataset.y_train.shape, np.int32),
        },
    )
    artifact = artifact_dir(workdir, run)
    state, _ = storage.load(artifact, template, fingerprint=dataset.fingerprint())
    return poison, state


def clean_additions(config, dataset):
    """{run name: (float images, labels)} of the extra clean examples of runs with ``clean_extra``.

    They are the first examples of each class (class-balanced) among the training examples that
    ``data.num_train`` left out, so they are disjoint from the poisoned set.
    """
    wanted = {
        run: int(spec.get("clean_extra", 0))
        for run, spec in specs.selected(config, "poisons").items()
        if spec.get("clean_extra", 0)
    }
    if not wanted:
        return {}
    full = data.load(ml_collections.ConfigDict(dict(plain(config.data), num_train=0)))
    subset = np.arange(len(full.y_train))
    if len(dataset.y_train) < len(full.y_train):
        subset = data.balanced_indices(full.y_train, len(dataset.y_train), full.num_classes)
    if not np.array_equal(full.x_train[subset], dataset.x_train):
        raise data.DataError("clean_extra: cannot locate the training subset in the full dataset.")
    pool = np.setdiff1d(np.arange(len(full.y_train)), subset)
    out = {}
    for run, k in wanted.items():
        if k > len(pool):
            raise ValueError(
                f"poisons.{run}.clean_extra={k} but only {len(pool)} training examples lie "
                "outside data.num_train; lower clean_extra or data.num_train."
            )
        idx = pool[data.balanced_indices(full.y_train[pool], k, full.num_classes)]
        out[run] = (full.x_train[idx].astype(np.float32) / 255.0, full.y_train[idx])
    return out


__all__ = [
    "Crafted",
    "artifact_dir",
    "artifacts",
    "check_bounds",
    "clean_additions",
    "craft_poisons",
    "load_poison",
    "train_surrogate",
]
