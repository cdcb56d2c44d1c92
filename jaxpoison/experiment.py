"""Config runs: craft poisons, train victims on clean and poisoned data, write results and plots.

``train_and_evaluate(config, workdir)`` is what ``jaxpoison --config=... --workdir=...`` calls.
A run's workdir (same for every experiment)::

    WORKDIR/config.json     the resolved config, written first
    WORKDIR/checkpoints/    orbax checkpoints per victim run and per crafting run (resumable)
    WORKDIR/poison/<run>/   crafted poison artifacts (state.npz + metadata.json)
    WORKDIR/results.json    written last and atomically: config, histories, summary
    WORKDIR/curves.png      clean test accuracy per epoch, one line per run
    WORKDIR/log.txt         the progress lines as plain text

Config fields (see configs/quickstart.py): ``seed``, ``data``, ``threat``, ``poisons`` (run name
-> poison spec), ``include_clean``, ``objectives`` (label -> objective spec), ``surrogate``
(the crafting model, for poisons that need one) and ``victim``.

A poison spec holds ``name`` and the factory's keyword arguments, and optionally ``threat``,
``batch_size`` (crafting), ``fraction`` / ``classes`` (partial poisoning) and ``clean_extra``: k
extra clean training examples, class-balanced, from the part of the dataset outside
``data.num_train``, added to that run's poisoned training set (clean-data addition).
"""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxpoison import __version__, data, plots, poisons, threat, training
from jaxpoison.evaluation import risk, speed, summarize
from jaxpoison.poisons import storage
from jaxpoison.progress import say, set_log_file


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _run_key(root, name):
    """A key for the named part of the experiment, independent of the order parts run in."""
    return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def make_threat(spec):
    return threat.make(**_plain(spec))


def train_surrogate(config, dataset, *, key, workdir, progress):
    """Trains the crafting model on clean data; returns (apply_fn, variables) of seed 0."""
    trainer = training.Trainer.from_config(
        config.surrogate, num_classes=dataset.num_classes, image_shape=dataset.image_shape
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
        num_seeds=1,
        name="surrogate",
        progress=progress,
        ckpt_dir=Path(workdir) / "checkpoints" / "surrogate",
    )
    state = jax.tree.map(lambda a: a[0], states)
    variables = {"params": state.params, **state.model_state}
    say(f"surrogate: clean test accuracy {history['test/accuracy'][-1][0]:.4f}")
    return trainer.apply_fn, variables


def craft_poisons(config, dataset, *, key, workdir, progress=True):
    """Crafts every poison of ``config.poisons``; returns {run name: (images, labels)}."""
    out, surrogate = {}, None
    x_clean = dataset.x_train.astype(np.float32) / 255.0
    fingerprint = dataset.fingerprint()
    for run_name, spec in config.poisons.items():
        spec = _plain(spec)
        name = spec.pop("name")
        if name not in poisons.POISONS:
            raise ValueError(
                f"poisons.{run_name}.name={name!r} is unknown; use one of "
                f"{sorted(poisons.POISONS)}."
            )
        craft_kwargs = {k: spec.pop(k) for k in ("batch_size",) if k in spec}
        spec.pop("clean_extra", None)  # used by `clean_additions`, not by the poison
        tm = make_threat(spec.pop("threat", config.threat))
        kwargs = dict(threat=tm, num_classes=dataset.num_classes, image_shape=dataset.image_shape)
        if name in poisons.REQUIRES_MODEL:
            if surrogate is None:
                surrogate = train_surrogate(
                    config,
                    dataset,
                    key=_run_key(key, "surrogate"),
                    workdir=workdir,
                    progress=progress,
                )
            kwargs.update(apply_fn=surrogate[0], variables=surrogate[1])
        poison = poisons.make(name, **kwargs, **spec)
        pkey = _run_key(key, f"poison/{run_name}")
        artifact = Path(workdir) / "poison" / run_name
        if (artifact / "metadata.json").is_file():
            template = jax.eval_shape(
                poison.init,
                pkey,
                {
                    "image": jax.ShapeDtypeStruct(x_clean.shape, np.float32),
                    "label": jax.ShapeDtypeStruct(dataset.y_train.shape, np.int32),
                },
            )
            state, _ = storage.load(artifact, template, fingerprint=fingerprint)
            say(f"poison {run_name}: loaded from {artifact}")
        else:
            t0 = time.time()
            state, _ = poisons.craft(
                poison,
                x_clean,
                dataset.y_train,
                key=pkey,
                ckpt_dir=Path(workdir) / "checkpoints" / f"craft_{run_name}",
                name=f"craft {run_name}",
                progress=progress,
                **craft_kwargs,
            )
            storage.save(
                artifact,
                state,
                name=name,
                spec=spec,
                threat=tm,
                dataset_name=dataset.name,
                fingerprint=fingerprint,
            )
            say(f"poison {run_name}: crafted in {time.time() - t0:.1f}s")
        out[run_name] = poisons.apply_all(poison, state, x_clean, dataset.y_train)
    return out


