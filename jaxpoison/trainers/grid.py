"""The grid trainer (``config.trainer = 'grid'``): craft poisons, train victims on clean and
poisoned data under every objective, write results and plots.

A run's workdir (same for every trainer; artifacts content-addressed, see `jaxpoison.workdir`)::

    WORKDIR/config.json                  the resolved config, written first
    WORKDIR/checkpoints/<run>/<key>/     orbax checkpoints per victim, surrogate and crafting run
    WORKDIR/poison/<run>/<key>/          crafted poison artifacts (state.npz + metadata.json)
    WORKDIR/results.json    written last and atomically: config, histories, summary, and where
                            each run's poison (``poisons[run].artifact``) and victims
                            (``runs[run].checkpoint``) live
    WORKDIR/curves.png      clean test accuracy per epoch, one line per run
    WORKDIR/log.txt         the progress lines as plain text

Config fields (see configs/quickstart.py): ``seed``, ``data``, ``threat``, ``poisons`` (run name
-> poison spec), ``include_clean``, ``objectives`` (label -> objective spec), ``surrogate``
(the crafting model, for poisons that need one) and ``victim``; ``select`` (``poisons``,
``objectives``, ``victims``: tuples of names) runs a subset (empty: all).

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
  every training set; runs are then named ``<victim>/<set>`` (``<objective>/<victim>/<set>``
  when several objectives are declared) and ``results['transfer']`` holds the victim-accuracy
  matrix and the attack transfer (`jaxpoison.evaluation.transfer`), drawn in ``transfer.png`` /
  ``attack_transfer.png``.
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

import time
import zlib
from pathlib import Path

import jax
import numpy as np

from jaxpoison import data, plots, specs, training
from jaxpoison.evaluation import risk, speed, summarize, tradeoff, transfer
from jaxpoison.progress import say
from jaxpoison.trainers import poisoning
from jaxpoison.workdir import close_run, open_run, plain, results_header, run_key


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


def train_cell(
    trainer,
    td,
    *,
    root,
    run_name,
    num_seeds,
    num_classes,
    num_examples,
    workdir,
    confusion,
    evals,
    evaluators,
    progress=True,
    untrained=False,
):
    """Trains one cell of a grid, or resumes it from its checkpoint.

    The victim key and the checkpoint folder come from `run_name` alone, so a cell is the same
    cell whichever other cells a run trains.

    Args:
      trainer: the cell's `training.Trainer` (its objective and victim).
      td: the cell's `training.TrainData`.
      root: the run's root key (``config.seed``).
      run_name: the cell's name, e.g. ``jpeg/ops``.
      num_seeds: victims trained side by side.
      num_classes: the dataset's number of classes.
      num_examples: the training set's size, for DP-SGD's accountant.
      workdir: the run's workdir (a `Path`).
      confusion: `risk.make_confusion`'s evaluator for `trainer`.
      evals: ``config.evals`` ({label: spec}); empty for none.
      evaluators: `make_evaluators`' output for `evals` and `trainer`.
      progress: show progress bars.
      untrained: zero epochs (the ``naive`` run).

    Returns:
      ``(states, entry)``: the trained victims and the run's ``results.json`` record
      (``history``, ``wall_time_s``, ``checkpoint``, ``confusion``; ``privacy``, ``untrained``
      and ``evals`` where they apply).
    """
    t0 = time.time()
    victim_key = run_key(root, f"victim/{run_name}")
    ckpt_root = workdir / "checkpoints" / run_name.replace("/", "__")
    states, history = trainer.fit(
        td,
        key=victim_key,
        num_seeds=num_seeds,
        ckpt_dir=ckpt_root,
        name=run_name,
        progress=progress,
        epochs=0 if untrained else None,
    )
    checkpoint = trainer.checkpoint_dir(ckpt_root, td, key=victim_key, num_seeds=num_seeds)
    entry = {
        "history": history,
        "wall_time_s": time.time() - t0,
        "checkpoint": str(checkpoint.relative_to(workdir)),
    }
    if trainer.privacy is not None and not untrained:
        entry["privacy"] = trainer.privacy_spent(num_examples)
    if untrained:
        entry["untrained"] = True
    counts = confusion(states, td.x_test, td.y_test, key=root)["confusion"]
    entry["confusion"] = np.rint(jax.device_get(counts)).astype(int).tolist()
    if evals:
        entry["evals"] = run_evals(
            evals,
            trainer,
            states,
            td,
            num_classes=num_classes,
            key=run_key(root, f"evals/{run_name}"),
            evaluators=evaluators,
        )
    training.release_host_memory()  # before the next run's compilations
    return states, entry


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the grid `config` in `workdir` and returns the results dict."""
    done = open_run(config, workdir)
    if done is not None:
        return done
    workdir = Path(workdir)
    t_start = time.time()
    root = jax.random.key(config.seed)

    dataset = data.load(config.data)
    say(f"data: {dataset.name} train {dataset.x_train.shape} test {dataset.x_test.shape}")
    specs.check(config, image_shape=dataset.image_shape, num_classes=dataset.num_classes)
    train_sets = {}
    if config.get("include_clean", True):
        train_sets["clean"] = (dataset.x_train, dataset.y_train)
    if config.get("include_naive", False):
        if "naive" in specs.selected(config, "poisons"):
            raise ValueError(
                "include_naive=True adds a run named 'naive' but config.poisons has one too; "
                "rename the poison."
            )
        train_sets["naive"] = (dataset.x_train, dataset.y_train)  # trained for zero epochs
    crafted = poisoning.craft_poisons(config, dataset, key=root, workdir=workdir, progress=progress)
    training.release_host_memory()  # what crafting's compilations left behind
    train_sets.update({run: (c.images, c.labels) for run, c in crafted.items()})
    extras = poisoning.clean_additions(config, dataset)

    val_size = config.data.get("val_size", 0)
    train_idx, val_idx = data.split_validation(
        dataset.y_train, val_size, dataset.num_classes, seed=config.seed
    )
    objectives = {
        label: specs.objective(config, spec)
        for label, spec in (
            specs.selected(config, "objectives") or {"erm": {"name": "erm"}}
        ).items()
    }
    evals = {
        label: specs.evaluator(config, spec)
        for label, spec in plain(config.get("evals", {})).items()
    }
    victims = specs.selected(config, "victims")
    sweep_eval = plain(config.get("lambda_sweep") or {}).get("eval")
    if sweep_eval is not None and evals.get(sweep_eval, {}).get("name") not in ("risk", "targeted"):
        raise ValueError(
            f"lambda_sweep.eval={sweep_eval!r} must name a 'risk' evaluator of config.evals "
            f"(labels: {sorted(evals)}); add one, e.g. evals.{sweep_eval}=dict(name='risk')."
        )
    named = names_objectives(config)
    runs, attack_transfer = {}, {}
    for obj_label, obj_spec in objectives.items():
        for victim_name, victim_overrides in (victims or {"": {}}).items():
            victim_cfg = specs.victim(
                config,
                victim_overrides,
                image_shape=dataset.image_shape,
                num_classes=dataset.num_classes,
            )
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
                parts = [obj_label] if named else []
                run_name = "/".join(parts + ([victim_name] if victims else []) + [set_name])
                # The whole set without a validation split: no copy of (float) poisoned images.
                x_fit, y_fit = (
                    (x_train[train_idx], y_train[train_idx]) if val_size else (x_train, y_train)
                )
                if set_name in extras:
                    x_extra, y_extra = extras[set_name]
                    x_fit = np.concatenate([data.to_float(x_fit), x_extra])  # crafted: float
                    y_fit = np.concatenate([y_fit, y_extra]).astype(np.int32)
                x_clean = None  # the clean image of every training example, for poison_ratio
                if victim_cfg.get("poison_ratio", 1.0) < 1.0:
                    x_clean = x_fit
                    if set_name in crafted:
                        x_clean = dataset.x_train[train_idx]
                        if set_name in extras:
                            x_clean = np.concatenate([data.to_float(x_clean), extras[set_name][0]])
                td = training.train_data_from(
                    x_fit,
                    y_fit,
                    dataset,
                    x_val=x_train[val_idx] if val_size else None,
                    y_val=y_train[val_idx] if val_size else None,
                    crop_padding=config.data.get("crop_padding", 0),
                    flip=config.data.get("flip", False),
                    mesh=trainer.mesh,  # with victim.seed_devices, its ('seed', 'data') mesh
                    x_clean=x_clean,
                )
                untrained = set_name == "naive" and "naive" not in crafted
                states, entry = train_cell(
                    trainer,
                    td,
                    root=root,
                    run_name=run_name,
                    num_seeds=victim_cfg.num_seeds,
                    num_classes=dataset.num_classes,
                    num_examples=len(y_fit),
                    workdir=workdir,
                    confusion=confusion,
                    evals=evals,
                    evaluators=evaluators,
                    progress=progress,
                    untrained=untrained,
                )
                runs[run_name] = {"poison": set_name, "objective": obj_label}
                if victims:
                    runs[run_name]["victim"] = victim_name
                runs[run_name].update(entry)
                if victims and set_name == "clean":
                    errors = _attack_transfer(trainer, states, train_sets, train_idx, dataset)
                    for poison, cell in errors.items():
                        attack_transfer.setdefault(poison, {})[victim_name] = cell

    summary, trained, outputs, figures = summarize_runs(
        config, runs, workdir, class_names=dataset.class_names
    )
    results = {
        **results_header(config, t_start=t_start, dataset=dataset),
        "poisons": poisoning.artifacts(crafted, workdir),
        **outputs,
    }
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
                t: _crafting_architecture(config, t, dataset.image_shape) for t in train_sets
            },
            "accuracy": transfer.accuracy_matrix(runs, summary),
            "attack_transfer": attack_transfer,
        }
        figures += transfer.save_plots(results["transfer"], workdir)
    say_tables(results, summary, trained)
    if victims:
        say(transfer.table(results["transfer"]))
    close_run(results, workdir, plots=figures)
    return results


