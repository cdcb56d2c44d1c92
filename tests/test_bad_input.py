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
        ("num_seeds", 0, r"victim.num_seeds=0: give a whole number >= 1"),
        ("eval_batch_size", 0, r"eval_batch_size=0"),
        ("epochs", -1, r"epochs=-1: give a whole number >= 0"),
        ("batch_size", 0, r"batch_size=0: give a whole number >= 1"),
        ("checkpoint_every", -1, r"checkpoint_every=-1"),
        # One CPU device here: 2 groups of devices cannot be made (nor split 1 seed).
        ("seed_devices", 2, r"victim.seed_devices=2: give a divisor of both the 1 devices"),
        ("seed_devices", 0, r"victim.seed_devices=0: give a divisor"),
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


def test_cli_errors_are_one_line(tmp_path, cli):
    """In a new interpreter (the command as a user runs it); the cases below run in this one."""
    proc = cli(
        "--config=configs/quickstart.py:tiny",
        "--config.victim.num_seeds=0",
        f"--workdir={tmp_path / 'w'}",
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxpoison: error:")]
    assert len(lines) == 1 and "num_seeds" in lines[0], proc.stderr[-2000:]
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


# ----- the command line, in this process (`cli_inprocess`): every case fails before any work ----

TINY = "--config=configs/quickstart.py:tiny"


def temporaries(workdir):
    """Temporary files and orbax temp folders under `workdir` (the lock is no temporary)."""
    paths = Path(workdir).rglob("*") if Path(workdir).is_dir() else []
    return [
        p
        for p in paths
        if "orbax-checkpoint-tmp" in p.name or (p.name.startswith(".") and p.name != ".lock")
    ]


def assert_nothing_half_written(workdir):
    """No results, no poison or checkpoint, no temporary file or folder: a refusal before work."""
    workdir = Path(workdir)
    assert not (workdir / "results.json").exists()
    assert not (workdir / "poison").exists() and not (workdir / "checkpoints").exists()
    assert temporaries(workdir) == []


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("jaxpoison: error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


# (the arguments but --workdir; the exit code; words of the one error line). Each names the problem
# (the field and its value) and the fix.
CLI_CASES = [
    # flags and the config argument
    ([TINY, "--config.victim.epochs=abc"], 2, "config.victim.epochs=abc: invalid literal for int"),
    ([TINY, "--config.victim.epochs=1.5"], 2, "config.victim.epochs=1.5"),
    ([TINY, "--config.seed=abc"], 2, "config.seed=abc"),
    ([TINY, "--config.victim.nope=3"], 2, "must name a key that exists in the config file"),
    ([TINY, "--config.nope=3"], 2, "must name a key that exists"),
    ([TINY, "--debugg"], 2, "Unknown command line flag debugg. Did you mean: debug"),
    ([TINY, "stray"], 2, "unexpected arguments ['stray']; give flags only"),
    (["--config=configs/quickstart.py:tiny,tiny"], 2, "Unknown config argument 'tiny,tiny'"),
    (["--config=configs/quickstart.py:tinyy"], 2, "Unknown config argument 'tinyy'"),
    (["--config=configs/nope.py"], 2, "cannot load the config"),
    (["--config=README.md"], 2, "README.md is not a Python config file"),
    (["--config=configs"], 2, "Is a directory"),
    ([TINY, "--config.trainer=nosuch"], 1, "config.trainer='nosuch' is unknown; use one of"),
    # the victim
    ([TINY, "--config.victim.num_seeds=0"], 1, "victim.num_seeds=0: give a whole number >= 1"),
    ([TINY, "--config.victim.eval_batch_size=0"], 1, "eval_batch_size=0: give a whole number >= 1"),
    ([TINY, "--config.victim.epochs=-1"], 1, "config.victim.epochs=-1: give a whole number >= 0"),
    ([TINY, "--config.victim.batch_size=-3"], 1, "batch_size=-3: give a whole number >= 1"),
    ([TINY, "--config.victim.batch_size=0"], 1, "batch_size=0: give a whole number >= 1"),
    ([TINY, "--config.victim.checkpoint_every=-1"], 1, "checkpoint_every=-1: give a whole number"),
    ([TINY, "--config.victim.model.width=0"], 1, "model.width=0.0: give a positive number"),
    ([TINY, "--config.victim.model.width=-0.5"], 1, "model.width=-0.5: give a positive number"),
    ([TINY, "--config.victim.model.name=resnet99"], 1, "unknown model 'resnet99'; use 'auto' or"),
    ([TINY, "--config.victim.optimizer.learning_rate=-1"], 1, "learning_rate=-1.0: give a posit"),
    ([TINY, "--config.victim.optimizer.learning_rate=0"], 1, "learning_rate=0.0: give a positive"),
    ([TINY, "--config.victim.optimizer.learning_rate=inf"], 1, "learning_rate=inf: give a posit"),
    ([TINY, "--config.victim.optimizer.weight_decay=-1"], 1, "weight_decay=-1.0: give a number"),
    ([TINY, "--config.victim.optimizer.momentum=2"], 1, "momentum=2.0: give a number in [0, 1)"),
    ([TINY, "--config.victim.optimizer.name=sgdd"], 1, "Unknown optimizer 'sgdd'; use sgd or adam"),
    ([TINY, "--config.victim.optimizer.schedule=x"], 1, "Unknown schedule 'x'; use constant"),
    ([TINY, "--config.victim.optimizer.warmup_epochs=-1"], 1, "warmup_epochs=-1.0 must be >= 0"),
    ([TINY, "--config.victim.optimizer.warmup_epochs=5"], 1, "shorter than training (2 epochs)"),
    ([TINY, "--config.victim.seed_strategy=x"], 1, "seed_strategy='x': use 'auto', 'vmap' or"),
    # the data
    ([TINY, "--config.data.name=cifar11"], 1, "The embedded source has only 'cifar10'"),
    ([TINY, "--config.data.source=npzz"], 1, "Unknown data.source 'npzz'; use one of"),
    ([TINY, "--config.data.source=npz", "--config.data.data_dir={tmp}"], 1, "No cifar10.npz found"),
    ([TINY, "--config.data.source=tfds", "--config.data.name=x"], 1, "tfds dataset 'x' is not"),
    ([TINY, "--config.data.num_train=-5"], 1, "data.num_train=-5: give a whole number >= 0"),
    ([TINY, "--config.data.num_train=5000"], 1, "num_train=5000 but cifar10 has 2500; use at most"),
    ([TINY, "--config.data.num_test=-1"], 1, "data.num_test=-1: give a whole number >= 0"),
    ([TINY, "--config.data.num_test=1001"], 1, "num_test=1001 but cifar10 has 1000"),
    ([TINY, "--config.data.val_size=200"], 1, "val_size=200 leaves no training example of the 200"),
    ([TINY, "--config.data.val_size=-1"], 1, "data.val_size=-1: give a whole number >= 0"),
    ([TINY, "--config.data.crop_padding=-1"], 1, "crop_padding=-1: give a whole number of pixels"),
    # the threat model and the poisons
    ([TINY, "--config.threat.epsilon=-0.1"], 1, "epsilon=-0.1 is invalid: it must be a finite"),
    ([TINY, "--config.threat.epsilon=nan"], 1, "epsilon=nan is invalid: it must be a finite"),
    ([TINY, "--config.threat.norm=l3"], 1, "Unknown norm 'l3': use one of"),
    ([TINY, "--config.poisons.poisoned.num_patches=0"], 1, "num_patches=0 must be a power of two"),
    ([TINY, "--config.poisons.poisoned.num_patches=3"], 1, "num_patches=3 must be a power of two"),
    ([TINY, "--config.poisons.poisoned.name=x"], 1, "poisons.poisoned.name='x' is unknown; use"),
    ([TINY, "--config.select.poisons=('x',)"], 1, "['x'] not among config.poisons (['poisoned'])"),
    ([TINY, "--config.objectives.erm.name=x"], 1, "unknown objective 'x'; use one of"),
    ([TINY, "--config.loss_threshold=-1"], 1, "loss_threshold=-1.0: give a positive training loss"),
    ([TINY, "--config.loss_threshold=0"], 1, "loss_threshold=0.0: give a positive training loss"),
]


@pytest.mark.parametrize(
    "args,code,match", CLI_CASES, ids=[" ".join(a[1:]) or a[0] for a, _, _ in CLI_CASES]
)
def test_a_bad_command_line_is_one_error_line(tmp_path, cli_inprocess, args, code, match):
    workdir = tmp_path / "w"
    args = [a.format(tmp=tmp_path) for a in args]
    got, err = cli_inprocess(*args, f"--workdir={workdir}")
    assert got == code, err[-3000:]
    assert match in one_error_line(err), err[-3000:]
    assert_nothing_half_written(workdir)


@pytest.mark.parametrize(
    "kind,code,match",
    [
        ("empty", 2, "--workdir is empty; name a directory"),
        ("missing", 2, "--workdir must have a value other than None"),
        ("a file", 1, "file is a file, not a directory; name a directory"),
        ("under a file", 1, "file is a file, not a directory; name a directory whose parents"),
        ("read-only", 1, "(permission denied: "),
    ],
)
def test_a_workdir_that_cannot_be_used_is_one_error_line(
    tmp_path, cli_inprocess, monkeypatch, kind, code, match
):
    (tmp_path / "file").write_text("")
    flag = {
        "empty": ["--workdir="],
        "missing": [],
        "a file": [f"--workdir={tmp_path / 'file'}"],
        "under a file": [f"--workdir={tmp_path / 'file' / 'w'}"],
        "read-only": [f"--workdir={tmp_path / 'ro'}"],
    }[kind]
    if kind == "read-only":  # root writes anywhere: the refusal is made where the lock is
        real_open = os.open

        def read_only(path, *args, **kwargs):
            if str(path).endswith(".lock"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(workdir.os, "open", read_only)
    got, err = cli_inprocess(TINY, *flag)
    assert got == code and match in one_error_line(err), err[-3000:]
    if kind == "read-only":
        assert "name a directory you can write to" in err
    assert (tmp_path / "file").read_text() == "" and temporaries(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in (["file"], ["file", "ro"])


def _npz_cases():
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    y = np.arange(20) % 10
    four = dict(x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    return [
        ("cifar10", dict(four, y_train=np.r_[y[:19], 99]), "label 99 is outside 0..9"),
        ("toy", dict(four, y_train=np.r_[y[:19], 99]), "have no training example"),
        ("toy", dict(four, y_train=np.r_[y[:19], 3.5]), "labels must be whole numbers"),
        ("toy", dict(four, y_train=np.r_[y[:19], -1]), "labels must be >= 0"),
        ("toy", dict(four, y_train=y[:15]), "labels of shape (15,) do not match 20 images"),
        ("toy", dict(four, x_test=x[:10, ..., :1]), "both splits must have one image shape"),
        ("toy", dict(four, x_train=x[:0], y_train=y[:0]), "the training split is empty"),
        ("toy", dict(four, x_train=x / 255.0), "images must be uint8 in 0..255, got float64"),
        ("toy", dict(four, x_train=x.transpose(0, 3, 1, 2)), "look channel-first (NCHW)"),
        ("toy", dict(four, x_train=x[:, :, :, 0, None][..., 0, 0]), "must be NHWC (4-d)"),
        ("toy", {k: v for k, v in four.items() if k != "y_test"}, "lacks the keys ['y_test']"),
        ("toy", None, "not a readable .npz archive"),
    ]


@pytest.mark.parametrize("name,arrays,match", _npz_cases())
def test_a_bad_dataset_file_on_the_command_line_is_one_error_line(
    tmp_path, cli_inprocess, name, arrays, match
):
    if arrays is None:
        (tmp_path / f"{name}.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    else:
        np.savez(tmp_path / f"{name}.npz", **arrays)
    before = sorted(tmp_path.iterdir())
    data_flags = ["--config.data.source=npz", f"--config.data.name={name}"]
    got, err = cli_inprocess(
        TINY, *data_flags, f"--config.data.data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}"
    )
    assert got == 1 and match in one_error_line(err), err[-3000:]
    assert f"{name}" in one_error_line(err)
    assert_nothing_half_written(tmp_path / "w")
    assert sorted(p for p in tmp_path.iterdir() if p.name != "w") == before  # the file untouched


# ----- the library's public functions -----------------------------------------------------------


def _regions():
    from jaxpoison import poisons, threat

    ball = threat.make(epsilon=8 / 255)
    return poisons.make("regions", threat=ball, num_classes=10, image_shape=(8, 8, 3))


_X = np.random.default_rng(0).random((20, 8, 8, 3)).astype(np.float32)
_Y = np.arange(20) % 10


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (_X * 255.0, _Y, r"images as floats must lie in \[0, 1\], got max 25\d.*divide by 255"),
        (_X, _Y[:15], r"labels of shape \(15,\) do not match 20 images"),
        (_X[..., 0], _Y, r"must be NHWC \(4-d\)"),
        (_X.transpose(0, 3, 1, 2), _Y, r"look channel-first \(NCHW\)"),
        (np.where(_X > 0.5, np.nan, _X), _Y, r"images hold NaN or inf pixels; fix or drop"),
        (_X, np.r_[_Y[:19], 12], r"label 12 is outside 0..9 \(the poison was made for num_cl"),
        (_X, np.r_[_Y[:19], -1], r"label -1 is outside 0..9"),
        (_X, np.r_[_Y[:19], 0.5], r"labels must be whole numbers"),
    ],
    ids=[
        "0..255 floats",
        "150 labels for 200 images",
        "3-d",
        "NCHW",
        "NaN",
        "label 12 of 10",
        "label -1",
        "label 0.5",
    ],
)
def test_bad_arrays_given_to_a_poison_are_refused_with_the_fix(images, labels, match):
    import jax

    from jaxpoison import poisons

    with pytest.raises(data.DataError, match=match):
        poisons.craft(_regions(), images, labels, key=jax.random.key(0))


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(epsilon=2.0), r"epsilon=2.0 > 1 for the linf ball.*8/255"),
        (dict(epsilon="jnp 2.0"), r"epsilon=2.0 > 1 for the linf ball"),
        (dict(epsilon=-1), r"epsilon=-1.0 is invalid: it must be a finite number >= 0"),
        (dict(epsilon=float("nan")), r"epsilon=nan is invalid"),
        (dict(epsilon=None), r"needs a radius: give epsilon="),
        (dict(norm="l1", epsilon=0.1), r"Unknown norm 'l1': use one of"),
        (dict(epsilon="0.1"), r"epsilon='0.1' is not a number"),
        (dict(epsilon=0.1, mask=np.zeros((8, 8, 3))), r"mask is all zeros, so no pixel may move"),
    ],
)
def test_a_bad_threat_ball_is_refused_with_the_fix(fields, match):
    import jax.numpy as jnp

    from jaxpoison import threat

    if fields.get("epsilon") == "jnp 2.0":
        fields = dict(fields, epsilon=jnp.asarray(2.0))
    with pytest.raises(ValueError, match=match):
        threat.make(**fields)


def test_a_dataset_built_with_a_label_out_of_range_is_refused():
    x = (_X * 255).astype(np.uint8)
    with pytest.raises(data.DataError, match=r"label 12 is outside 0..9 \(10 classes\)"):
        data.Dataset("d", x, np.r_[_Y[:19], 12].astype(np.int32), x, _Y, num_classes=10)
