"""Fault injection: every kind of file a run writes, bit-flipped and truncated, is caught with a
clear message naming it or falls back (an older checkpoint, a rerun), or is shown harmless (what
is read back is exactly what was written); a full disk leaves no temporary file and is one error
line; a run SIGKILLed at random moments resumes to the results of an uninterrupted one (slow).

Everything here is deterministic but the kill moments of the slow test, drawn from a seeded
generator (where in the run each lands depends on the machine's speed)."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import checkpointing, threat, workdir
from jaxpoison.poisons import storage

REPO = Path(__file__).resolve().parents[1]
FAULTS = ("flip", "truncate", "empty", "delete")


def damage(path, fault, at=0.5, bit=0x10):
    """Applies `fault` to the file at `path`: one bit flipped at `at` (a fraction of its bytes,
    or an int: a byte index), the file cut there, emptied, or deleted."""
    data = bytearray(path.read_bytes())
    at = at if isinstance(at, int) else min(int(len(data) * at), len(data) - 1)
    if fault == "flip":
        data[at] ^= bit
        path.write_bytes(bytes(data))
    elif fault == "truncate":
        path.write_bytes(bytes(data[:at]))
    elif fault == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()


def temporaries(root):
    """Temporary files and orbax temp folders under `root` (the workdir lock is none)."""
    return [
        p
        for p in Path(root).rglob("*")
        if "orbax-checkpoint-tmp" in p.name or (p.name.startswith(".") and p.name != ".lock")
    ]


# ----- orbax checkpoints ------------------------------------------------------------------------


def _state(step):
    return {"w": jnp.arange(1000.0) * step, "b": jnp.ones(3) * step}


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Two kept checkpoints (steps 1 and 2) of a small state, with their record."""
    directory = tmp_path_factory.mktemp("ckpt") / "c"
    manager = checkpointing.Manager(directory, record={"what": "test"})
    for step in (1, 2):
        manager.save(step, _state(step), {"loss": [1.0] * step})
    manager.close()
    return directory


def _same(a, b):
    return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in ("w", "b"))


@pytest.mark.parametrize("fault", FAULTS)
def test_each_file_of_a_checkpoint_damaged_falls_back_or_is_harmless(
    checkpoint_dir, tmp_path, fault, capsys
):
    """Every file of the latest step, in turn: restore gives step 2 exactly as saved (the file
    is not read for the numbers, e.g. commit_success.txt: the sha256 check passed) or says the
    damage and gives step 1 exactly as saved; never other numbers, never an exception."""
    files = sorted(p.relative_to(checkpoint_dir) for p in (checkpoint_dir / "2").rglob("*"))
    files = [f for f in files if (checkpoint_dir / f).is_file()]
    template = {"w": jnp.zeros(1000), "b": jnp.zeros(3)}
    fell_back = []
    for rel in files:
        copy = tmp_path / rel.as_posix().replace("/", "_")
        shutil.copytree(checkpoint_dir, copy)
        damage(copy / rel, fault)
        capsys.readouterr()
        state, history, step = checkpointing.Manager(copy, record={"what": "test"}).restore(
            template
        )
        err = capsys.readouterr().err
        assert _same(state, _state(step)) and history == {"loss": [1.0] * step}, rel
        if step == 1:
            assert f"damaged checkpoint in {copy}" in err and "resuming from step 1" in err
            fell_back.append(rel.as_posix())
        else:
            assert step == 2 and "damaged" not in err, (rel, err)
        shutil.rmtree(copy)
    # The arrays' data file and the history and integrity records are always caught.
    assert any(f.startswith("2/state/d/") for f in fell_back), fell_back
    assert {"2/history/metadata", "2/integrity/metadata"} <= set(fell_back), fell_back


@pytest.mark.parametrize("fault", ["flip", "truncate"])
def test_a_damaged_checkpoint_spec_json_is_named(checkpoint_dir, tmp_path, fault):
    copy = tmp_path / "c"
    shutil.copytree(checkpoint_dir, copy)
    spec = copy / "spec.json"
    damage(spec, fault, at=0.3 if fault == "flip" else 0.5, bit=0x02)
    with pytest.raises((workdir.DamagedFileError, workdir.StaleArtifactError)) as info:
        checkpointing.Manager(copy, record={"what": "test"})
    assert str(copy) in str(info.value) and "delete" in str(info.value)


