"""configs/apbench.py: the attacks × defenses grid end to end on a tiny setting, and the promise
that adding a defense to a finished grid trains only its column."""

import importlib.util
import shutil
from pathlib import Path

import pytest

from jaxpoison import report, specs, trainers

pytestmark = pytest.mark.usefixtures("fast_compiles")

REPO = Path(__file__).resolve().parents[1]


def apbench(arg):
    spec = importlib.util.spec_from_file_location("apbench", REPO / "configs" / "apbench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_grid(objectives):
    config = apbench("cpu,tiny")
    # MNIST-sized digits (8x8) keep the run to seconds; the real data is the preset's.
    config.data.update(source="digits", name="digits", flip=False, val_size=20)
    config.victim.update(model=dict(name="mlp", width=0.25), num_seeds=2)
    config.select.update(poisons=("ops",), objectives=objectives)
    return config


@pytest.mark.parametrize("arg", ["", "cpu", "transfer", "cpu,transfer"])
def test_every_preset_holds_the_table(arg):
    # The GPU preset's spec check is test_config_lib's (every grid config); the CPU presets here.
    config = apbench(arg)
    if "cpu" in arg:
        specs.check(config, image_shape=(32, 32, 3), num_classes=10)
    rows = "em rem sem tap ar lsp ops ntga hypo dc cuda colour".split()
    assert set(rows) == set(config.poisons)
    table = {"erm", "cutout", "cutmix", "mixup", "gaussian", "bdr", "gray", "jpeg", "ueraser", "at"}
    if "transfer" in arg:  # erm alone, so its runs are named by victim and poison
        assert set(config.objectives) == {"erm"}
    else:
        assert table <= set(config.objectives)


def test_grid_table_and_a_new_defense_trains_only_its_column(tmp_path):
    workdir = tmp_path / "grid"
    first = trainers.train_and_evaluate(tiny_grid(("erm", "jpeg")), workdir, progress=False)
    grid = first["defense_grid"]
    assert grid["attacks"] == ["clean", "ops"]
    assert grid["defenses"][0] == "erm" and set(grid["defenses"]) == {
        "erm",
        "jpeg",
        "early_stopping",
    }
    assert grid["cost"]["erm"] == 0.0
    assert (workdir / "defense_grid.png").is_file()

    # A finished grid plus one defense: results.json moved away, rerun in the same workdir.
    shutil.move(workdir / "results.json", tmp_path / "results.old.json")
    log_before = (workdir / "log.txt").read_text()
    second = trainers.train_and_evaluate(
        tiny_grid(("erm", "jpeg", "gray")), workdir, progress=False
    )
    log = (workdir / "log.txt").read_text()[len(log_before) :]
    assert "poison ops: loaded from" in log
    for run in ("erm/clean", "erm/ops", "jpeg/clean", "jpeg/ops"):
        assert second["runs"][run]["history"] == first["runs"][run]["history"]
        assert f"{run}: resumed from epoch 2" in log
    assert "gray/ops: resumed" not in log and "gray/ops epoch 2/2" in log
    assert set(second["defense_grid"]["defenses"]) == {"erm", "jpeg", "gray", "early_stopping"}
    # One column selected alone keeps its cells' names, so they resume too.
    shutil.move(workdir / "results.json", tmp_path / "results.second.json")
    log_before = (workdir / "log.txt").read_text()
    third = trainers.train_and_evaluate(tiny_grid(("gray",)), workdir, progress=False)
    log = (workdir / "log.txt").read_text()[len(log_before) :]
    assert set(third["runs"]) == {"gray/clean", "gray/ops"}
    for run in ("gray/clean", "gray/ops"):
        assert third["runs"][run]["history"] == second["runs"][run]["history"]
        assert f"{run}: resumed from epoch 2" in log
    shutil.move(tmp_path / "results.second.json", workdir / "results.json")
    text = report.report([workdir]).read_text()
    assert "### Attacks × defenses" in text and "| cost on clean data (points) |" in text
