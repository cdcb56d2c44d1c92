"""End to end: the config run writes its workdir; the CLI refuses bad input with clear errors."""

import json
import shutil
from pathlib import Path

import pytest

from jaxpoison import report, trainers
from jaxpoison.evaluation import summarize

pytestmark = pytest.mark.usefixtures("fast_compiles")

REPO = Path(__file__).resolve().parents[1]
DIGITS = [
    "--config.data.source=digits",
    "--config.data.name=digits",
    "--config.victim.model.name=mlp",
    "--config.victim.batch_size=64",
]


def load_config(name, arg=None):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart")
    return workdir, trainers.train_and_evaluate(
        load_config("quickstart", "tiny"), workdir, progress=False
    )


def test_quickstart_tiny_writes_the_standard_workdir(tiny_run):
    workdir, results = tiny_run
    for name in ("config.json", "results.json", "curves.png", "log.txt"):
        assert (workdir / name).is_file(), name
    on_disk = json.loads((workdir / "results.json").read_text())
    artifact = workdir / on_disk["poisons"]["poisoned"]["artifact"]
    assert artifact.parent == workdir / "poison" / "poisoned"
    assert (artifact / "metadata.json").is_file()
    checkpoint = workdir / on_disk["runs"]["clean"]["checkpoint"]
    assert checkpoint.parent == workdir / "checkpoints" / "clean"
    assert (checkpoint / "spec.json").is_file() and any(checkpoint.iterdir())
    assert on_disk["complete"] and set(on_disk["summary"]) == {"clean", "poisoned"}
    for run in on_disk["summary"].values():
        for key in ("final_test_acc", "peak_test_acc"):
            assert 0.0 <= run[key]["mean"] <= 1.0 and run[key]["std"] >= 0.0
    hist = on_disk["runs"]["poisoned"]["history"]["test/accuracy"]
    assert len(hist) == 2 and len(hist[0]) == 2  # epochs x seeds
    assert results["summary"] == on_disk["summary"]


def test_a_complete_workdir_is_returned_as_is_or_refused_for_another_config(tiny_run):
    workdir, results = tiny_run
    before = (workdir / "results.json").read_text()
    again = trainers.train_and_evaluate(load_config("quickstart", "tiny"), workdir)
    assert again["summary"] == results["summary"]
    other = load_config("quickstart", "tiny")
    other.victim.epochs = 3
    with pytest.raises(ValueError, match="another config .*victim.*move results.json away"):
        trainers.train_and_evaluate(other, workdir, progress=False)
    assert (workdir / "results.json").read_text() == before


def _rerun_changed(tiny_run, tmp_path, change):
    """Copies the finished tiny workdir, moves results.json away (as the refusal message says),
    reruns with `change` applied to the config; returns (old results, new results)."""
    workdir, old = tiny_run
    used = tmp_path / "used"
    shutil.copytree(workdir, used)
    (used / "results.json").rename(tmp_path / "results.old.json")
    config = load_config("quickstart", "tiny")
    change(config)
    return old, trainers.train_and_evaluate(config, used, progress=False), used


def test_a_changed_poison_spec_in_a_used_workdir_is_crafted_afresh(tiny_run, tmp_path):
    """Bug: with num_patches=16 the run said 'loaded from' and reused the Regions-4 artifact."""

    def change(config):
        config.poisons.poisoned.num_patches = 16

    old, new, used = _rerun_changed(tiny_run, tmp_path, change)
    assert new["poisons"]["poisoned"]["key"] != old["poisons"]["poisoned"]["key"]
    meta = json.loads((used / new["poisons"]["poisoned"]["artifact"] / "metadata.json").read_text())
    assert meta["spec"]["num_patches"] == 16 and meta["record"]["kwargs"]["num_patches"] == 16
    assert "poison poisoned: crafted" in (used / "log.txt").read_text()
    # The clean victims did not depend on the poison: reused; the poisoned ones trained afresh.
    assert new["runs"]["clean"]["checkpoint"] == old["runs"]["clean"]["checkpoint"]
    assert new["runs"]["clean"]["history"] == old["runs"]["clean"]["history"]
    assert new["runs"]["poisoned"]["checkpoint"] != old["runs"]["poisoned"]["checkpoint"]
    assert new["runs"]["poisoned"]["history"] != old["runs"]["poisoned"]["history"]


def test_a_changed_victim_spec_in_a_used_workdir_is_trained_afresh(tiny_run, tmp_path):
    """Bug: finished victims of the old learning rate were restored under the new one."""

    def change(config):
        config.victim.optimizer.learning_rate = 0.01

    old, new, _ = _rerun_changed(tiny_run, tmp_path, change)
    assert new["poisons"] == old["poisons"]  # the poison did not depend on the victim
    for run in ("clean", "poisoned"):
        assert new["runs"][run]["checkpoint"] != old["runs"][run]["checkpoint"]
        losses = [r["runs"][run]["history"]["train/loss"] for r in (old, new)]
        assert losses[0] != losses[1]


