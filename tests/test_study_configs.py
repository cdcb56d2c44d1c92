"""Study config runs on tiny sizes (digits + MLP): the untrained victim, substandard models,
the THRM / TRADES λ sweep, the defender-budget sweep, learning speed, transfer across
architectures, and their report. (What the configs hold, without training: test_config_lib.)"""

import importlib.util
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, plots, report, trainers, training
from jaxpoison.evaluation import speed, tradeoff

REPO = Path(__file__).resolve().parents[1]
DIGITS = dict(source="digits", name="digits", num_train=200, num_test=100)


pytestmark = pytest.mark.usefixtures("fast_compiles")


def load_config(name, arg="tiny"):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def on_digits(config, width=0.1):
    """The config on sklearn digits with an MLP victim (and crafting model)."""
    with config.unlocked():
        config.data.update(DIGITS)
        config.victim.model = dict(name="mlp", width=width)
        if "surrogate" in config:
            config.surrogate.model = dict(name="mlp", width=width)
    return config


def test_fit_with_zero_epochs_returns_the_initialisation():
    ds = data.load(ml_collections.ConfigDict(DIGITS))
    td = training.train_data_from(ds.x_train, ds.y_train, ds)
    cfg = dict(
        model=dict(name="mlp", width=0.1),
        epochs=2,
        batch_size=50,
        optimizer=dict(learning_rate=0.1, schedule="constant"),
    )
    trainer = training.Trainer.from_config(
        ml_collections.ConfigDict(cfg), num_classes=10, image_shape=ds.image_shape
    )
    key = jax.random.key(3)
    states, history = trainer.fit(td, key=key, num_seeds=2, epochs=0, progress=False)
    init = trainer.init_seeds(key, 2, len(ds.y_train) // 50)
    for a, b in zip(jax.tree.leaves(states.params), jax.tree.leaves(init.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(np.asarray(states.step).max()) == 0
    assert set(history) == {"train/loss", "train/accuracy", "test/loss", "test/accuracy"}
    assert all(len(v) == 1 and len(v[0]) == 2 for v in history.values())
    # Independent numbers: numpy cross-entropy and accuracy of the initial logits.
    for s in range(2):
        one = jax.tree.map(lambda a, s=s: a[s], states)
        for split, x, y in (("train", td.x_train, ds.y_train), ("test", td.x_test, ds.y_test)):
            x = data.device_float(x)  # TrainData keeps uint8 images uint8
            logits = np.asarray(jax.jit(trainer.predict)(one, x), np.float64)
            top = logits.max(1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
            ce = -logp[np.arange(len(y)), y].mean()
            assert history[f"{split}/loss"][0][s] == pytest.approx(ce, rel=1e-4)
            acc = (logits.argmax(1) == y).mean()
            assert history[f"{split}/accuracy"][0][s] == pytest.approx(acc, abs=1e-6)
    assert abs(history["train/loss"][0][0] - np.log(10)) < 0.5  # an untrained 10-class model
    with pytest.raises(ValueError, match=r"epochs=3 must lie in \[0, 2\]"):
        trainer.fit(td, key=key, epochs=3, progress=False)


def test_substandard_tiny_gives_d_a_f_table_with_naive_model(tmp_path):
    full, tiny = load_config("substandard", None), load_config("substandard")
    assert full.include_naive and full.include_clean
    assert {s.name for s in full.poisons.values()} == {"noise", "mislabeling", "adversarial"}
    assert {s.name for s in full.evals.values()} == {"risk"}
    config = on_digits(tiny)
    with config.unlocked():  # the crafted Poisoning set and the l2 evaluator cost compile time
        config.select.poisons = ("noise", "mislabeling")
        del config.evals["l2"]
        config.evals.linf.num_steps = 2
        config.victim.epochs = 1
        config.victim.checkpoint_every = 0
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    summary, runs = results["summary"], results["runs"]
    assert set(summary) == {"naive", "noise", "mislabeling", "clean"}
    naive = summary["naive"]
    assert naive["epochs"] == 0 and naive["peak_epoch"] == [0, 0] and runs["naive"]["untrained"]
    assert summary["clean"]["epochs"] == 1 and "untrained" not in runs["clean"]
    assert set(results["learning_speed"]["runs"]) == {"noise", "mislabeling", "clean"}
    for name, run in runs.items():
        per_seed = run["evals"]["linf"]
        d, a, f = (np.asarray(per_seed[k]) for k in ("acc/D", "acc/A", "acc/F"))
        assert np.all(a <= d + 1e-6) and np.all(d <= f + 1e-6), name
        # The evaluator's clean accuracy is the trainer's final test accuracy (two code paths).
        np.testing.assert_allclose(d, run["history"]["test/accuracy"][-1], atol=1e-6)
        stats = summary[name]["evals"]["linf"]
        assert stats["acc/F"]["mean"] == pytest.approx(f.mean())
        assert stats["acc/F"]["std"] == pytest.approx(f.std(ddof=1))
        conf = np.asarray(run["confusion"])  # [seeds, K, K]
        assert conf.shape == (2, 10, 10) and np.all(conf.sum((1, 2)) == 100)
        np.testing.assert_array_equal(conf.sum(2)[0], np.bincount(run_labels(), minlength=10))
        np.testing.assert_allclose(
            np.trace(conf, axis1=1, axis2=2) / 100, run["history"]["test/accuracy"][-1], atol=1e-6
        )
    log = (tmp_path / "log.txt").read_text()
    assert "acc/F" in log and "naive" in log
    assert (tmp_path / "confusion.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["summary"]["naive"]["evals"]["linf"]["acc/D"] == naive["evals"]["linf"]["acc/D"]


def run_labels():
    return data.load(ml_collections.ConfigDict(DIGITS)).y_test


def test_lambda_sweep_points_and_plot(tmp_path):
    # Points from hand-made results: grouped by family, sorted by λ, erm at λ = 0 in both.
    objectives = {
        "erm": {"name": "erm"},
        "thrm_6": {"name": "thrm", "beta": 6.0},
        "thrm_1": {"name": "thrm", "beta": 1.0},
        "trades_1": {"name": "trades", "beta": 1.0},
        "pgd_at": {"name": "pgd_at", "epsilon": 8 / 255},
    }
    runs = {f"{o}/clean": {"objective": o, "poison": "clean"} for o in objectives}
    runs["thrm_1/other"] = {"objective": "thrm_1", "poison": "other"}
    m = lambda v: {"mean": v, "std": 0.01}  # noqa: E731
    values = {
        "erm": (0.2, 0.9),
        "thrm_6": (0.35, 0.3),
        "thrm_1": (0.3, 0.5),
        "trades_1": (0.3, 0.7),
        "pgd_at": (0.5, 0.1),
    }
    summary = {
        f"{o}/clean": {"evals": {"linf": {"R_nat": m(x), "R_hyp/D-": m(y)}}}
        for o, (x, y) in values.items()
    }
    sweep = tradeoff.points(objectives, runs, summary, eval_label="linf")
    assert {f: [p["lambda"] for p in pts] for f, pts in sweep.items()} == {
        "thrm": [0.0, 1.0, 6.0],
        "trades": [0.0, 1.0],
        "pgd_at": [None],
    }
    assert [p["R_hyp/D-"]["mean"] for p in sweep["thrm"]] == [0.9, 0.5, 0.3]
    tradeoff.plot(sweep, tmp_path / "hand.png")
    assert (tmp_path / "hand.png").stat().st_size > 0
    with pytest.raises(ValueError, match="config.lambda_sweep.eval"):
        tradeoff.points(objectives, runs, summary, eval_label="l2")
    # End to end: erm and THRM λ = 1 on digits; the sweep comes from the stored evals.
    config = on_digits(load_config("lambda_sweep"))
    with config.unlocked():
        config.select.objectives = ("erm", "thrm_1")
        config.evals.linf.num_steps = 1
        config.victim.epochs = 1
        config.victim.num_seeds = 1
        config.victim.checkpoint_every = 0
    results = trainers.train_and_evaluate(config, tmp_path / "run", progress=False)
    points = results["lambda_sweep"]["thrm"]
    assert [p["run"] for p in points] == ["erm/clean", "thrm_1/clean"]
    for p in points:
        acc_d = results["runs"][p["run"]]["evals"]["linf"]["acc/D"][0]
        assert p["R_nat"]["mean"] == pytest.approx(1.0 - acc_d)
    assert (tmp_path / "run" / "lambda_sweep.png").stat().st_size > 0
    with config.unlocked():
        config.lambda_sweep.eval = "l2"
    with pytest.raises(ValueError, match="lambda_sweep.eval='l2' must name a 'risk' evaluator"):
        trainers.train_and_evaluate(config, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "results.json").exists()


def test_defenses_budget_sweep(tmp_path):
    # ε_def sweep on digits: ST (ε = 0) and PGD-AT at 4/255, on clean data and P5.
    config = on_digits(load_config("defenses_cifar10", "family,sweep,tiny"))
    with config.unlocked():
        config.select.objectives = ("erm", "pgd_at_eps4")
        config.select.poisons = ("P5_random",)
        config.victim.epochs = 1
        config.victim.num_seeds = 1
        config.victim.checkpoint_every = 0
    results = trainers.train_and_evaluate(config, tmp_path / "run", progress=False)
    sweep = results["budget_sweep"]
    # The objective x training-set table as bars; a single objective has nothing to compare.
    assert (tmp_path / "run" / "objectives.png").stat().st_size > 0
    erm_only = {k: v for k, v in results["summary"].items() if k.startswith("erm/")}
    assert plots.objective_bars(erm_only, tmp_path / "none.png") is None
    assert set(sweep) == {"clean", "P5_random"}
    for train_set, points in sweep.items():
        assert [p["epsilon"] for p in points] == [0.0, pytest.approx(4 / 255)]
        assert [p["run"] for p in points] == [f"erm/{train_set}", f"pgd_at_eps4/{train_set}"]
        final = results["summary"][points[1]["run"]]["final_test_acc"]
        assert points[1]["final_test_acc"] == final
    assert (tmp_path / "run" / "budget_sweep.png").stat().st_size > 0


def test_learning_speed_tiny_writes_figures_and_correlation(tmp_path):
    full = load_config("learning_speed", None)
    assert len(full.select.poisons) + full.include_clean == 12
    config = on_digits(load_config("learning_speed"))
    with config.unlocked():  # four runs are enough for the statistics and the figures
        config.select.poisons = ("random", "regions_16", "mislabeling")
        config.loss_threshold = 2.0  # some runs cross it within 2 epochs, not all
        config.victim.optimizer = dict(name="adam", learning_rate=1e-2, schedule="constant")
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    assert len(results["summary"]) == 4 and ls_ok(results)
    ls = results["learning_speed"]
    # Runs that never got below the threshold (censored) are left out of the ρ; too few: NaN.
    measured = [p for p in speed.run_points(results["summary"]).values() if not p["censored"]]
    expected = float("nan")
    if len(measured) >= speed.MIN_POINTS:
        expected = speed.spearman(
            [p["epoch_to_threshold"] for p in measured], [p["peak_acc"] for p in measured]
        )
    np.testing.assert_equal(ls["spearman/epoch_to_threshold_vs_peak_acc"], expected)
    assert ls["num_points/epoch_to_threshold_vs_peak_acc"] == len(measured)
    for name in ("learning_speed_epochs_vs_peak.png", "learning_speed_peak_vs_final.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "learning speed of 4 runs: Spearman" in (tmp_path / "log.txt").read_text()


def ls_ok(results):
    """Some run crossed the loss threshold and some did not: the correlation is informative."""
    epochs = [s["epoch_loss_below_threshold"][0] for s in results["summary"].values()]
    return any(e is None for e in epochs) or len(set(epochs)) > 1


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    """Two victim architectures × {clean, an MLP-crafted error-maximizing poison, P5}."""
    config = load_config("transfer")
    with config.unlocked():
        config.data.update(DIGITS)
        config.threat.epsilon = 0.25  # digits are few-pixel images: a visible white-box effect
        em = config.poisons.em_mlp
        em.num_steps = 10
        em.surrogate.model.width = 0.25
        config.poisons.random = dict(name="random")
        config.select.poisons = ("em_mlp", "random")
        config.victims = {  # two MLP widths: cheap to compile, and enough to test the logic
            "mlp": dict(model=dict(name="mlp", width=0.25)),
            "mlp_wide": dict(model=dict(name="mlp", width=1.0)),
        }
        for cfg in (config.surrogate, config.victim):
            cfg.epochs = 3
            cfg.checkpoint_every = 0  # only at the end: saving is slow next to these steps
        config.victim.optimizer.learning_rate = 1e-2
    workdir = tmp_path_factory.mktemp("transfer")
    return workdir, trainers.train_and_evaluate(config, workdir, progress=False)


def test_transfer_matrix_attack_transfer_and_heat_maps(transfer_run):
    workdir, results = transfer_run
    sets, victims = ("clean", "em_mlp", "random"), ("mlp", "mlp_wide")
    assert set(results["summary"]) == {f"{v}/{s}" for v in victims for s in sets}
    tr = results["transfer"]
    assert tr["crafted_with"] == {"clean": None, "em_mlp": "mlp", "random": None}
    for s in sets:
        for v in victims:
            assert tr["accuracy"][s][v] == results["summary"][f"{v}/{s}"]["final_test_acc"]
    assert set(tr["attack_transfer"]) == {"em_mlp", "random"}
    assert all(set(cells) == set(victims) for cells in tr["attack_transfer"].values())
    for v in victims:  # the error-maximizing δ of an MLP surrogate transfers to MLP victims
        cell = tr["attack_transfer"]["em_mlp"][v]
        assert cell["error_poisoned"]["mean"] > cell["error_clean"]["mean"] + 0.1, v
    assert (workdir / "checkpoints" / "surrogate_em_mlp").is_dir()
    for name in ("transfer.png", "attack_transfer.png", "confusion.png"):
        assert (workdir / name).stat().st_size > 0
    assert "victim clean test accuracy" in (workdir / "log.txt").read_text()


def test_report_shows_confusion_matrices_and_transfer_heat_map(transfer_run, tmp_path):
    workdir, _ = transfer_run
    text = report.report([workdir], out=tmp_path).read_text()
    assert "![confusion](confusion_0.png)" in text and "Transfer across architectures" in text
    assert "em_mlp (mlp)" in text and "perturbations_0_em_mlp.png" in text
    for name in ("confusion_0.png", "transfer_0.png", "attack_transfer_0.png"):
        assert (tmp_path / name).stat().st_size > 0
