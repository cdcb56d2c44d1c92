"""Victims of Learning to Confuse beyond the trainer: scikit-learn models and the noise diagnostic.

The paper trains a random forest and an RBF SVM on the poisoned MNIST training set and tests
them on clean MNIST; `sklearn_victims` does that for any (float image) training set. The
diagnostic `noise_diagnostic` measures how well classifiers predict the labels from the
perturbation g(x) alone (victims with BatchNorm are read twice: on their running averages, and
on each noise batch's statistics as the released DeepConfuse code reads them, the paper's
Table 2 reading), and `noise_structure` how much label information the perturbations
carry without any trained network (between-class share of their variance, nearest class mean
accuracy, correlation with the image). `evaluate_workdir` runs them on a finished `jaxpoison`
run (the scikit-learn victims and the noise structure on the first ``max_train`` training
images):

    python -m jaxpoison.trainers.l2c_victims --workdir=/tmp/l2c_mnist [--max_train=10000]

It reads ``config.json`` and ``results.json``, the crafted artifact and the victims' checkpoints
that ``results.json`` names, and writes ``l2c_victims.json``.

References:
  Feng, Cai & Zhou, "Learning to Confuse: Generating Training Time Adversarial Data with
  Auto-Encoder", NeurIPS 2019 (Table 1: random forest and SVM victims on MNIST; their code uses
  an RBF SVC with C = 200, gamma = 0.01).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxpoison import checkpointing, data, poisons, specs, training
from jaxpoison.poisons import l2c
from jaxpoison.trainers import poisoning
from jaxpoison.workdir import write_json_atomic

SKLEARN_VICTIMS = ("random_forest", "svm_rbf")


def make_sklearn_victim(name, *, seed=0, n_jobs=2):
    """A random forest of 300 trees or an RBF SVM (C = 200, gamma = 0.01, as the paper's code)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.svm import SVC

    if name == "random_forest":
        return RandomForestClassifier(n_estimators=300, n_jobs=n_jobs, random_state=seed)
    if name == "svm_rbf":
        return SVC(C=200.0, kernel="rbf", gamma=0.01, cache_size=2000)
    raise ValueError(f"Unknown scikit-learn victim {name!r}; use one of {SKLEARN_VICTIMS}.")


def sklearn_victims(x_train, y_train, x_test, y_test, *, victims=SKLEARN_VICTIMS, seed=0, n_jobs=2):
    """Trains each scikit-learn victim on (x_train, y_train), returns its clean test accuracy.

    Args:
      x_train, x_test: images [N, H, W, C], float in [0, 1] or uint8 (flattened to vectors).
      y_train, y_test: int labels.
      victims: names of `SKLEARN_VICTIMS`.
      seed: random forest seed.
      n_jobs: random forest worker processes.

    Returns:
      ``{name: {"test_accuracy": float, "fit_seconds": float}}``.
    """
    flat = lambda x: data.to_float(np.asarray(x)).reshape(len(x), -1)
    xtr, xte = flat(x_train), flat(x_test)
    out = {}
    for name in victims:
        model = make_sklearn_victim(name, seed=seed, n_jobs=n_jobs)
        t0 = time.time()
        model.fit(xtr, np.asarray(y_train))
        out[name] = {
            "test_accuracy": float(model.score(xte, np.asarray(y_test))),
            "fit_seconds": time.time() - t0,
        }
    return out


def noise_diagnostic(classifiers, noise, labels, *, batch_statistics=False):
    """Accuracy of each classifier on the perturbations alone: ``{name: acc of f(g(x))}``.

    Args:
      classifiers: ``{name: (apply_fn, variables)}``.
      noise: g(x) [N, H, W, C] (see `l2c.perturbations`).
      labels: int labels [N].
      batch_statistics: BatchNorm on the statistics of each batch of 1,000 noise images, as the
        released DeepConfuse code reads its victims (`l2c.noise_accuracy`); only the
        classifiers with BatchNorm (a ``batch_stats`` collection) are read then.
    """
    return {
        name: l2c.noise_accuracy(
            apply_fn, variables, noise, labels, batch_statistics=batch_statistics
        )
        for name, (apply_fn, variables) in classifiers.items()
        if not batch_statistics or "batch_stats" in variables
    }


def noise_structure(noise_train, y_train, noise_test, y_test, *, images=None, num_classes=None):
    """How much label information the perturbations carry, read without any trained network.

    The noise-only accuracy of a victim depends on that victim (its architecture, its training);
    these numbers depend on the noise alone, so generators can be compared across victims and
    against a poison made elsewhere (docs/l2c.md measured the released DeepConfuse generator's:
    between-class share 0.41, nearest class mean 0.91, image correlation -0.57).

    Args:
      noise_train: perturbations g(x) of training images [N, H, W, C] (float).
      y_train: their labels [N].
      noise_test: perturbations of held-out images [M, H, W, C].
      y_test: their labels [M].
      images: the clean images of `noise_train` (float in [0, 1]), for the image correlation.
      num_classes: K (default: 1 + the largest label).

    Returns:
      ``between_class_share``: the fraction of the training noise's variance (summed over
      pixels) that the per-class means explain, 1 for class-wise noise, about K/N for noise
      independent of the label. ``nearest_class_mean_accuracy``: accuracy on `noise_test` of
      the nearest per-class mean of the training noise (chance 1/K). ``mean_abs``: mean |g|.
      ``image_correlation`` (with `images`): the mean over images of the Pearson correlation
      between g(x) and x across pixels (negative: the noise erases the image).
    """
    flat = np.asarray(noise_train, np.float32).reshape(len(noise_train), -1)
    held = np.asarray(noise_test, np.float32).reshape(len(noise_test), -1)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    k = int(num_classes or 1 + max(y_train.max(), y_test.max()))
    present = np.array([np.any(y_train == c) for c in range(k)])
    means = np.stack([flat[y_train == c].mean(0) if present[c] else flat.mean(0) for c in range(k)])
    centred = flat - flat.mean(0)
    between = np.sum(np.square(means[y_train] - flat.mean(0)))
    total = np.sum(np.square(centred))
    dist = np.square(held).sum(1)[:, None] - 2 * held @ means.T + np.square(means).sum(1)[None]
    dist[:, ~present] = np.inf
    out = {
        "between_class_share": float(between / total) if total > 0 else 0.0,
        "nearest_class_mean_accuracy": float(np.mean(np.argmin(dist, 1) == y_test)),
        "mean_abs": float(np.mean(np.abs(flat))),
    }
    if images is not None:
        x = np.asarray(images, np.float32).reshape(len(flat), -1)
        xc, nc = x - x.mean(1, keepdims=True), flat - flat.mean(1, keepdims=True)
        norms = np.linalg.norm(xc, axis=1) * np.linalg.norm(nc, axis=1)
        ok = norms > 0
        out["image_correlation"] = float(np.mean(np.sum(xc * nc, 1)[ok] / norms[ok]))
    return out


def victim_runs(config, run, dataset):
    """(label, victim spec, run name) of the clean-trained and `run`-trained victims of a run.

    One victim per training set, or, with ``config.victims`` (the transfer study), one per
    architecture and training set, labelled ``<architecture>_<set>``.
    """
    shape = dict(image_shape=dataset.image_shape, num_classes=dataset.num_classes)
    victims = specs.selected(config, "victims")
    if not victims:
        return [(f"victim_{s}", specs.victim(config, **shape), s) for s in ("clean", run)]
    return [
        (f"{arch}_{s}", specs.victim(config, overrides, **shape), f"{arch}/{s}")
        for arch, overrides in victims.items()
        for s in ("clean", run)
    ]


def _restore_victim(victim_config, dataset, workdir, run_name, results):
    """(apply_fn, variables of seed 0) of a victim the run trained, or None."""
    entry = results.get("runs", {}).get(run_name)
    if entry is None or not (Path(workdir) / entry["checkpoint"]).is_dir():
        return None
    ckpt = Path(workdir) / entry["checkpoint"]
    trainer = training.Trainer.from_config(
        victim_config, num_classes=dataset.num_classes, image_shape=dataset.image_shape
    )
    steps_per_epoch = max(1, len(dataset.y_train) // trainer.batch_size)
    template = trainer.init_seeds(jax.random.key(0), victim_config.num_seeds, steps_per_epoch)
    manager = checkpointing.Manager(ckpt)
    if manager.latest_step() is None:
        return None
    states, _, _ = manager.restore(template)
    manager.close()
    state = jax.tree.map(lambda a: a[0], states)
    return trainer.apply_fn, {"params": state.params, **state.model_state}


def evaluate_workdir(workdir, *, run="l2c", max_train=None, victims=SKLEARN_VICTIMS, n_jobs=2):
    """scikit-learn victims on clean vs L2C data and the noise diagnostic of a finished run.

    Args:
      workdir: the run's workdir (with config.json and poison/<run>/).
      run: the poison run name in ``config.poisons``.
      max_train: train the scikit-learn victims on the first this many training examples only
        (the RBF SVM is quadratic in N).
      victims: names of `SKLEARN_VICTIMS`.
      n_jobs: random forest worker processes.

    Returns:
      The dict also written to ``WORKDIR/l2c_victims.json``.
    """
    workdir = Path(workdir)
    results_path = workdir / "results.json"
    if not results_path.is_file():
        raise ValueError(f"{workdir} has no results.json; finish the run first (same command).")
    results = json.loads(results_path.read_text())
    config = ml_collections.ConfigDict(results["config"])
    dataset = data.load(config.data)
    poison, state = poisoning.load_poison(config, run, dataset, workdir)
    ps = specs.poison_spec(
        config, run, image_shape=dataset.image_shape, num_classes=dataset.num_classes
    )
    x_clean = data.to_float(dataset.x_train)
    x_poison, y_poison = poisons.apply_all(poison, state, x_clean, dataset.y_train)
    n = len(y_poison) if max_train is None else min(int(max_train), len(y_poison))
    result = {"run": run, "num_train": n, "num_test": int(len(dataset.y_test))}
    result["sklearn"] = {
        "clean": sklearn_victims(
            x_clean[:n],
            dataset.y_train[:n],
            dataset.x_test,
            dataset.y_test,
            victims=victims,
            n_jobs=n_jobs,
        ),
        run: sklearn_victims(
            x_poison[:n],
            y_poison[:n],
            dataset.x_test,
            dataset.y_test,
            victims=victims,
            n_jobs=n_jobs,
        ),
    }
    if ps.name == "l2c":
        noise = l2c.perturbations(
            state, data.to_float(dataset.x_test), generator=ps.kwargs["generator"], threat=ps.threat
        )
        classifiers = {}
        for label, victim_config, victim_run in victim_runs(config, run, dataset):
            restored = _restore_victim(victim_config, dataset, workdir, victim_run, results)
            if restored is not None:
                classifiers[label] = restored
        result["noise_only_test_accuracy"] = noise_diagnostic(classifiers, noise, dataset.y_test)
        result["noise_only_test_accuracy_batch_statistics"] = noise_diagnostic(
            classifiers, noise, dataset.y_test, batch_statistics=True
        )
        noise_train = l2c.perturbations(
            state, x_clean[:n], generator=ps.kwargs["generator"], threat=ps.threat
        )
        result["noise_structure"] = noise_structure(
            noise_train,
            dataset.y_train[:n],
            noise,
            dataset.y_test,
            images=x_clean[:n],
            num_classes=dataset.num_classes,
        )
    write_json_atomic(workdir / "l2c_victims.json", result)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--run", default="l2c")
    parser.add_argument("--max_train", type=int, default=None)
    parser.add_argument("--victims", default=",".join(SKLEARN_VICTIMS))
    parser.add_argument("--n_jobs", type=int, default=2)
    args = parser.parse_args(argv)
    result = evaluate_workdir(
        args.workdir,
        run=args.run,
        max_train=args.max_train,
        victims=tuple(v for v in args.victims.split(",") if v),
        n_jobs=args.n_jobs,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()


__all__ = [
    "SKLEARN_VICTIMS",
    "evaluate_workdir",
    "make_sklearn_victim",
    "noise_diagnostic",
    "noise_structure",
    "sklearn_victims",
]