def test_a_full_disk_during_a_checkpoint_leaves_the_kept_ones(tmp_path, monkeypatch):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    manager = checkpointing.Manager(tmp_path / "c", record={"what": "test"})
    manager.save(1, _state(1), {"loss": [1.0]})

    async def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "async_save", disk_full)
    with pytest.raises(OSError, match="No space left on device for checkpoint step 2; free some"):
        manager.save(2, _state(2), {"loss": [1.0, 1.0]})
    assert temporaries(tmp_path) == []
    monkeypatch.undo()
    state, _, step = checkpointing.Manager(tmp_path / "c").restore(_state(0))
    assert step == 1 and _same(state, _state(1))


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KB tmpfs mounted at ``tmp_path/disk`` (skips where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip()[:80]})")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)  # lazy: no open file blocks it


def test_a_really_full_disk_during_a_checkpoint_is_one_oserror(small_disk):
    manager = checkpointing.Manager(small_disk / "c", record={"what": "test"})
    big = {f"w{i}": jnp.arange(3000.0) * i for i in range(20)}  # 240 KB of arrays
    with pytest.raises(OSError, match="No space left on device for checkpoint step 1") as info:
        manager.save(1, big, {"loss": [1.0]})
    assert info.value.errno == errno.ENOSPC
    assert temporaries(small_disk) == []


# ----- poison artifacts -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    directory = tmp_path_factory.mktemp("poison") / "a"
    delta = np.random.default_rng(0).uniform(-0.03, 0.03, (6, 4, 4, 3)).astype(np.float32)
    storage.save(
        directory,
        {"delta": delta},
        name="x",
        spec={"k": 1},
        threat=threat.make(epsilon=8 / 255),
        dataset_name="d",
        fingerprint="f" * 64,
        record={"what": "test"},
    )
    return directory, delta


def _load(directory, delta):
    return storage.load(directory, {"delta": delta}, fingerprint="f" * 64, record={"what": "test"})[
        0
    ]["delta"]


@pytest.mark.parametrize("name", ["state.npz", "metadata.json"])
def test_every_bit_flip_of_a_poison_artifact_is_caught_or_harmless(artifact, tmp_path, name):
    """One bit flipped at every byte of the file in turn: refused naming the file, or (a zip
    timestamp, JSON whitespace) loaded exactly as saved."""
    source, delta = artifact
    size = (source / name).stat().st_size
    caught = 0
    for at in range(size):
        copy = tmp_path / "a"
        shutil.copytree(source, copy)
        data = bytearray((copy / name).read_bytes())
        data[at] ^= 1 << (at % 8)
        (copy / name).write_bytes(bytes(data))
        try:
            loaded = _load(copy, delta)
        except storage.PoisonFileError as e:
            assert name in str(e) and "craft the poison again" in str(e), (at, str(e))
            caught += 1
        else:
            assert np.array_equal(loaded, delta), at
        shutil.rmtree(copy)
    assert caught > 0.9 * size, (caught, size)


@pytest.mark.parametrize("name", ["state.npz", "metadata.json"])
@pytest.mark.parametrize("fault", ["truncate", "empty", "delete"])
def test_a_truncated_or_missing_poison_file_is_refused_naming_it(artifact, tmp_path, name, fault):
    source, delta = artifact
    for at in (0.1, 0.5, 0.9, 0.999) if fault == "truncate" else (0.5,):
        copy = tmp_path / "a"
        shutil.copytree(source, copy)
        damage(copy / name, fault, at=at)
        expected = "metadata.json" if name == "metadata.json" else name
        with pytest.raises(storage.PoisonFileError, match=expected):
            _load(copy, delta)
        shutil.rmtree(copy)


def test_a_full_disk_while_saving_a_poison_leaves_nothing(tmp_path, small_disk):
    state = {"delta": np.random.default_rng(0).uniform(-0.03, 0.03, (64, 32, 32, 3))}
    with pytest.raises(OSError) as info:
        storage.save(
            small_disk / "poison" / "a",
            state,
            name="x",
            spec={},
            threat=threat.make(epsilon=8 / 255),
            dataset_name="d",
            fingerprint="f",
        )
    assert info.value.errno == errno.ENOSPC
    assert list((small_disk / "poison").iterdir()) == []


# ----- results.json, config.json, spec.json -----------------------------------------------------


def _finished(tmp_path):
    config = {"trainer": "grid", "seed": 0}
    workdir.open_run(config, tmp_path)
    results = {**workdir.results_header(config, t_start=time.time()), "summary": {"a": 0.5}}
    workdir.close_run(results, tmp_path)
    return config, results


