"""The streamed trainer (``config.trainer = 'streamed'``): the grid's victims trained on a tfds
dataset read from disk batch by batch (`jaxpoison.data.streaming`), for training sets that do
not fit in host or device memory.

The training split is never loaded: each epoch's batches are read by Grain's threads from its
ArrayRecord files, and a poison is applied inside the compiled step by example index or label
(`streaming.Stream.with_poison`), so the poisoned set is never materialised either. The test
split is read into memory (`streaming.read_split`). With the same config on whole splits, the
victims have the histories of the in-memory grid trainer on the same images (bit for bit on one
device).

Config fields: those of the grid (``seed``, ``data``, ``threat``, ``poisons``,
``include_clean``, ``objectives``, ``victim``, ``evals``, ``select``, ``loss_threshold``,
``surrogate``), with ``data.source='tfds'`` (``name``, ``data_dir``, ``crop_padding``, ``flip``;
``num_train`` / ``num_test`` keep the first records of the splits, not the in-memory grid's
class-balanced subsets), and a ``stream`` block (`STREAM_FIELDS`): ``train_split`` /
``test_split`` (tfds split strings, slices included: ``'train[:10%]'``), ``num_threads``
(Grain's readers) and ``craft_subset`` (training records read into memory to craft class-wise
poisons on).

A poison runs here when it can be applied without the training set in memory, by the first of:

* *made from the key* (``random``, ``regions``, ``low_frequency``, ``cuda``, ``noise``,
  ``badnets``, ...): ``init`` reads no data and nothing is crafted; the same state as the grid's;
* *made from the key and the labels* (``lsp``, ``autoregressive``, ``mislabeling``, and any of
  the above with ``fraction`` / ``classes``): the labels are read in one pass over the records
  and ``init`` draws a per-example table, held on the devices (float32: 4x the uint8 images);
* *crafted on a subset* (class-wise states, e.g. ``error_minimizing`` with ``class_wise=True``,
  ``universal_adversarial``, ``one_pixel``): crafted as by the grid (its surrogate included) on
  the first ``stream.craft_subset`` training records read into memory, then applied by label to
  every record; the state does not depend on the number of examples.

Every other poison (sample-wise crafting: adversarial, error-minimizing, L2C, ...) is refused
when the run starts, as are the grid features that need the training set in memory
(``include_naive``, ``victims``, ``lambda_sweep``, ``budget_sweep``, ``data.val_size``,
``clean_extra``, dataset-stage transforms, ``victim.epochs=0``, ``victim.seed_devices > 1``).

``results.json`` holds what the grid's does for these parts: ``runs[run]`` (history, wall time,
checkpoint, confusion, evals), ``summary`` (final / peak accuracy, mean ± std over seeds),
``learning_speed``, ``defense_grid`` with several objectives, ``poisons`` (how each was made,
and the artifact of a crafted one) and ``stream`` (the records trained on).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison import data, sharding, specs, training
from jaxpoison.data import streaming
from jaxpoison.evaluation import risk
from jaxpoison.poisons import storage
from jaxpoison.progress import say
from jaxpoison.trainers import poisoning
from jaxpoison.trainers.grid import (
    make_evaluators,
    names_objectives,
    say_tables,
    summarize_runs,
    train_cell,
)
from jaxpoison.workdir import close_run, open_run, plain, results_header, run_key

# How a poison's state is made without the training set in memory (see the module docstring).
KEY, LABELS, SUBSET = "key", "labels", "subset"

# The ``config.stream`` block: field -> default.
STREAM_FIELDS = {"train_split": "train", "test_split": "test", "num_threads": 8, "craft_subset": 0}

# Grid features that need the training set in memory: config field -> why.
_IN_MEMORY_FIELDS = {
    "include_naive": "the untrained victim is evaluated on the whole training set",
    "victims": "the attack-transfer evaluation reads the whole training set",
    "lambda_sweep": "the sweep is not wired into the streamed trainer",
    "budget_sweep": "the sweep is not wired into the streamed trainer",
}


def poison_kind(poison, *, num_examples, image_shape):
    """How `poison`'s state can be made for a stream of `num_examples` records: `KEY` (its
    ``init`` reads no data and nothing is crafted), `LABELS` (it reads the labels only), `SUBSET`
    (its state's shapes do not depend on the number of examples, so it can be crafted on a
    subset and applied to every record), or None (it needs the training set in memory).

    Found with `jax.eval_shape` (no computation): an ``init`` that reads a field the dataset
    lacks raises KeyError.
    """
    key = jax.random.key(0)

    def dataset(n, fields):
        structs = {
            "image": jax.ShapeDtypeStruct((n, *image_shape), jnp.float32),
            "label": jax.ShapeDtypeStruct((n,), jnp.int32),
        }
        return {k: structs[k] for k in fields}

    if poison.num_epochs == 0:
        for kind, fields in ((KEY, ()), (LABELS, ("label",))):
            try:
                jax.eval_shape(poison.init, key, dataset(num_examples, fields))
                return kind
            except KeyError:
                pass
    shapes = [
        [leaf.shape for leaf in jax.tree.leaves(jax.eval_shape(poison.init, key, dataset(n, f)))]
        for n, f in ((num_examples, ("image", "label")), (num_examples + 1, ("image", "label")))
    ]
    return SUBSET if shapes[0] == shapes[1] else None


def stream_fields(config):
    """``config.stream`` with its defaults, and the splits read: ``train_split`` / ``test_split``
    cut to their first ``data.num_train`` / ``data.num_test`` records when those are set.

    Raises:
      ValueError: an unknown field, a split cut twice, or a bad number.
    """
    given = plain(config.get("stream") or {})
    unknown = sorted(set(given) - set(STREAM_FIELDS))
    if unknown:
        raise ValueError(
            f"config.stream has unknown fields {unknown}; it takes {sorted(STREAM_FIELDS)}."
        )
    out = {**STREAM_FIELDS, **given}
    for which in ("train", "test"):
        split, n = out[f"{which}_split"], config.data.get(f"num_{which}", 0) or 0
        if n and "[" in split:
            raise ValueError(
                f"config.data.num_{which}={n} and config.stream.{which}_split={split!r} both cut "
                "the split; set one of them."
            )
        out[f"{which}_split"] = f"{split}[:{n}]" if n else split
    for field, least in (("num_threads", 1), ("craft_subset", 0)):
        value = out[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"config.stream.{field}={value!r}: give a whole number >= {least}.")
    return out


def check(config, stream):
    """Refuses, with one line naming the fix, what this trainer cannot run on `stream`.

    Returns:
      ``{run: (PoisonSpec, kind)}`` of the selected poisons, kind from `poison_kind`.
    """
    fields = plain(config.data)
    if fields.get("source") != "tfds":
        raise ValueError(
            f"config.data.source={fields.get('source')!r}: the streamed trainer reads tfds "
            "datasets; write your arrays as one (data.streaming.write_tfds) or use "
            "config.trainer='grid'."
        )
    if fields.get("val_size"):
        raise ValueError(
            f"config.data.val_size={fields['val_size']}: a stream has no validation split carved "
            "from it; set it to 0, or use config.trainer='grid'."
        )
    for field, why in _IN_MEMORY_FIELDS.items():
        if config.get(field):
            raise ValueError(
                f"config.{field}: {why}; drop it here, or use config.trainer='grid' (in memory)."
            )
    shape = dict(image_shape=stream.image_shape, num_classes=stream.num_classes)
    specs.check(config, **shape)
    victim = specs.victim(config, **shape)
    if victim.epochs == 0:
        raise ValueError(
            "victim.epochs=0: an untrained victim is evaluated on the whole training set; use "
            "config.trainer='grid' for it."
        )
    if victim.get("seed_devices", 1) > 1:
        raise ValueError(
            f"victim.seed_devices={victim.seed_devices}: streamed victims train on one group of "
            "devices; set it to 1, or use config.trainer='grid'."
        )
    subset = stream_fields(config)["craft_subset"]
    out = {}
    for run in specs.selected(config, "poisons"):
        ps = specs.poison_spec(config, run, **shape)
        if ps.clean_extra:
            raise ValueError(
                f"poisons.{run}.clean_extra: clean additions come from outside data.num_train, "
                "which a stream does not have; drop it, or use config.trainer='grid'."
            )
        poison = specs.make_poison(ps, **shape)
        kind = poison_kind(poison, num_examples=stream.num_examples, image_shape=stream.image_shape)
        if kind is None:
            raise ValueError(
                f"poisons.{run} ({ps.name}): sample-wise crafting (a per-example state made from "
                "the training images) needs the training set in memory; use the in-memory grid "
                "(config.trainer='grid'), or deselect it (config.select.poisons)."
            )
        if kind == SUBSET and subset < 1:
            raise ValueError(
                f"poisons.{run} ({ps.name}) is crafted on training records read into memory; set "
                "config.stream.craft_subset (e.g. 5000) to how many."
            )
        out[run] = (ps, kind)
    return out


def _subset_dataset(config, stream, x_test, y_test):
    """The first ``stream.craft_subset`` training records as a `data.Dataset` (every class in
    it)."""
    fields = stream_fields(config)
    m = min(fields["craft_subset"], stream.num_examples)
    x, y = stream.examples(np.arange(m))
    missing = sorted(set(range(stream.num_classes)) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(
            f"config.stream.craft_subset={m}: the first {m} training records lack classes "
            f"{missing[:10]}; raise craft_subset."
        )
    name = f"{config.data.name}/{fields['train_split']} first {m}"
    return data.Dataset(name, x, y, x_test, y_test, stream.num_classes)


def make_poisons(config, stream, planned, x_test, y_test, *, key, workdir, progress):
    """``{run: (Poison, state, entry)}``: each planned poison's state, made as its kind says
    (`check`), and its ``results.json`` entry (``made_from``, and a crafted one's artifact)."""
    shape = dict(image_shape=stream.image_shape, num_classes=stream.num_classes)
    out, labels = {}, None
    crafted_runs = tuple(run for run, (_, kind) in planned.items() if kind == SUBSET)
    if crafted_runs:
        subset = _subset_dataset(config, stream, x_test, y_test)
        cfg = ml_collections.ConfigDict(plain(config))
        cfg.select = dict(plain(config.get("select") or {}), poisons=crafted_runs)
        crafted = poisoning.craft_poisons(cfg, subset, key=key, workdir=workdir, progress=progress)
        entries = poisoning.artifacts(crafted, workdir)
    for run, (ps, kind) in planned.items():
        poison = specs.make_poison(ps, **shape)
        pkey = jax.random.fold_in(run_key(key, f"poison/{run}"), 0)  # as `poisons.craft` inits
        if kind == KEY:
            state = jax.jit(poison.init)(pkey, {})
            entry = {}
        elif kind == LABELS:
            if labels is None:
                t0 = time.time()
                labels = stream.examples(np.arange(stream.num_examples), images=False)[1]
                say(f"labels: {len(labels)} read in {time.time() - t0:.1f}s")
            state = jax.jit(poison.init)(pkey, {"label": jnp.asarray(labels)})
            entry = {}
        else:
            # craft_poisons keeps the artifact, not the state: read it back from there.
            template = jax.eval_shape(
                poison.init,
                pkey,
                {
                    "image": jax.ShapeDtypeStruct(subset.x_train.shape, jnp.float32),
                    "label": jax.ShapeDtypeStruct(subset.y_train.shape, jnp.int32),
                },
            )
            state, _ = storage.load(
                crafted[run].artifact, template, fingerprint=subset.fingerprint()
            )
            entry = dict(entries[run], craft_subset=len(subset.y_train))
        out[run] = (poison, state, {"made_from": kind, **entry})
    return out


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the streamed `config` in `workdir` and returns the results dict."""
    done = open_run(config, workdir)
    if done is not None:
        return done
    workdir = Path(workdir)
    t_start = time.time()
    root = jax.random.key(config.seed)
    name, data_dir = config.data.name, config.data.get("data_dir") or None
    fields = stream_fields(config)
    train_split, threads = fields["train_split"], fields["num_threads"]
    stream = streaming.open_tfds(name, split=train_split, data_dir=data_dir, num_threads=threads)
    planned = check(config, stream)
    shape = dict(image_shape=stream.image_shape, num_classes=stream.num_classes)
    objectives = {
        label: specs.objective(config, spec)
        for label, spec in (
            specs.selected(config, "objectives") or {"erm": {"name": "erm"}}
        ).items()
    }
    named = names_objectives(config)
    trainers = {}
    for label, spec in objectives.items():
        victim_cfg = specs.victim(config, **shape)
        victim_cfg.objective = spec
        trainers[label] = (training.Trainer.from_config(victim_cfg, **shape), victim_cfg)
        if trainers[label][0].transforms.dataset:
            raise ValueError(
                f"objectives.{label}: dataset-stage transforms (purification) need the training "
                "set in memory; use config.trainer='grid' for it."
            )
    x_test, y_test = streaming.read_split(
        name,
        split=fields["test_split"],
        data_dir=data_dir,
        num_threads=threads,
    )
    say(f"data: {name} {train_split} {stream.num_examples} streamed, test {x_test.shape}")
    made = make_poisons(
        config, stream, planned, x_test, y_test, key=root, workdir=workdir, progress=progress
    )
    train_sets = {"clean": stream} if config.get("include_clean", True) else {}
    evals = {
        label: specs.evaluator(config, spec)
        for label, spec in plain(config.get("evals", {})).items()
    }

    runs = {}
    for obj_label, (trainer, victim_cfg) in trainers.items():
        evaluators = make_evaluators(evals, trainer, num_classes=stream.num_classes)
        confusion = risk.make_confusion(
            apply_fn=trainer.apply_fn,
            num_classes=stream.num_classes,
            batch_size=victim_cfg.get("eval_batch_size", 500),
            seed_strategy=victim_cfg.get("seed_strategy", "auto"),
        )
        rep = sharding.replicated(trainer.mesh)
        poisoned = {
            run: stream.with_poison(poison, jax.device_put(state, rep))
            for run, (poison, state, _) in made.items()
        }
        for set_name, train_stream in {**train_sets, **poisoned}.items():
            run_name = f"{obj_label}/{set_name}" if named else set_name
            td = training.TrainData.create(
                None,
                None,
                x_test,
                y_test,
                crop_padding=config.data.get("crop_padding", 0),
                flip=config.data.get("flip", False),
                mesh=trainer.mesh,
                stream=train_stream,
            )
            _, entry = train_cell(
                trainer,
                td,
                root=root,
                run_name=run_name,
                num_seeds=victim_cfg.num_seeds,
                num_classes=stream.num_classes,
                num_examples=stream.num_examples,
                workdir=workdir,
                confusion=confusion,
                evals=evals,
                evaluators=evaluators,
                progress=progress,
            )
            runs[run_name] = {"poison": set_name, "objective": obj_label, **entry}

    summary, trained, outputs, figures = summarize_runs(config, runs, workdir)
    results = {
        **results_header(config, t_start=t_start),
        "stream": {
            "name": name,
            "split": train_split,
            "num_examples": stream.num_examples,
            "identity": stream.identity,
        },
        "poisons": {run: entry for run, (_, _, entry) in made.items()},
        **outputs,
    }
    say_tables(results, summary, trained)
    close_run(results, workdir, plots=figures)
    return results


__all__ = [
    "KEY",
    "LABELS",
    "STREAM_FIELDS",
    "SUBSET",
    "check",
    "make_poisons",
    "poison_kind",
    "stream_fields",
    "train_and_evaluate",
]
