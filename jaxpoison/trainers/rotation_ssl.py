"""The rotation-SSL study (``config.trainer = 'rotation_ssl'``): self-supervised rotation
prediction on the (poisoned) training images, then a linear probe on clean labels, with standard
and with adversarial training of the pretext task (Tao et al. 2021, after Gidaris et al. 2018).

For every training set (``clean`` when ``config.include_clean``, and every poison of
``config.poisons``, crafted by `trainers.poisoning.craft_poisons`) and every pretext objective
of ``config.objectives`` (label -> objective spec of `jaxpoison.objectives`, e.g. ``erm`` for ST and
``pgd_at`` for AT, PGD then maximising the rotation loss):

1. the victim (``config.victim``, a model with 4 outputs) learns to predict the rotation
   (0/90/180/270°) of the training images, all four rotations of each batch, labels ignored
   (`ssl.rotation.pretext`); after every epoch its rotation accuracy on the first
   ``config.ssl.pretext_test_size`` clean test images (in their four rotations) is the history's
   ``test/accuracy``;
2. a linear probe (`ssl.probe.fit`: multinomial logistic regression, full-batch Adam,
   ``config.ssl.probe`` = num_steps, learning_rate, weight_decay) is fitted on the frozen
   penultimate features of the same training images, with their labels (delusive poisons keep
   the clean labels), and evaluated on the clean test set.

``summary['<objective>/<set>']`` holds ``probe_test_acc`` (the probe's clean test accuracy: the
number of the study; also written as ``final_test_acc`` and ``peak_test_acc`` so that
``jaxpoison report`` tables show it), ``probe_train_acc`` and ``pretext_final_test_acc``.
``curves.png`` shows the pretext (rotation) accuracy on clean test images per epoch.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxpoison import data, models, plots, sharding, specs, train_state, training
from jaxpoison.evaluation import summarize
from jaxpoison.progress import say
from jaxpoison.ssl import probe, rotation
from jaxpoison.trainers import poisoning
from jaxpoison.workdir import close_run, open_run, results_header, run_key


def make_probe_fn(trainer, *, num_classes, config):
    """A jitted ``probe_fn(states, x_train, y_train, x_test, y_test) -> scores`` that fits a linear
    probe per seed on the penultimate features of `states` and evaluates it.

    Args:
      trainer: the `Trainer` that trains the states (its module and seed strategy).
      num_classes: classes of the downstream task.
      config: ``config.ssl`` (``feature_batch_size``, ``probe``: keywords of `probe.fit`).

    Returns:
      ``probe_fn``; its ``states`` have a leading seed axis, the images are uint8 or floats in
      [0, 1], and it returns ``{'train_accuracy', 'test_accuracy', 'final_loss'}``, arrays [seeds].
    """
    features_fn = models.make_features_fn(trainer.module)
    batch_size = int(config.get("feature_batch_size", 500))
    fit = functools.partial(probe.fit, num_classes=num_classes, **dict(config.get("probe", {})))

    def extract(states, x):
        def one_seed(state):
            variables = {"params": state.params, **state.model_state}
            return probe.extract(features_fn, variables, x, batch_size=batch_size)

        return train_state.over_seeds(one_seed, trainer.seed_strategy)(states)

    def score(f_train, f_test, y_train, y_test):
        p, losses = fit(f_train, y_train)
        return {
            "train_accuracy": probe.accuracy(p, f_train, y_train),
            "test_accuracy": probe.accuracy(p, f_test, y_test),
            "final_loss": losses[-1],
        }

    @jax.jit
    def probe_fn(states, x_train, y_train, x_test, y_test):
        x_train, x_test = data.device_float(x_train), data.device_float(x_test)
        f_train, f_test = extract(states, x_train), extract(states, x_test)
        return jax.vmap(score, in_axes=(0, 0, None, None))(f_train, f_test, y_train, y_test)

    return probe_fn


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the rotation-SSL study `config` in `workdir`; returns the results dict."""
    done = open_run(config, workdir)
    if done is not None:
        return done
    workdir = Path(workdir)
    t_start = time.time()
    root = jax.random.key(config.seed)
    ssl_cfg = config.get("ssl", ml_collections.ConfigDict())
    dataset = data.load(config.data)
    say(f"data: {dataset.name} train {dataset.x_train.shape} test {dataset.x_test.shape}")
    specs.check(
        config, image_shape=dataset.image_shape, num_classes=dataset.num_classes, victims=False
    )
    train_sets = {}
    if config.get("include_clean", True):
        train_sets["clean"] = (dataset.x_train, dataset.y_train)
    crafted = poisoning.craft_poisons(config, dataset, key=root, workdir=workdir, progress=progress)
    train_sets.update({run: (c.images, c.labels) for run, c in crafted.items()})
    mesh = sharding.data_mesh()
    rep = sharding.replicated(mesh)
    x_test = jax.device_put(data.to_float(dataset.x_test), rep)
    y_test = jax.device_put(dataset.y_test.astype(np.int32), rep)
    num_pretext_test = min(int(ssl_cfg.get("pretext_test_size", 1000)), len(dataset.y_test))
    x_rot_test, y_rot_test = jax.device_get(rotation.rotate(x_test[:num_pretext_test]))

    runs, summary = {}, {}
    for obj_label, obj_spec in specs.selected(config, "objectives").items():
        victim_cfg = specs.victim(
            config, image_shape=dataset.image_shape, num_classes=rotation.NUM_ROTATIONS
        )
        victim_cfg.objective = specs.objective(config, obj_spec)
        trainer = training.Trainer.from_config(
            victim_cfg,
            num_classes=rotation.NUM_ROTATIONS,
            image_shape=dataset.image_shape,
            mesh=mesh,
        )
        trainer = dataclasses.replace(
            trainer,
            objective=rotation.pretext(trainer.objective),
            spec=dict(trainer.spec, pretext="rotation"),
        )
        probe_fn = make_probe_fn(trainer, num_classes=dataset.num_classes, config=ssl_cfg)
        for set_name, (x_train, y_train) in train_sets.items():
            run_name = f"{obj_label}/{set_name}"
            td = training.TrainData.create(
                x_train,
                y_train,
                x_rot_test,
                y_rot_test,
                crop_padding=config.data.get("crop_padding", 0),
                flip=config.data.get("flip", False),
                mesh=mesh,
            )
            t0 = time.time()
            states, history = trainer.fit(
                td,
                key=run_key(root, f"pretext/{run_name}"),
                num_seeds=config.victim.num_seeds,
                ckpt_dir=workdir / "checkpoints" / run_name.replace("/", "__"),
                name=f"{run_name} (rotation)",
                progress=progress,
            )
            scores = jax.device_get(probe_fn(states, td.x_train, td.y_train, x_test, y_test))
            scores = {k: np.asarray(v).tolist() for k, v in scores.items()}
            test_acc, train_acc = (
                np.mean(scores["test_accuracy"]),
                np.mean(scores["train_accuracy"]),
            )
            say(
                f"{run_name}: linear probe clean test accuracy {test_acc:.4f} "
                f"(train {train_acc:.4f})"
            )
            runs[run_name] = {
                "poison": set_name,
                "objective": obj_label,
                "history": history,
                "evals": {"linear_probe": scores},
                "wall_time_s": time.time() - t0,
            }
            pretext = summarize.run_summary(history, config.get("loss_threshold", 0.5))
            probe_ms = summarize.mean_std(scores["test_accuracy"])
            summary[run_name] = pretext | {
                "pretext_final_test_acc": pretext["final_test_acc"],
                "pretext_peak_test_acc": pretext["peak_test_acc"],
                "probe_test_acc": probe_ms,
                "probe_train_acc": summarize.mean_std(scores["train_accuracy"]),
                "final_test_acc": probe_ms,
                "peak_test_acc": probe_ms,
                "peak_epoch": [pretext["epochs"]] * pretext["seeds"],
            }
    results = {
        **results_header(config, t_start=t_start, dataset=dataset),
        "poisons": poisoning.artifacts(crafted, workdir),
        "runs": runs,
        "summary": summary,
    }
    title = (config.get("name", "") + "\n(rotation accuracy on clean test images)").strip()
    plots.curves(runs, workdir / "curves.png", title=title)
    say(
        summarize.text_table(
            [("run", "linear probe test acc", "probe train acc", "rotation test acc", "seeds")]
            + [
                (
                    name,
                    summarize.pct(s["probe_test_acc"]),
                    summarize.pct(s["probe_train_acc"]),
                    summarize.pct(s["pretext_final_test_acc"]),
                    str(s["seeds"]),
                )
                for name, s in summary.items()
            ]
        )
    )
    close_run(results, workdir)
    return results


__all__ = ["make_probe_fn", "train_and_evaluate"]