@pytest.mark.parametrize("fault", ["flip", "truncate", "empty"])
def test_a_damaged_results_json_is_said_and_made_again(tmp_path, fault, capsys):
    config, results = _finished(tmp_path)
    assert workdir.open_run(config, tmp_path)["summary"] == {"a": 0.5}  # intact: nothing to do
    path = tmp_path / "results.json"
    text = path.read_text()
    at = text.index('"a": 0.5') + 7  # the 5 of 0.5: still valid JSON, another number
    damage(path, fault, at=at, bit=0x01)
    if fault == "flip":
        assert json.loads(path.read_text())["summary"]["a"] == 0.4
    capsys.readouterr()
    assert workdir.open_run(config, tmp_path) is None  # runs again
    err = capsys.readouterr().err
    assert f"warning: {path} " in err and "running again to rewrite it" in err
    workdir.close_run(results, tmp_path)
    assert workdir.open_run(config, tmp_path)["summary"] == {"a": 0.5}


def test_a_full_disk_while_writing_results_leaves_the_old_file(tmp_path, monkeypatch):
    config, results = _finished(tmp_path)
    before = (tmp_path / "results.json").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(workdir.json, "dump", disk_full)
    with pytest.raises(OSError, match="No space left"):
        workdir.close_run({**results, "summary": {"a": 0.6}}, tmp_path)
    assert (tmp_path / "results.json").read_bytes() == before
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("fault", ["truncate", "empty"])
def test_a_damaged_config_json_is_named_by_export_and_report(tmp_path, fault, capsys):
    from jaxpoison import export, report

    _finished(tmp_path)
    damage(tmp_path / "config.json", fault)
    assert export.main([str(tmp_path), "poisoned", str(tmp_path / "out.npz")]) == 1
    err = capsys.readouterr().err
    assert f"jaxpoison: error: {tmp_path / 'config.json'} is damaged" in err
    assert "rerun the workdir's command" in err and not (tmp_path / "out.npz").exists()
    with pytest.raises(SystemExit) as info:
        report.main([str(tmp_path)])
    assert info.value.code == 2
    assert f"{tmp_path / 'config.json'} is damaged" in capsys.readouterr().err


def test_a_damaged_config_json_is_rewritten_by_the_next_run(tmp_path):
    config, _ = _finished(tmp_path)
    (tmp_path / "results.json").unlink()
    damage(tmp_path / "config.json", "truncate")
    assert workdir.open_run(config, tmp_path) is None
    assert json.loads((tmp_path / "config.json").read_text()) == config