def names_objectives(config):
    """Whether run names start with the objective's label: when the config declares several
    objectives, even if ``select.objectives`` picks one, so a cell's name (hence its victim key
    and checkpoint) is the same however many columns a run selects."""
    return len(plain(config.get("objectives") or {})) > 1


def summarize_runs(config, runs, workdir, *, class_names=None):
    """What every grid-like trainer writes of its `runs`: ``(summary, trained, outputs,
    figures)``, `trained` the summaries of trained (not ``untrained``) runs, `outputs` the
    ``results.json`` fields ``runs``, ``summary``, ``learning_speed`` (and ``defense_grid`` when
    run names start with the objective's label, `names_objectives`), `figures` the plots drawn
    in `workdir` (curves, confusion matrices, learning speed, objectives, grid)."""
    loss_threshold = config.get("loss_threshold", 0.5)
    summary = {}
    for name, r in runs.items():
        summary[name] = summarize.run_summary(
            r["history"], loss_threshold, untrained=r.get("untrained", False)
        )
        if "evals" in r:
            summary[name]["evals"] = summarize.eval_summary(r["evals"])
    trained = {n: s for n, s in summary.items() if not runs[n].get("untrained")}
    outputs = {"runs": runs, "summary": summary, "learning_speed": speed.diagnostics(trained)}
    figures = [workdir / "curves.png", workdir / "confusion.png"]
    plots.curves(runs, figures[0], title=config.get("name", ""))
    plots.confusion_matrices(
        {n: r["confusion"] for n, r in runs.items()},
        figures[1],
        class_names=class_names,
        title="confusion matrices on the clean test set (rows: true class, % of the class)",
    )
    if len(trained) >= 3:
        figures += speed.save_plots(outputs["learning_speed"]["runs"], workdir)
    if names_objectives(config):
        title = config.get("name", "")
        bars = plots.objective_bars(trained, workdir / "objectives.png", title=title)
        figures += [bars] if bars else []
        grid = summarize.defense_grid(trained)
        if grid is not None:
            outputs["defense_grid"] = grid
            figures.append(plots.defense_heatmap(grid, workdir / "defense_grid.png", title=title))
    return summary, trained, outputs, figures


