"""Bad input, tried as a new user would: each case is one clear error naming the problem and the
fix, raised before any work, and nothing is left half-written."""

import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from jaxpoison import data, specs, trainers, workdir

REPO = Path(__file__).resolve().parents[1]


def write_npz(path, *, y_train=None, x_test=None, x_train=None):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8) if x_train is None else x_train
    y = np.arange(20) % 10 if y_train is None else y_train
    np.savez(path, x_train=x, y_train=y, x_test=x[:10] if x_test is None else x_test, y_test=y[:10])
    return path


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("cifar10", dict(y_train=np.r_[np.arange(19) % 10, 99]), r"label 99 is outside 0..9"),
        ("toy", dict(y_train=np.r_[np.arange(19) % 10, 99]), r"have no training example"),
        ("toy", dict(y_train=np.r_[np.arange(19) % 10, 3.5]), r"whole numbers, got e.g. 3.5"),
        ("toy", dict(x_test=np.zeros((10, 8, 8, 1), np.uint8)), r"one image shape"),
        ("toy", dict(x_train=np.zeros((0, 8, 8, 3), np.uint8), y_train=np.zeros(0)), "empty"),
    ],
)
def test_a_malformed_dataset_file_is_refused(tmp_path, name, kwargs, match):
    path = write_npz(tmp_path / f"{name}.npz", **kwargs)
    with pytest.raises(data.DataError, match=match):
        data.load(source="npz", name=name, data_dir=str(tmp_path))
    assert path.is_file()


def test_a_file_that_is_not_an_npz_archive_is_refused(tmp_path):
    (tmp_path / "cifar10.npz").write_text("hello")
    with pytest.raises(data.DataError, match="not a readable .npz archive"):
        data.load(source="npz", name="cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(num_train=-5), r"num_train=-5: give a whole number >= 0"),
        (dict(num_train=5000), r"num_train=5000 but cifar10 has 2500"),
        (dict(num_test=1.5), r"num_test=1.5"),
    ],
)
def test_subset_sizes_out_of_range_are_refused(fields, match):
    with pytest.raises(data.DataError, match=match):
        data.load(source="embedded", name="cifar10", **fields)


def test_a_validation_split_as_large_as_the_training_set_is_refused():
    with pytest.raises(data.DataError, match=r"val_size=100 must be a whole number in \[0, 100\)"):
        data.split_validation(np.arange(100) % 10, 100, 10)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("num_seeds", 0, r"config.victim.num_seeds=0: give a whole number >= 1"),
        ("eval_batch_size", 0, r"eval_batch_size=0"),
        ("epochs", -1, r"epochs=-1: give a whole number >= 0"),
        ("batch_size", 0, r"batch_size=0: give a whole number >= 1"),
        ("checkpoint_every", -1, r"checkpoint_every=-1"),
    ],
)
def test_victim_sizes_out_of_range_are_refused(field, value, match):
    config = ml_collections.ConfigDict(
        dict(
            victim=dict(
                model=dict(name="mlp", width=0.5),
                epochs=1,
                batch_size=8,
                num_seeds=1,
                optimizer=dict(learning_rate=0.1),
            )
        )
    )
    config.victim[field] = value
    with pytest.raises(ValueError, match=match):
        specs.victim(config, image_shape=(8, 8, 3), num_classes=10)
    config.victim[field] = 1
    config.victim.model.width = 0.0
    with pytest.raises(ValueError, match=r"model.width=0.0: give a positive number"):
        specs.victim(config, image_shape=(8, 8, 3), num_classes=10)