def test_the_temporaries_of_a_killed_run_are_removed_when_it_runs_again(tmp_path):
    config, _ = _finished(tmp_path)
    (tmp_path / "results.json").unlink()
    left = [
        tmp_path / ".results.json.k2j4v8",  # write_json_atomic
        tmp_path / ".confusion.ro_0d49y.png",  # plots.save_figure (seen in the SIGKILL test)
        tmp_path / "poison" / "run" / ".0123abcd.x1y2z3" / "state.npz",  # storage.save
        tmp_path / "checkpoints" / "c" / "k" / "3.orbax-checkpoint-tmp" / "state" / "d",
    ]
    kept = [tmp_path / "poison" / "run" / "0123abcd" / "state.npz", tmp_path / ".lock"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert len(workdir.stale_temporaries(tmp_path)) == 4
    assert workdir.open_run(config, tmp_path) is None
    assert temporaries(tmp_path) == [] and all(p.is_file() for p in kept)


# ----- a real run: a damaged poison and a full disk on the command line -------------------------

TINY = [
    "--config=configs/quickstart.py:tiny",
    "--config.victim.num_seeds=1",
    "--config.victim.epochs=1",
    "--config.data.num_train=50",
    "--config.data.num_test=20",
]


def test_a_run_whose_poison_cannot_be_saved_is_one_error_line(tmp_path, cli_inprocess, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.np, "savez_compressed", disk_full)
    code, err = cli_inprocess(*TINY, f"--workdir={tmp_path}")
    lines = [line for line in err.splitlines() if line.startswith("jaxpoison: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "No space left on device" in lines[0] and "free space" in lines[0]
    assert temporaries(tmp_path) == [] and not (tmp_path / "results.json").exists()
    assert list((tmp_path / "poison" / "poisoned").iterdir()) == []


def test_a_damaged_poison_in_a_workdir_stops_the_rerun_naming_it(
    tmp_path, cli_inprocess, monkeypatch, capsys
):
    from jaxpoison import poisons

    def interrupt(*args, **kwargs):  # the run stops right after its poison was saved
        raise KeyboardInterrupt

    monkeypatch.setattr(poisons, "apply_all", interrupt)
    code, err = cli_inprocess(*TINY, f"--workdir={tmp_path}")
    assert code == 130 and "interrupted; rerun the same command" in err, err[-3000:]
    monkeypatch.undo()
    from jaxpoison import export

    (tmp_path / "file").write_text("")  # exporting the poison under a file: one line
    capsys.readouterr()
    assert export.main([str(tmp_path), "poisoned", str(tmp_path / "file" / "out.npz")]) == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("jaxpoison: error: cannot write") and "\n" not in line, line
    (artifact,) = (tmp_path / "poison" / "poisoned").glob("*/state.npz")
    damage(artifact, "flip")
    code, err = cli_inprocess(*TINY, f"--workdir={tmp_path}")
    lines = [line for line in err.splitlines() if line.startswith("jaxpoison: error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "state.npz" in lines[0] and "craft the poison again" in lines[0]
    assert temporaries(tmp_path) == [] and not (tmp_path / "results.json").exists()


# ----- SIGKILL at random moments (slow) ---------------------------------------------------------

KILL_TRIALS = 10
KILL_ARGS = [
    "--config=configs/quickstart.py:tiny",
    "--config.victim.num_seeds=1",
    "--config.victim.epochs=4",
    "--config.victim.checkpoint_every=1",
    "--config.data.num_train=50",
    "--config.data.num_test=20",
    "--quiet",
]


def _without_times(results):
    """`results` without its wall times and its own sha256 (which covers them)."""
    if isinstance(results, dict):
        return {
            k: _without_times(v)
            for k, v in results.items()
            if k not in ("wall_time_s", "results_sha256")
        }
    if isinstance(results, list):
        return [_without_times(v) for v in results]
    return results


def _start(workdir_path, env):
    return subprocess.Popen(
        [sys.executable, "-m", "jaxpoison.main", *KILL_ARGS, f"--workdir={workdir_path}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _working(proc, run_dir, timeout=600):
    """Waits until the run has loaded its data (its first log line); False if it ended first."""
    log, deadline = run_dir / "log.txt", time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if log.is_file() and log.stat().st_size:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_same_results(tmp_path):
    """A tiny run (poison crafting, two victims of 4 epochs, a checkpoint each epoch, plots,
    results) killed with SIGKILL at a random moment of its work, until KILL_TRIALS runs were
    killed before their end, each run again to completion: results.json equals, field for field,
    that of an uninterrupted run (wall times and the sha256 that covers them aside), and no
    temporary file is left.

    Compiled programs are cached on disk, so a run takes seconds after its imports; each kill
    comes a delay after the run's first log line (its data loaded), drawn uniformly over that
    span of a warm run (shortened to the quickest seen, as the machine's load changes) from a
    seeded generator."""
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAXPOISON_HUGE_PAGES="0",
        TQDM_DISABLE="1",
    )
    straight = _start(tmp_path / "straight", env)
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    reference = _without_times(json.loads((tmp_path / "straight" / "results.json").read_text()))
    again = _start(tmp_path / "timing", env)  # with the cache warm: the span to kill in
    assert _working(again, tmp_path / "timing")
    t0 = time.time()
    again.communicate(timeout=600)
    span = time.time() - t0
    rng = np.random.default_rng(25)
    killed, trial, stages = 0, 0, []
    while killed < KILL_TRIALS:
        assert trial < 3 * KILL_TRIALS, f"only {killed} of {trial} runs killed before their end"
        run_dir, delay = tmp_path / f"trial{trial}", rng.uniform(0, span)
        proc = _start(run_dir, env)
        assert _working(proc, run_dir), proc.communicate()[1][-3000:]
        t0 = time.time()
        try:
            proc.wait(timeout=delay)
            span = min(span, time.time() - t0)  # ended first: a quicker span for the next
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if not (run_dir / "results.json").exists():
                killed += 1
                stages.append((run_dir / "log.txt").read_text().count("\n"))
        rerun = _start(run_dir, env)
        _, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, (trial, delay, err[-3000:])
        got = _without_times(json.loads((run_dir / "results.json").read_text()))
        assert got == reference, (trial, delay)
        assert temporaries(run_dir) == [], (trial, delay, temporaries(run_dir))
        trial += 1
    # The kills landed at several moments (the killed runs' logs end at different lines).
    assert len(set(stages)) >= 3, stages
