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
``batch_size`` (crafting), ``fraction`` / ``classes`` (partial poisoning), ``clean_extra``: k
extra clean training examples, class-balanced, from the part of the dataset outside
``data.num_train``, added to that run's poisoned training set (clean-data addition), and
``surrogate``: fields of ``config.surrogate`` (e.g. ``model``) for that poison's own crafting model.

Optional fields, all off by default:

* ``include_naive``: also a run ``naive``, the victim at initialisation (zero training epochs on
  the clean set; the *Naive* model of Tao et al. 2022); its summary has ``epochs`` 0 and it is
  left out of the learning-speed statistics.
* ``evals``: ``{label: {name, **kwargs}}`` of `risk.EVALUATORS`, run on the clean test set after
  training; per seed in ``runs[run]['evals']``, mean ± std in ``summary[run]['evals']``.
* ``victims``: ``{name: fields of config.victim}``, several victim architectures each trained on
  every training set; runs are then named ``<victim>/<set>`` (``<objective>/<victim>/<set>`` with
  several objectives) and ``results['transfer']`` holds the victim-accuracy matrix and the attack
  transfer (`jaxpoison.evaluation.transfer`), drawn in ``transfer.png`` / ``attack_transfer.png``.
* ``lambda_sweep``: ``{eval: <label of a risk evaluator>, train_set: 'clean'}``: the THRM / TRADES
  sweep of `jaxpoison.evaluation.tradeoff` in ``results['lambda_sweep']`` and ``lambda_sweep.png``.
* ``budget_sweep``: ``{objective: 'pgd_at'}``: clean accuracy against the defender's ε over the
  objectives of that name (``erm`` is ε = 0), per training set, in ``results['budget_sweep']``
  and ``budget_sweep.png`` (`tradeoff.budget_points`).

Every run also stores its victims' confusion matrices on the clean test set
(``runs[run]['confusion']``, [seeds][K][K]; ``confusion.png``), and with at least three trained
runs the learning-speed scatters ``learning_speed_*.png`` are written beside ``curves.png``.
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
from jaxpoison.evaluation import risk, speed, summarize, tradeoff, transfer
from jaxpoison.poisons import storage
from jaxpoison.progress import say, set_log_file


def plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def run_key(root, name):
    """A key for the named part of the experiment, independent of the order parts run in."""
    return jax.random.fold_in(root, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def make_threat(spec):
    return threat.make(**plain(spec))


def _merged(base, overrides):
    """`base` (plain dicts) updated recursively by `overrides`."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def victim_config(config, overrides):
    """``config.victim`` updated by one entry of ``config.victims`` (a ConfigDict)."""
    return ml_collections.ConfigDict(_merged(plain(config.victim), overrides))


def train_surrogate(config, dataset, *, key, workdir, progress, spec=None, name="surrogate"):
    """Trains the crafting model on clean data; returns (apply_fn, variables) of seed 0.

    `spec` (default ``config.surrogate``) is the crafting model's victim-style spec; `name`
    names its checkpoint directory.
    """
    spec = ml_collections.ConfigDict(spec if spec is not None else plain(config.surrogate))
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
        num_seeds=1,
        name=name,
        progress=progress,
        ckpt_dir=Path(workdir) / "checkpoints" / name,
    )
    state = jax.tree.map(lambda a: a[0], states)
    variables = {"params": state.params, **state.model_state}
    say(f"{name}: clean test accuracy {history['test/accuracy'][-1][0]:.4f}")
    return trainer.apply_fn, variables


def craft_poisons(config, dataset, *, key, workdir, progress=True):
    """Crafts every poison of ``config.poisons``; returns {run name: (images, labels)}.

    A spec's ``surrogate`` (a dict of ``config.surrogate`` fields, e.g. ``model``) gives that
    poison its own crafting model (trained once per distinct spec, checkpoints under
    ``checkpoints/surrogate_<run>``); without it the poisons share ``config.surrogate``.
    """
    out, surrogates = {}, {}
    x_clean = dataset.x_train.astype(np.float32) / 255.0
    fingerprint = dataset.fingerprint()
    for run_name, spec in config.poisons.items():
        spec = plain(spec)
        name = spec.pop("name")
        if name not in poisons.POISONS:
            raise ValueError(
                f"poisons.{run_name}.name={name!r} is unknown; use one of "
                f"{sorted(poisons.POISONS)}."
            )
        craft_kwargs = {k: spec.pop(k) for k in ("batch_size",) if k in spec}
        spec.pop("clean_extra", None)  # used by `clean_additions`, not by the poison
        surrogate_overrides = spec.pop("surrogate", None)
        tm = make_threat(spec.pop("threat", config.threat))
        kwargs = dict(threat=tm, num_classes=dataset.num_classes, image_shape=dataset.image_shape)
        if name in poisons.REQUIRES_MODEL:
            if surrogate_overrides:
                surrogate_spec = _merged(plain(config.surrogate), surrogate_overrides)
                tag = f"surrogate_{run_name}"
            else:
                surrogate_spec, tag = plain(config.surrogate), "surrogate"
            cache = json.dumps(surrogate_spec, sort_keys=True)
            if cache not in surrogates:
                surrogates[cache] = train_surrogate(
                    config,
                    dataset,
                    key=run_key(key, "surrogate" if tag == "surrogate" else cache),
                    workdir=workdir,
                    progress=progress,
                    spec=surrogate_spec,
                    name=tag,
                )
            kwargs.update(apply_fn=surrogates[cache][0], variables=surrogates[cache][1])
        poison = poisons.make(name, **kwargs, **spec)
        pkey = run_key(key, f"poison/{run_name}")
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


def make_evaluators(evals, trainer, *, num_classes):
    """``{label: Evaluator}`` of ``config.evals`` for one trainer (built once, reused per run)."""
    out = {}
    for label, spec in evals.items():
        spec = dict(spec)
        out[label] = risk.make(
            spec.pop("name"), apply_fn=trainer.apply_fn, num_classes=num_classes, **spec
        )
    return out


def run_evals(evals, trainer, states, td, *, num_classes, key, evaluators=None):
    """Runs ``config.evals`` ({label: {name, **kwargs}} of `risk.EVALUATORS`) on the test set.

    `evaluators` (from `make_evaluators`) avoids rebuilding, and recompiling, them per run.
    """
    if evaluators is None:
        evaluators = make_evaluators(evals, trainer, num_classes=num_classes)
    out = {}
    for label in evals:
        values = jax.device_get(
            evaluators[label](
                states,
                td.x_test,
                td.y_test,
                key=jax.random.fold_in(key, zlib.crc32(label.encode())),
            )
        )
        out[label] = {k: np.asarray(v).tolist() for k, v in values.items()}
    return out


def open_workdir(config, workdir):
    """Returns the complete results found in `workdir`, or None after writing ``config.json``
    and opening ``log.txt`` for a new (or resumed) run.

    Raises:
      ValueError: when `workdir` holds complete results of another config.
    """
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if results_path.is_file():
        results = json.loads(results_path.read_text())
        if results.get("complete"):
            stored = results.get("config", {})
            wanted = json.loads(json.dumps(plain(config)))  # as stored: lists, not tuples
            changed = sorted(
                k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k)
            )
            if changed:
                raise ValueError(
                    f"{results_path} holds the complete results of another config (it differs in "
                    f"{', '.join(changed)}). Use a new workdir, or move results.json away to "
                    "extend this one: its finished victims and poisons are reused where they match."
                )
            say(f"{results_path} is complete; nothing to do (delete it to run again).")
            return results
    workdir.mkdir(parents=True, exist_ok=True)
    set_log_file(workdir / "log.txt")
    storage.write_json_atomic(workdir / "config.json", plain(config))
    return None


def close_workdir(results, workdir, *, plots=()):
    """Writes ``results.json`` atomically, names it and the `plots` in the log, closes the log."""
    path = Path(workdir) / "results.json"
    storage.write_json_atomic(path, results)
    listed = f"  plots: {', '.join(Path(f).name for f in plots)}" if plots else ""
    say(f"results: {path}{listed}")
    set_log_file(None)


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the experiment `config` in `workdir` and returns the results dict."""
    if config.get("experiment", "images") == "gaussian_theory":
        from jaxpoison.theory import runner

        return runner.run(config, workdir, progress=progress)
    if config.get("experiment", "images") in ("simplicity_bias", "rotation_ssl"):
        from jaxpoison import studies

        return studies.run(config, workdir, progress=progress)
    done = open_workdir(config, workdir)
    if done is not None:
        return done
    workdir = Path(workdir)
    t_start = time.time()
    root = jax.random.key(config.seed)

    dataset = data.load(config.data)
    say(f"data: {dataset.name} train {dataset.x_train.shape} test {dataset.x_test.shape}")
    train_sets = {}
    if config.get("include_clean", True):
        train_sets["clean"] = (dataset.x_train, dataset.y_train)
    if config.get("include_naive", False):
        if "naive" in config.poisons:
            raise ValueError(
                "include_naive=True adds a run named 'naive' but config.poisons has one too; "
                "rename the poison."
            )
        train_sets["naive"] = (dataset.x_train, dataset.y_train)  # trained for zero epochs
    train_sets.update(craft_poisons(config, dataset, key=root, workdir=workdir, progress=progress))
    extras = clean_additions(config, dataset)

    val_size = config.data.get("val_size", 0)
    train_idx, val_idx = data.split_validation(
        dataset.y_train, val_size, dataset.num_classes, seed=config.seed
    )
    objectives = plain(config.get("objectives", {"erm": {"name": "erm"}}))
    evals = plain(config.get("evals", {}))
    victims = plain(config.get("victims", {}))
    sweep_eval = plain(config.get("lambda_sweep") or {}).get("eval")
    if sweep_eval is not None and evals.get(sweep_eval, {}).get("name") not in ("risk", "targeted"):
        raise ValueError(
            f"lambda_sweep.eval={sweep_eval!r} must name a 'risk' evaluator of config.evals "
            f"(labels: {sorted(evals)}); add one, e.g. evals.{sweep_eval}=dict(name='risk')."
        )
    runs, attack_transfer = {}, {}
    for obj_label, obj_spec in objectives.items():
        for victim_name, victim_overrides in (victims or {"": {}}).items():
            victim_cfg = victim_config(config, victim_overrides)
            victim_cfg.objective = obj_spec
            trainer = training.Trainer.from_config(
                victim_cfg, num_classes=dataset.num_classes, image_shape=dataset.image_shape
            )
            evaluators = make_evaluators(evals, trainer, num_classes=dataset.num_classes)
            confusion = risk.make_confusion(
                apply_fn=trainer.apply_fn,
                num_classes=dataset.num_classes,
                batch_size=victim_cfg.get("eval_batch_size", 500),
                seed_strategy=victim_cfg.get("seed_strategy", "auto"),
            )
            for set_name, (x_train, y_train) in train_sets.items():
                parts = [obj_label] if len(objectives) > 1 else []
                run_name = "/".join(parts + ([victim_name] if victims else []) + [set_name])
                x_fit, y_fit = x_train[train_idx], y_train[train_idx]
                if set_name in extras:
                    x_extra, y_extra = extras[set_name]
                    x_fit = np.concatenate([data.to_float(x_fit), x_extra])  # crafted: float
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
                untrained = set_name == "naive" and "naive" not in config.poisons
                t0 = time.time()
                states, history = trainer.fit(
                    td,
                    key=run_key(root, f"victim/{run_name}"),
                    num_seeds=victim_cfg.num_seeds,
                    ckpt_dir=workdir / "checkpoints" / run_name.replace("/", "__"),
                    name=run_name,
                    progress=progress,
                    epochs=0 if untrained else None,
                )
                runs[run_name] = {
                    "poison": set_name,
                    "objective": obj_label,
                    "history": history,
                    "wall_time_s": time.time() - t0,
                }
                if victims:
                    runs[run_name]["victim"] = victim_name
                if untrained:
                    runs[run_name]["untrained"] = True
                counts = confusion(states, td.x_test, td.y_test, key=root)["confusion"]
                runs[run_name]["confusion"] = np.rint(jax.device_get(counts)).astype(int).tolist()
                if evals:
                    runs[run_name]["evals"] = run_evals(
                        evals,
                        trainer,
                        states,
                        td,
                        num_classes=dataset.num_classes,
                        key=run_key(root, f"evals/{run_name}"),
                        evaluators=evaluators,
                    )
                if victims and set_name == "clean":
                    errors = _attack_transfer(trainer, states, train_sets, train_idx, dataset)
                    for poison, cell in errors.items():
                        attack_transfer.setdefault(poison, {})[victim_name] = cell

    loss_threshold = config.get("loss_threshold", 0.5)
    summary = {}
    for name, r in runs.items():
        summary[name] = summarize.run_summary(
            r["history"], loss_threshold, untrained=r.get("untrained", False)
        )
        if "evals" in r:
            summary[name]["evals"] = summarize.eval_summary(r["evals"])
    trained = {n: s for n, s in summary.items() if not runs[n].get("untrained")}
    results = {
        "complete": True,
        "jaxpoison_version": __version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "wall_time_s": time.time() - t_start,
        "config": plain(config),
        "runs": runs,
        "summary": summary,
        "learning_speed": speed.diagnostics(trained),
    }
    figures = [workdir / "curves.png", workdir / "confusion.png"]
    plots.curves(runs, figures[0], title=config.get("name", ""))
    plots.confusion_matrices(
        {n: r["confusion"] for n, r in runs.items()},
        figures[1],
        class_names=dataset.class_names,
        title="confusion matrices on the clean test set (rows: true class, % of the class)",
    )
    if len(trained) >= 3:
        figures += speed.save_plots(results["learning_speed"]["runs"], workdir)
    if len(objectives) > 1:  # run names then start with the objective's label
        title = config.get("name", "")
        bars = plots.objective_bars(trained, workdir / "objectives.png", title=title)
        figures += [bars] if bars else []
    sweep_cfg = config.get("lambda_sweep")
    if sweep_cfg:
        sweep_cfg = plain(sweep_cfg)
        results["lambda_sweep"] = tradeoff.points(
            objectives,
            runs,
            summary,
            eval_label=sweep_cfg["eval"],
            train_set=sweep_cfg.get("train_set", "clean"),
        )
        figures.append(
            tradeoff.plot(
                results["lambda_sweep"], workdir / "lambda_sweep.png", title=config.get("name", "")
            )
        )
    budget_cfg = config.get("budget_sweep")
    if budget_cfg:
        results["budget_sweep"] = tradeoff.budget_points(
            objectives, runs, summary, objective=plain(budget_cfg).get("objective", "pgd_at")
        )
        figures.append(
            tradeoff.budget_plot(
                results["budget_sweep"],
                workdir / "budget_sweep.png",
                attacker_epsilon=config.threat.get("epsilon"),
                title=config.get("name", ""),
            )
        )
    if victims:
        results["transfer"] = {
            "victims": list(victims),
            "crafted_with": {
                t: transfer.crafting_architecture(plain(config), t) for t in train_sets
            },
            "accuracy": transfer.accuracy_matrix(runs, summary),
            "attack_transfer": attack_transfer,
        }
        figures += transfer.save_plots(results["transfer"], workdir)
    say(summarize.table(summary))
    if summarize.eval_table(summary):
        say(summarize.eval_table(summary))
    if len(trained) >= 3:
        ls = results["learning_speed"]
        say(
            "learning speed: Spearman rho (epoch to loss < "
            f"{loss_threshold} vs peak acc) = {ls['spearman/epoch_to_threshold_vs_peak_acc']:.3f}, "
            f"(peak vs final acc) = {ls['spearman/peak_acc_vs_final_acc']:.3f}, "
            f"{ls['num_runs']} runs"
        )
    if victims:
        say(transfer.table(results["transfer"]))
    close_workdir(results, workdir, plots=figures)
    return results


def _attack_transfer(trainer, states, train_sets, train_idx, dataset):
    """Error of the clean-trained victim `states` on every poisoned training set (true labels)
    and on the clean one: ``{poison: {'error_poisoned', 'error_clean'}}`` (mean ± std over
    seeds)."""
    y_true = dataset.y_train[train_idx]
    clean_acc = trainer.evaluate(states, data.to_float(dataset.x_train[train_idx]), y_true)
    error_clean = summarize.mean_std(1.0 - np.asarray(clean_acc["accuracy"]))
    out = {}
    for set_name, (x_train, _) in train_sets.items():
        if set_name in ("clean", "naive"):
            continue
        acc = trainer.evaluate(states, data.to_float(x_train[train_idx]), y_true)["accuracy"]
        out[set_name] = {
            "error_poisoned": summarize.mean_std(1.0 - np.asarray(acc)),
            "error_clean": error_clean,
        }
    return out


__all__ = [
    "clean_additions",
    "craft_poisons",
    "make_evaluators",
    "run_evals",
    "make_threat",
    "train_and_evaluate",
    "train_surrogate",
    "victim_config",
]