def say_tables(results, summary, trained):
    """Prints the tables of `summarize_runs`' results: accuracies, the defense grid, the
    evaluations and the learning-speed correlations."""
    say(summarize.table(summary))
    if "defense_grid" in results:
        say(summarize.defense_grid_markdown(results["defense_grid"]))
    if summarize.eval_table(summary):
        say(summarize.eval_table(summary))
    if len(trained) >= speed.MIN_POINTS:  # fewer runs: no correlation to speak of
        say(speed.describe(results["learning_speed"]))


def _crafting_architecture(config, run, image_shape):
    """`transfer.crafting_architecture` with ``'auto'`` resolved for the data's images."""
    name = transfer.crafting_architecture(plain(config), run)
    return specs.AUTO_MODELS.get(image_shape[-1], name) if name == "auto" else name


def _attack_transfer(trainer, states, train_sets, train_idx, dataset):
    """Error of the clean-trained victim `states` on every poisoned training set (true labels)
    and on the clean one: ``{poison: {'error_poisoned', 'error_clean'}}`` (mean ± std over
    seeds)."""
    y_true = dataset.y_train[train_idx]
    clean_acc = trainer.evaluate(states, dataset.x_train[train_idx], y_true)  # uint8 as it is
    error_clean = summarize.mean_std(1.0 - np.asarray(clean_acc["accuracy"]))
    out = {}
    for set_name, (x_train, _) in train_sets.items():
        if set_name in ("clean", "naive"):
            continue
        acc = trainer.evaluate(states, x_train[train_idx], y_true)["accuracy"]
        out[set_name] = {
            "error_poisoned": summarize.mean_std(1.0 - np.asarray(acc)),
            "error_clean": error_clean,
        }
    return out


__all__ = [
    "make_evaluators",
    "names_objectives",
    "run_evals",
    "say_tables",
    "summarize_runs",
    "train_and_evaluate",
    "train_cell",
]
