"""The streamed trainer (``config.trainer='streamed'``): configs/stream_tfds.py:tiny on a tfds
ArrayRecord dataset trains the in-memory grid's victims, resumes a killed run, refuses what it
cannot stream in one line."""

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxpoison import data, poisons, threat, trainers
from jaxpoison.data import streaming
from jaxpoison.trainers import streamed

pytestmark = pytest.mark.usefixtures("fast_compiles")

NAME = "tiny_cifar10"
CONFIG = Path(__file__).parents[1] / "configs" / "stream_tfds.py"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """200 training and 100 test images of the embedded CIFAR-10 subset as a tfds ArrayRecord
    dataset and as an .npz file of the same arrays."""
    ds = data.load(source="embedded", name="cifar10", num_train=200, num_test=100)
    root = tmp_path_factory.mktemp("data")
    splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    streaming.write_tfds(root / "tfds", NAME, splits, num_classes=10)
    np.savez(root / "same.npz", x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
             y_test=ds.y_test)  # fmt: skip
    return root


def tiny(root):
    """configs/stream_tfds.py:tiny on the written dataset: an MLP, 1 seed, clean + 2 poisons."""
    config = runpy.run_path(str(CONFIG))["get_config"]("tiny")
    config.data.update(name=NAME, data_dir=str(root / "tfds"), num_train=0, num_test=0)
    config.stream.update(num_threads=2, craft_subset=200)  # every record: as the grid crafts
    config.poisons = {
        "lsp": dict(name="lsp"),  # a per-example δ, applied by index
        "one_pixel": dict(name="one_pixel", threat=dict(norm="l0", pixels=1)),  # crafted
    }
    config.victim.update(num_seeds=1, batch_size=25)
    config.victim.model.name = "mlp"  # compiles faster than the CNN
    return config


@pytest.fixture(scope="module")
def streamed_run(written, tmp_path_factory):
    """The streamed results of clean, LSP and one-pixel, and the workdir."""
    workdir = tmp_path_factory.mktemp("streamed")
    return trainers.train_and_evaluate(tiny(written), workdir, progress=False), workdir


def test_streamed_run_gives_the_in_memory_grids_numbers(written, streamed_run, tmp_path):
    results, workdir = streamed_run
    stored = json.loads((workdir / "results.json").read_text())
    assert stored["complete"] and stored["stream"]["num_examples"] == 200
    assert stored["poisons"]["lsp"] == {"made_from": streamed.LABELS}
    crafted = stored["poisons"]["one_pixel"]
    assert crafted["made_from"] == streamed.SUBSET and crafted["craft_subset"] == 200
    assert (workdir / crafted["artifact"] / "metadata.json").is_file()
    assert set(stored["summary"]) == {"clean", "lsp", "one_pixel"}
    assert all(np.isfinite(s["final_test_acc"]["mean"]) for s in stored["summary"].values())

    config = tiny(written)
    config.trainer = "grid"
    config.data.update(source="npz", path=str(written / "same.npz"))
    grid = trainers.train_and_evaluate(config, tmp_path, progress=False)
    for run in ("clean", "lsp", "one_pixel"):  # the same victims, bit for bit (one device)
        want, got = grid["runs"][run]["history"], results["runs"][run]["history"]
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{run} {k}")
        assert results["runs"][run]["confusion"] == grid["runs"][run]["confusion"]


def test_killed_streamed_run_resumes(written, streamed_run, tmp_path):
    results, workdir = streamed_run
    killed = tmp_path / "killed"
    shutil.copytree(workdir, killed)
    (killed / "results.json").unlink()  # killed during the LSP victim's second epoch:
    steps = sorted((killed / results["runs"]["lsp"]["checkpoint"]).glob("[0-9]*"))
    assert [s.name for s in steps][-1] == "2"
    shutil.rmtree(steps[-1])  # its epoch-1 checkpoint is the last one written
    resumed = trainers.train_and_evaluate(tiny(written), killed, progress=False)
    assert "lsp: resumed from epoch 1" in (killed / "log.txt").read_text()
    for run in ("clean", "lsp", "one_pixel"):
        assert resumed["runs"][run]["history"] == results["runs"][run]["history"]


def _set(path, value):
    def change(config):
        *parents, field = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[field] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (
            _set("poisons", {"em": dict(name="error_minimizing", num_epochs=1, num_steps=1)}),
            r"poisons.em \(error_minimizing\): sample-wise crafting .* needs the training set in ",
        ),
        (_set("include_naive", True), "config.include_naive: the untrained victim"),
        (_set("victim.epochs", 0), "victim.epochs=0: an untrained victim"),
        (_set("data.val_size", 20), "config.data.val_size=20: a stream has no validation split"),
        (_set("stream.craft_subset", -1), r"config.stream.craft_subset=-1: give a whole number"),
    ],
)
def test_refusals_are_one_line_before_any_training(written, tmp_path, change, message):
    config = tiny(written)
    change(config)
    with pytest.raises(ValueError, match=message) as error:
        trainers.train_and_evaluate(config, tmp_path, progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "checkpoints").exists()


def test_poison_kinds():
    shape = dict(num_classes=10, image_shape=(8, 8, 3))
    ball = threat.make(epsilon=8 / 255)
    kinds = {
        name: streamed.poison_kind(
            poisons.make(name, threat=ball, **kwargs, **shape),
            num_examples=40,
            image_shape=(8, 8, 3),
        )
        for name, kwargs in {
            "random": {},
            "cuda": {},
            "lsp": dict(patch_size=2),
            "mislabeling": {},
            "one_pixel": {},
            "error_minimizing": dict(num_epochs=1, num_steps=1),
        }.items()
    }
    assert kinds == {
        "random": streamed.KEY,
        "cuda": streamed.KEY,
        "lsp": streamed.LABELS,
        "mislabeling": streamed.LABELS,
        "one_pixel": streamed.SUBSET,
        "error_minimizing": None,
    }
    partial = poisons.make("random", threat=ball, fraction=0.5, **shape)
    assert streamed.poison_kind(partial, num_examples=40, image_shape=(8, 8, 3)) == streamed.LABELS


def test_num_train_and_num_test_cut_the_stream_splits(written):
    config = tiny(written)
    assert streamed.stream_fields(config)["train_split"] == "train"
    config.data.update(num_train=50, num_test=20)  # as :tiny sets them (200, 100)
    fields = streamed.stream_fields(config)
    assert (fields["train_split"], fields["test_split"]) == ("train[:50]", "test[:20]")
    config.stream.train_split = "train[:10%]"
    with pytest.raises(ValueError, match=r"num_train=50 and config.stream.train_split='train\["):
        streamed.stream_fields(config)