def test_export_and_from_file_round_trip(tiny_run, tmp_path, cli_inprocess):
    """A crafted poison exported as a dataset file runs again as the registry's from_file
    poison, inside the ball; a file of another order is refused, not clipped."""
    import jax
    import numpy as np

    from jaxpoison import data, poisons
    from jaxpoison.trainers import poisoning

    workdir, _ = tiny_run
    out = tmp_path / "poisoned.npz"
    code, err = cli_inprocess("export", str(workdir), "poisoned", str(out))
    assert code == 0, err[-2000:]
    with np.load(out) as f:
        x, y = f["x_train"], f["y_train"]
    config = load_config("quickstart", "tiny")
    dataset = data.load(config.data)
    poison, state = poisoning.load_poison(config, "poisoned", dataset, workdir)
    images, labels = poisons.apply_all(poison, state, dataset.x_train, dataset.y_train)
    assert x.dtype == np.uint8 and np.array_equal(y, labels)
    assert np.abs(x / 255.0 - images).max() < 1 / 255
    config.poisons = {"theirs": dict(name="from_file", path=str(out))}
    run = dict(key=jax.random.key(0), workdir=tmp_path / "w", progress=False)
    crafted = poisoning.craft_poisons(config, dataset, **run)["theirs"]
    np.testing.assert_array_equal(crafted.images, data.as_float_images(x))
    np.savez(tmp_path / "reversed.npz", x_train=x[::-1], y_train=y)
    config.poisons = {"theirs": dict(name="from_file", path=str(tmp_path / "reversed.npz"))}
    with pytest.raises(ValueError, match="outside epsilon"):
        poisoning.craft_poisons(config, dataset, **run)
    assert cli_inprocess("export", str(workdir), "nope", str(out))[0] == 1


def test_cli_refuses_a_config_key_that_does_not_exist(tmp_path, cli):
    proc = cli(
        "--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}", "--config.victim.epochz=3"
    )
    assert proc.returncode == 2 and "epochz" in proc.stderr
    assert "jaxpoison: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists()


def test_cli_restarts_once_with_huge_pages(monkeypatch):
    from jaxpoison import main

    calls = []
    monkeypatch.setattr(main.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(main.sys, "platform", "linux")
    monkeypatch.setattr(main.sys, "argv", ["jaxpoison", "--config=c.py", "--workdir=w"])
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    main._reexec_with_huge_pages()
    ((exe, argv, env),) = calls
    assert argv == [exe, "-m", "jaxpoison.main", "--config=c.py", "--workdir=w"]
    assert env["GLIBC_TUNABLES"] == "glibc.pthread.rseq=0:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])  # the restarted process
    main._reexec_with_huge_pages()
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    monkeypatch.setenv("JAXPOISON_HUGE_PAGES", "0")
    main._reexec_with_huge_pages()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.data.name=cifar11", "No cifar11.npz found"),
        ("--config.threat.epsilon=8.0", "epsilon=8.0 > 1"),
        ("--config.poisons.poisoned.name=regionz", "regionz"),
        ("--config.victim.model.name=resnet7", "unknown model 'resnet7'"),
        ("--config.poisons.poisoned.name=random", "does not take argument(s) ['num_patches']"),
    ],
)
def test_cli_bad_input_exits_nonzero_naming_the_problem(tmp_path, override, message, cli_inprocess):
    """In this process (a new interpreter costs seconds); a real one: the epochz test above."""
    args = ["--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}", "--quiet"]
    if "cifar11" in override:
        args += ["--config.data.source=npz", f"--config.data.data_dir={tmp_path}"]
    code, err = cli_inprocess(*args, override)
    assert code == 1, err[-2000:]
    assert "jaxpoison: error:" in err and message in err
    assert "Traceback" not in err and "crafted" not in err  # before any work
    assert not (tmp_path / "results.json").exists()


def test_validation_split_gives_early_stopping_summary(tmp_path, cli_inprocess):
    code, err = cli_inprocess(
        "--config=configs/quickstart.py:tiny",
        f"--workdir={tmp_path}",
        "--quiet",
        "--config.include_clean=False",
        "--config.data.val_size=100",
        "--config.victim.epochs=2",
        *DIGITS[:3],
        "--config.data.num_train=600",
    )
    assert code == 0, err[-2000:]
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]["poisoned"]
    assert summary["early_stopped_epoch"][0] in (1, 2)
    assert 0.0 <= summary["early_stopped_test_acc"]["mean"] <= 1.0
    # The printed table and the report grow an early-stopped column, '-' for runs without one.
    early = summarize.percent(summary["early_stopped_test_acc"])
    other = {k: v for k, v in summary.items() if not k.startswith("early_stopped")}
    lines = summarize.table({"poisoned": summary, "other": other})
    assert "early-stopped" in lines and early in lines
    assert lines.splitlines()[-1].split()[-2] == "-"
    text = report.report([tmp_path]).read_text()
    assert "early-stopped acc (%)" in text and early in text


def test_config_evals_are_run_and_stored(tmp_path):
    config = load_config("quickstart", "tiny")
    with config.unlocked():
        config.data.update(source="digits", name="digits", num_train=300, num_test=60)
        config.victim.model.name = "mlp"
        config.victim.epochs = 1
        config.include_clean = False
        config.evals = {"risk": dict(name="risk", num_steps=3)}
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    evals = results["runs"]["poisoned"]["evals"]["risk"]
    assert len(evals["acc/D"]) == 2  # one value per seed
    assert all(0.0 <= a <= 1.0 for a in evals["acc/F"])
    assert "learning_speed" in json.loads((tmp_path / "results.json").read_text())