def clean_additions(config, dataset):
    """{run name: (float images, labels)} of the extra clean examples of runs with ``clean_extra``.

    They are the first examples of each class (class-balanced) among the training examples that
    ``data.num_train`` left out, so they are disjoint from the poisoned set.
    """
    wanted = {
        run: int(spec.get("clean_extra", 0))
        for run, spec in config.poisons.items()
        if spec.get("clean_extra", 0)
    }
    if not wanted:
        return {}
    full = data.load(ml_collections.ConfigDict(dict(_plain(config.data), num_train=0)))
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


def run_evals(evals, trainer, states, td, *, num_classes, key):
    """Runs ``config.evals`` ({label: {name, **kwargs}} of `risk.EVALUATORS`) on the test set."""
    out = {}
    for label, spec in evals.items():
        spec = dict(spec)
        evaluator = risk.make(
            spec.pop("name"),
            apply_fn=trainer.apply_fn,
            num_classes=num_classes,
            **spec,
        )
        values = jax.device_get(
            evaluator(
                states,
                td.x_test,
                td.y_test,
                key=jax.random.fold_in(key, zlib.crc32(label.encode())),
            )
        )
        out[label] = {k: np.asarray(v).tolist() for k, v in values.items()}
    return out


def _write_config(config, workdir):
    storage.write_json_atomic(Path(workdir) / "config.json", _plain(config))


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the experiment `config` in `workdir` and returns the results dict."""
    if config.get("experiment", "images") == "gaussian_theory":
        from jaxpoison.theory import runner

        return runner.run(config, workdir, progress=progress)
    if config.get("experiment", "images") in ("simplicity_bias", "rotation_ssl"):
        from jaxpoison import studies

        return studies.run(config, workdir, progress=progress)
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        if results.get("complete"):
            say(f"{results_path} is complete; nothing to do (delete it to run again).")
            return results
    workdir.mkdir(parents=True, exist_ok=True)
    set_log_file(workdir / "log.txt")
    _write_config(config, workdir)
    t_start = time.time()
    root = jax.random.key(config.seed)

    dataset = data.load(config.data)
    say(f"data: {dataset.name} train {dataset.x_train.shape} test {dataset.x_test.shape}")
    train_sets = {}
    if config.get("include_clean", True):
        train_sets["clean"] = (dataset.x_train, dataset.y_train)
    train_sets.update(craft_poisons(config, dataset, key=root, workdir=workdir, progress=progress))
    extras = clean_additions(config, dataset)

    val_size = config.data.get("val_size", 0)
    train_idx, val_idx = data.split_validation(
        dataset.y_train, val_size, dataset.num_classes, seed=config.seed
    )
    objectives = _plain(config.get("objectives", {"erm": {"name": "erm"}}))
    evals = _plain(config.get("evals", {}))
    runs = {}
    for obj_label, obj_spec in objectives.items():
        victim_cfg = ml_collections.ConfigDict(_plain(config.victim))
        victim_cfg.objective = obj_spec
        trainer = training.Trainer.from_config(
            victim_cfg, num_classes=dataset.num_classes, image_shape=dataset.image_shape
        )
        for set_name, (x_train, y_train) in train_sets.items():
            run_name = set_name if len(objectives) == 1 else f"{obj_label}/{set_name}"
            x_fit, y_fit = x_train[train_idx], y_train[train_idx]
            if set_name in extras:
                x_extra, y_extra = extras[set_name]
                x_fit = np.concatenate([data.to_float(x_fit), x_extra])  # crafted sets are float
                y_fit = np.concatenate([y_fit, y_extra]).astype(np.int32)
            td = training.train_data_from(
                x_fit,
                y_fit,
                dataset,
                x_val=x_train[val_idx] if val_size else None,
                y_val=y_train[val_idx] if val_size else None,
                crop_padding=config.data.get("crop_padding", 0),
                flip=config.data.get("flip", False),
            )
            t0 = time.time()
            states, history = trainer.fit(
                td,
                key=_run_key(root, f"victim/{run_name}"),
                num_seeds=config.victim.num_seeds,
                ckpt_dir=workdir / "checkpoints" / run_name.replace("/", "__"),
                name=run_name,
                progress=progress,
            )
            runs[run_name] = {
                "poison": set_name,
                "objective": obj_label,
                "history": history,
                "wall_time_s": time.time() - t0,
            }
            if evals:
                runs[run_name]["evals"] = run_evals(
                    evals,
                    trainer,
                    states,
                    td,
                    num_classes=dataset.num_classes,
                    key=_run_key(root, f"evals/{run_name}"),
                )

    summary = {
        name: summarize.run_summary(r["history"], config.get("loss_threshold", 0.5))
        for name, r in runs.items()
    }
    results = {
        "complete": True,
        "jaxpoison_version": __version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "wall_time_s": time.time() - t_start,
        "config": _plain(config),
        "runs": runs,
        "summary": summary,
        "learning_speed": speed.diagnostics(summary),
    }
    plots.curves(runs, workdir / "curves.png", title=config.get("name", ""))
    storage.write_json_atomic(results_path, results)
    say(summarize.table(summary))
    say(f"results: {results_path}  plot: {workdir / 'curves.png'}")
    set_log_file(None)
    return results


__all__ = [
    "clean_additions",
    "craft_poisons",
    "make_threat",
    "train_and_evaluate",
    "train_surrogate",
]