def test_a_bad_victim_spec_stops_a_run_before_any_work(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.victim.num_seeds = 0
    with pytest.raises(ValueError, match="num_seeds=0"):
        trainers.train_and_evaluate(config, tmp_path, progress=False)
    assert not (tmp_path / "poison").exists() and not (tmp_path / "results.json").exists()


def test_a_second_process_on_a_workdir_is_refused_naming_the_first(tmp_path, cli):
    with workdir.locked(tmp_path):
        proc = cli("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path}")
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"in use by process {os.getpid()}" in proc.stderr
        assert "Traceback" not in proc.stderr
    with workdir.locked(tmp_path):  # released when its holder lets go (or dies)
        pass


@pytest.mark.parametrize(
    "args,code,match",
    [
        (["--config=configs/nope.py"], 2, "cannot load the config"),
        (["--config=configs/quickstart.py:tinyy"], 2, "Unknown config argument 'tinyy'"),
        (["--config=configs/quickstart.py:tiny", "--config.victim.num_seeds=0"], 1, "num_seeds"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, code, match, cli):
    proc = cli(*args, f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxpoison: error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_cli_workdir_under_a_file_is_one_line(tmp_path, cli):
    (tmp_path / "file").write_text("")
    proc = cli("--config=configs/quickstart.py:tiny", f"--workdir={tmp_path / 'file' / 'w'}")
    assert proc.returncode == 1
    assert "jaxpoison: error: cannot read or write a file (Not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def _largest_data_file(step_dir):
    return max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
        key=lambda p: p.stat().st_size,
    )


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    import jax.numpy as jnp

    from jaxpoison import checkpointing

    manager = checkpointing.Manager(tmp_path)
    for step in (1, 2):
        manager.save(step, {"w": jnp.arange(1000.0) * step}, {"loss": [1.0] * step})
    manager.close()
    template = {"w": jnp.zeros(1000)}
    latest = _largest_data_file(tmp_path / "2")
    flipped = bytearray(latest.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10  # one bit: the file still decodes, to other numbers
    latest.write_bytes(bytes(flipped))
    state, history, step = checkpointing.Manager(tmp_path).restore(template)
    assert step == 1 and float(state["w"][3]) == 3.0 and history == {"loss": [1.0]}
    assert "damaged checkpoint" in capsys.readouterr().err
    oldest = _largest_data_file(tmp_path / "1")
    oldest.write_bytes(oldest.read_bytes()[:50])  # truncated
    with pytest.raises(checkpointing.CorruptCheckpointError, match="no intact checkpoint"):
        checkpointing.Manager(tmp_path).restore(template)


def test_a_damaged_poison_artifact_is_refused_naming_the_file(tmp_path):
    from jaxpoison import threat
    from jaxpoison.poisons import storage

    state = {"delta": np.full((4, 2, 2, 1), 0.01, np.float32)}
    kw = dict(name="x", spec={}, threat=threat.make(epsilon=8 / 255), dataset_name="d")
    storage.save(tmp_path / "a", state, fingerprint="f", **kw)
    with np.load(tmp_path / "a" / "state.npz") as f:
        stored = dict(f)
    np.savez(tmp_path / "a" / "state.npz", **{k: -v for k, v in stored.items()})  # edited
    with pytest.raises(storage.PoisonFileError, match="does not match the sha256"):
        storage.load(tmp_path / "a", state)
    (tmp_path / "a" / "state.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(storage.PoisonFileError, match="state.npz is damaged"):
        storage.load(tmp_path / "a", state)
    meta = tmp_path / "a" / "metadata.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(storage.PoisonFileError, match="metadata.json is damaged"):
        storage.load(tmp_path / "a", state)


def test_a_mask_that_does_not_fit_the_images_is_refused_before_crafting():
    config = ml_collections.ConfigDict(
        dict(threat=dict(epsilon=8 / 255, mask=np.ones((4, 4, 1)).tolist()), poisons={})
    )
    with pytest.raises(ValueError, match=r"mask of shape \(4, 4, 1\) does not fit \(8, 8, 3\)"):
        specs.check(config, image_shape=(8, 8, 3), num_classes=10, victims=False)
    config.threat.mask = np.ones((8, 8, 1)).tolist()
    specs.check(config, image_shape=(8, 8, 3), num_classes=10, victims=False)


def test_an_interrupted_run_says_how_to_resume(tmp_path):
    import signal
    import time

    # A shell's background jobs (and so maybe this test) ignore SIGINT, which exec keeps: the
    # wrapper restores the default first, as an interactive terminal has it.
    wrapper = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable, '-m', 'jaxpoison.main', *sys.argv[1:]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", wrapper, "--config=configs/quickstart.py:tiny"]
        + [f"--workdir={tmp_path}", "--quiet"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log = tmp_path / "log.txt"
    deadline = time.time() + 300
    while not (log.is_file() and "crafted" in log.read_text()) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted; rerun the same command to resume" in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_a_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    from jaxpoison import threat
    from jaxpoison.poisons import storage

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.np, "savez_compressed", disk_full)
    kw = dict(name="x", spec={}, threat=threat.make(epsilon=8 / 255), dataset_name="d")
    with pytest.raises(OSError, match="No space left"):
        storage.save(tmp_path / "a", {"delta": np.zeros((2, 2, 2, 1))}, fingerprint="f", **kw)
    with pytest.raises(OSError, match="No space left"):
        storage.export_npz(tmp_path / "out.npz", *(np.zeros((2, 2, 2, 1), np.uint8), [0, 1]) * 2)
    with pytest.raises(TypeError):
        workdir.write_json_atomic(tmp_path / "r.json", {"f": object()})
    assert list(tmp_path.iterdir()) == []
