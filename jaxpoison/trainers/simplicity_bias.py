"""The simplicity-bias study (``config.trainer = 'simplicity_bias'``): on MNIST-CIFAR, does a
defense make the network learn the CIFAR half, which standard training ignores?

Every objective of ``config.objectives`` (label -> objective spec, e.g. ``erm`` and ``pgd_at``
with ``mask`` = `data.mnist_cifar.mnist_mask` and ``epsilon=1``: AT whose threat model lets only
the MNIST half move, anywhere in [0, 1]) trains ``config.victim`` on the MNIST-CIFAR training set
(``config.data``, ``source='mnist_cifar'``). After every epoch each victim is evaluated on the
normal test set (``test/accuracy``) and on the MNIST-randomized test set
(``test_mnist_randomized/accuracy``: the digits shuffled across the test set with
``config.seed``, so they carry no label information). ``summary[label]`` holds the usual
``final_test_acc`` / ``peak_test_acc`` and ``final_mnist_randomized_acc`` /
``peak_mnist_randomized_acc``; ``runs[label]['evals']['mnist_randomized']`` the final per-seed
accuracies. Shah et al. (2020) find ≈100% vs ≈50% for standard training (the network reads only
the digit); Tao et al. (2021) that AT restricted to the MNIST half brings the second number up.

Writes ``curves.png`` (normal test set) and ``curves_mnist_randomized.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from jaxpoison import data, plots, sharding, specs, training
from jaxpoison.data import mnist_cifar
from jaxpoison.evaluation import summarize
from jaxpoison.progress import say
from jaxpoison.workdir import close_run, open_run, results_header, run_key

RANDOMIZED = "test_mnist_randomized/accuracy"


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the simplicity-bias study `config` in `workdir`; returns the results dict."""
    done = open_run(config, workdir)
    if done is not None:
        return done
    workdir = Path(workdir)
    t_start = time.time()
    dataset = data.load(config.data)
    if tuple(dataset.image_shape) != mnist_cifar.IMAGE_SHAPE:
        raise data.DataError(
            f"the simplicity-bias study needs MNIST-CIFAR images {mnist_cifar.IMAGE_SHAPE}, got "
            f"{dataset.name} {tuple(dataset.image_shape)}; set data.source='mnist_cifar' and "
            "data.name='mnist_cifar'."
        )
    say(f"data: {dataset.name} train {dataset.x_train.shape} test {dataset.x_test.shape}")
    x_randomized = mnist_cifar.randomize_mnist(dataset.x_test, seed=config.seed)
    root = jax.random.key(config.seed)
    runs, summary = {}, {}
    for label, spec in specs.selected(config, "objectives").items():
        victim_cfg = specs.victim(
            config, image_shape=dataset.image_shape, num_classes=dataset.num_classes
        )
        victim_cfg.objective = specs.objective(config, spec)
        trainer = training.Trainer.from_config(
            victim_cfg, num_classes=dataset.num_classes, image_shape=dataset.image_shape
        )
        td = training.train_data_from(
            dataset.x_train,
            dataset.y_train,
            dataset,
            crop_padding=config.data.get("crop_padding", 0),
            flip=config.data.get("flip", False),
            mesh=trainer.mesh,
        )
        x_rand = jax.device_put(
            x_randomized.astype(np.float32) / 255.0, sharding.replicated(trainer.mesh)
        )

        def record(epoch, states, history, trainer=trainer, x_rand=x_rand, y=td.y_test):
            del epoch
            acc = jax.device_get(trainer.evaluate(states, x_rand, y)["accuracy"])
            history.setdefault(RANDOMIZED, []).append([float(a) for a in np.atleast_1d(acc)])

        t0 = time.time()
        _, history = trainer.fit(
            td,
            key=run_key(root, f"victim/{label}"),
            num_seeds=config.victim.num_seeds,
            ckpt_dir=workdir / "checkpoints" / label.replace("/", "__"),
            name=label,
            progress=progress,
            epoch_callback=record,
        )
        randomized = np.asarray(history[RANDOMIZED])  # [epochs, seeds]
        runs[label] = {
            "objective": label,
            "history": history,
            "evals": {"mnist_randomized": {"accuracy": randomized[-1].tolist()}},
            "wall_time_s": time.time() - t0,
        }
        summary[label] = summarize.run_summary(history, config.get("loss_threshold", 0.5)) | {
            "final_mnist_randomized_acc": summarize.mean_std(randomized[-1]),
            "peak_mnist_randomized_acc": summarize.mean_std(randomized.max(0)),
        }
    results = {
        **results_header(config, t_start=t_start, dataset=dataset),
        "runs": runs,
        "summary": summary,
    }
    title = config.get("name", "")
    plots.curves(runs, workdir / "curves.png", title=title)
    plots.curves(runs, workdir / "curves_mnist_randomized.png", metric=RANDOMIZED, title=title)
    say(
        summarize.text_table(
            [("run", "test acc", "MNIST-randomized test acc", "seeds")]
            + [
                (
                    name,
                    summarize.pct(s["final_test_acc"]),
                    summarize.pct(s["final_mnist_randomized_acc"]),
                    str(s["seeds"]),
                )
                for name, s in summary.items()
            ]
        )
    )
    close_run(results, workdir)
    return results


__all__ = ["RANDOMIZED", "train_and_evaluate"]
