"""Content keys and specs: an artifact is reused only for exactly what made it, a model that
cannot take the data is refused before any work, 'auto' picks a model for the data."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from jaxpoison import checkpointing, specs, training, workdir
from jaxpoison.poisons import storage


def test_content_key_is_canonical_and_sensitive():
    record = {"spec": {"lr": 0.1, "sizes": (1, 2)}, "key": jax.random.key(3)}
    same = {"key": jax.random.key(3), "spec": {"sizes": [1, 2], "lr": 0.1}}
    assert workdir.content_key(record) == workdir.content_key(same)
    assert workdir.content_key(record) != workdir.content_key(dict(record, key=jax.random.key(4)))
    assert workdir.content_key(record) != workdir.content_key(
        {"spec": {"lr": 0.1000001, "sizes": (1, 2)}, "key": jax.random.key(3)}
    )
    with pytest.raises(TypeError, match="cannot be part of an artifact record"):
        workdir.content_key({"fn": len})


def test_array_digest_sees_values_dtypes_and_shapes():
    a = np.zeros((2, 3), np.float32)
    assert workdir.array_digest(a) == workdir.array_digest(a.copy())
    assert workdir.array_digest(a) != workdir.array_digest(a.astype(np.float64))
    assert workdir.array_digest(a) != workdir.array_digest(a.reshape(3, 2))
    b = a.copy()
    b[1, 2] = 1e-7
    assert workdir.array_digest(a) != workdir.array_digest(b)
    assert workdir.array_digest(a, None) != workdir.array_digest(a)


def test_claim_refuses_another_record_naming_the_fields(tmp_path):
    d = tmp_path / "ckpt"
    record = {"trainer": {"optimizer": {"learning_rate": 0.1}, "epochs": 3}, "data": "abc"}
    workdir.claim(d, record)
    assert json.loads((d / "spec.json").read_text()) == record
    workdir.claim(d, record)  # the same record: accepted
    other = {"trainer": {"optimizer": {"learning_rate": 0.01}, "epochs": 3}, "data": "abc"}
    with pytest.raises(workdir.StaleArtifactError, match=r"trainer\.optimizer\.learning_rate"):
        workdir.claim(d, other)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "1").mkdir()
    with pytest.raises(workdir.StaleArtifactError, match="unknown origin"):
        workdir.claim(legacy, record)
    with pytest.raises(workdir.StaleArtifactError):
        checkpointing.Manager(d, record=other)


def _on_two_processes(monkeypatch, work):
    """Runs ``work(index)`` as processes 0 (the writer) and 1 of a run, on two threads with
    `distributed`'s writer test, barrier and broadcast of the writer's message patched; returns
    the barrier names each passed and the errors raised (an error releases the other thread's
    barrier, a second later: it may be leaving the last barrier still)."""
    import threading

    from jaxpoison import distributed

    process, names, errors, said = threading.local(), {0: [], 1: []}, [], {}
    barrier = threading.Barrier(2, timeout=30)

    def wait(name):
        names[process.index].append(name)
        barrier.wait()

    def said_by_writer(name, message):
        if process.index == 0:
            said[name] = message
        wait(name)
        return said[name]

    monkeypatch.setattr(distributed, "is_writer", lambda: process.index == 0)
    monkeypatch.setattr(distributed, "barrier", wait)
    monkeypatch.setattr(distributed, "_said_by_writer", said_by_writer)

    def run(index):
        process.index = index
        try:
            work(index)
        except Exception as e:  # noqa: BLE001 (returned to the test)
            errors.append(f"process {index}: {type(e).__name__ if not str(e) else e}")
            if first_error.acquire(blocking=False):
                release.start()

    release, first_error = threading.Timer(1.0, barrier.abort), threading.Lock()
    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    release.cancel()
    return names, errors


def test_claim_on_two_processes_never_sees_the_writers_half_made_spec(tmp_path, monkeypatch):
    """Two processes claim one directory: the other process looks while the writer's
    ``spec.json`` is half-made (its temporary file written slowly). It must not take that file
    for state of unknown origin, which left the two processes apart."""
    import time

    dump = json.dump
    monkeypatch.setattr(json, "dump", lambda *a, **k: (time.sleep(1.0), dump(*a, **k)))
    d, record = tmp_path / "ckpt", {"epochs": 3}

    def claim(index):
        if index == 1:  # looks once the writer's temporary file is there (or after 0.5 s)
            deadline = time.time() + 0.5
            while time.time() < deadline and not (d.is_dir() and any(d.iterdir())):
                time.sleep(0.01)
        workdir.claim(d, record)

    _, errors = _on_two_processes(monkeypatch, claim)
    assert errors == []
    assert json.loads((d / "spec.json").read_text()) == record


def test_claim_names_its_barriers_alike_on_processes_that_see_other_paths(tmp_path, monkeypatch):
    """The processes of a run may see the shared workdir under other absolute paths (a relative
    --workdir, another mount point): claim's barrier names must still agree, as
    ``sync_global_devices`` asserts equal names on every process."""
    (tmp_path / "mount").symlink_to(tmp_path, target_is_directory=True)
    paths = (tmp_path / "ckpt", tmp_path / "mount" / "ckpt")
    names, errors = _on_two_processes(
        monkeypatch, lambda index: workdir.claim(paths[index], {"epochs": 3})
    )
    assert errors == []
    assert len(names[0]) == 2 and names[0] == names[1], names


def test_poison_save_on_two_processes_returns_once_the_artifact_is_there(tmp_path, monkeypatch):
    """Every process calls `storage.save` and may `load` the artifact right after (the streamed
    trainer reads a crafted poison back): the other process must find it written, however
    slowly the writer writes."""
    import time

    from jaxpoison import threat

    savez = np.savez_compressed
    monkeypatch.setattr(np, "savez_compressed", lambda *a, **k: (time.sleep(1.0), savez(*a, **k)))
    state = {"delta": np.full((4, 2, 2, 1), 0.01, np.float32)}
    kw = dict(name="regions", spec={}, threat=threat.make(epsilon=8 / 255), dataset_name="d")

    def save_and_load(index):
        storage.save(tmp_path / "a", state, fingerprint="f", **kw)
        loaded, _ = storage.load(tmp_path / "a", state, fingerprint="f")
        np.testing.assert_array_equal(loaded["delta"], state["delta"])

    _, errors = _on_two_processes(monkeypatch, save_and_load)
    assert errors == []


def test_a_failed_write_fails_every_process_at_once(tmp_path, monkeypatch):
    """The writer cannot write a spec or a poison artifact (a full disk): it raises its error,
    and the other process, waiting for what it will read, raises one naming that error, where it
    would have waited for jax's shutdown timeout. Nothing half-written is left."""
    import time

    from jaxpoison import distributed, threat

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    monkeypatch.setattr(np, "savez_compressed", full)
    state = {"delta": np.full((4, 2, 2, 1), 0.01, np.float32)}
    kw = dict(name="regions", spec={}, threat=threat.make(epsilon=8 / 255), dataset_name="d")
    for write in (
        lambda: workdir.claim(tmp_path / "ckpt", {"epochs": 3}),
        lambda: storage.save(tmp_path / "a", state, fingerprint="f", **kw),
    ):
        start = time.time()
        _, errors = _on_two_processes(monkeypatch, lambda index, write=write: write())
        assert time.time() - start < 10
        first, second = sorted(errors)
        assert first == "process 0: [Errno 28] No space left on device", errors
        assert second.startswith("process 1: the writing process failed at '"), errors
        assert second.endswith("': OSError: [Errno 28] No space left on device"), errors
        assert "\n" not in first + second
    assert not (tmp_path / "ckpt" / "spec.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no artifact, no temporary
    assert list((tmp_path / "ckpt").iterdir()) == []
    assert issubclass(distributed.WriterFailed, RuntimeError)


def test_a_run_whose_writer_cannot_open_the_workdir_fails_every_process(tmp_path, monkeypatch):
    """`open_run`: the writer cannot write ``config.json`` (a full disk, a read-only workdir):
    every process stops with its error, as README says, instead of the others waiting at the
    barrier after it for jax's shutdown timeout."""
    import time

    from jaxpoison.progress import set_log_file

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", full)
    start = time.time()
    try:
        _, errors = _on_two_processes(
            monkeypatch, lambda index: workdir.open_run({"seed": 0}, tmp_path / "run")
        )
    finally:
        set_log_file(None)
    assert time.time() - start < 10
    first, second = sorted(errors)
    assert first == "process 0: [Errno 28] No space left on device", errors
    assert second.startswith("process 1: the writing process failed at 'open_run'"), errors


def test_the_writers_message_reaches_the_others_whatever_its_characters(monkeypatch):
    """The writer's message is encoded before the collectives, in the writer only: a message
    UTF-8 cannot encode (a lone surrogate, as in a path of undecodable bytes) must still be
    sent, not raise there and leave the other processes at the barrier."""
    from jax.experimental import multihost_utils

    from jaxpoison import distributed

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda name: None)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda tree: tree)
    said = distributed._said_by_writer("n", "ValueError: /data/w\udcffd is not writable")
    assert said.startswith("ValueError: /data/w") and said.endswith("d is not writable")
    assert distributed._said_by_writer("n", "é" * 600).startswith("é" * 511)  # cut at 1024 bytes


def test_poison_artifact_loads_only_for_its_record(tmp_path):
    from jaxpoison import threat

    state = {"delta": np.full((4, 2, 2, 1), 0.01, np.float32)}
    record = {"kind": "poison", "kwargs": {"num_patches": 4}}
    kw = dict(name="regions", spec={}, threat=threat.make(epsilon=8 / 255), dataset_name="d")
    storage.save(tmp_path / "a", state, fingerprint="f", record=record, **kw)
    loaded, meta = storage.load(tmp_path / "a", state, fingerprint="f", record=record)
    np.testing.assert_array_equal(loaded["delta"], state["delta"])
    assert meta["key"] == workdir.content_key(record)
    changed = {"kind": "poison", "kwargs": {"num_patches": 16}}
    with pytest.raises(storage.PoisonFileError, match=r"kwargs\.num_patches"):
        storage.load(tmp_path / "a", state, fingerprint="f", record=changed)


def test_trainer_checkpoints_are_keyed_by_spec_data_and_key(tmp_path):
    config = ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.05),
            epochs=1,
            batch_size=8,
            num_seeds=1,
            checkpoint_every=1,
            optimizer=dict(learning_rate=0.1),
        )
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    y = rng.integers(0, 3, 16)
    td = training.TrainData.create(x, y, x[:8], y[:8])
    trainer = training.Trainer.from_config(config, num_classes=3, image_shape=(4, 4, 1))
    key = jax.random.key(0)
    where = trainer.checkpoint_dir(tmp_path, td, key=key, num_seeds=1)
    trainer.fit(td, key=key, ckpt_dir=tmp_path, progress=False)
    assert (where / "spec.json").is_file() and where.parent == tmp_path
    # Anything that changes the victims changes the directory; bookkeeping fields do not.
    config.checkpoint_every = 5
    same = training.Trainer.from_config(config, num_classes=3, image_shape=(4, 4, 1))
    assert same.checkpoint_dir(tmp_path, td, key=key, num_seeds=1) == where
    config.optimizer.learning_rate = 0.01
    other = training.Trainer.from_config(config, num_classes=3, image_shape=(4, 4, 1))
    assert other.checkpoint_dir(tmp_path, td, key=key, num_seeds=1) != where
    poisoned = training.TrainData.create(x ^ 1, y, x[:8], y[:8])
    assert trainer.checkpoint_dir(tmp_path, poisoned, key=key, num_seeds=1) != where
    assert trainer.checkpoint_dir(tmp_path, td, key=jax.random.key(1), num_seeds=1) != where
    hand_built = training.Trainer(
        module=trainer.module,
        objective=trainer.objective,
        image_shape=(4, 4, 1),
        epochs=1,
        batch_size=8,
        optimizer_kwargs={"learning_rate": 0.1},
    )
    with pytest.raises(ValueError, match="no spec"):
        hand_built.fit(td, key=key, ckpt_dir=tmp_path / "h", progress=False)


def test_fields_added_to_a_model_keep_the_earlier_checkpoint_keys():
    """cnn_mnist's normalization and pool came after checkpoints were keyed by the module's
    repr: at their defaults the record holds the earlier text, so earlier checkpoints (and the
    poisons crafted with such surrogates) keep their keys; the released victim gets its own."""
    config = ml_collections.ConfigDict(
        dict(model=dict(name="cnn_mnist", width=0.5), epochs=1, batch_size=8, optimizer={})
    )
    x = np.zeros((8, 28, 28, 1), np.uint8)
    td = training.TrainData.create(x, np.arange(8) % 2, x, np.arange(8) % 2)
    key = jax.random.key(0)

    def record(config):
        trainer = training.Trainer.from_config(config, num_classes=10, image_shape=(28, 28, 1))
        return trainer.record(td, key=key, num_seeds=1)

    earlier = (
        "MnistCNN(\n    # attributes\n    num_classes = 10\n    width = 0.5\n    dtype = float32\n)"
    )
    assert record(config)["module"] == earlier
    config.model.update(normalization="batch", pool="avg")
    assert "normalization = 'batch'" in record(config)["module"]
    assert "pool = 'avg'" in record(config)["module"]


def test_auto_model_follows_the_data_and_a_bad_shape_is_refused():
    assert specs.model_spec({"name": "auto"}, (28, 28, 1), num_classes=10)["name"] == "cnn_mnist"
    assert specs.model_spec({"name": "auto"}, (32, 32, 3), num_classes=10)["name"] == "cnn_cifar"
    with pytest.raises(ValueError, match="no default model"):
        specs.model_spec({"name": "auto"}, (8, 8, 2), num_classes=10)
    with pytest.raises(ValueError, match="unknown model 'resnet7'"):
        specs.model_spec({"name": "resnet7"}, (32, 32, 3), num_classes=10)
    # Two VALID 5x5 convolutions and pools leave nothing of a 6x6 image.
    with pytest.raises(ValueError, match="cannot take \\(6, 6, 1\\) images"):
        specs.model_spec({"name": "cnn_mnist", "width": 0.1}, (6, 6, 1), num_classes=10)
    # The model's own fields are checked as the trainer passes them, each bad one in its line.
    for field, message in (
        ({"pool": "mean"}, "config.victim: MnistCNN pool='mean'; use 'max' or 'avg'"),
        ({"pools": "avg"}, "config.victim: model 'cnn_mnist' does not take .*'pools'"),
    ):
        with pytest.raises(ValueError, match=message):
            specs.model_spec(
                {"name": "cnn_mnist", **field}, (28, 28, 1), num_classes=10, what="config.victim"
            )


def test_selected_keeps_all_or_the_named_and_refuses_unknown_names():
    config = ml_collections.ConfigDict(
        dict(poisons=dict(a=dict(name="random"), b=dict(name="regions")), select=dict(poisons=()))
    )
    assert list(specs.selected(config, "poisons")) == ["a", "b"]
    config.select.poisons = ("b",)
    assert list(specs.selected(config, "poisons")) == ["b"]
    config.select.poisons = ("c",)
    with pytest.raises(ValueError, match=r"\['c'\] not among config.poisons"):
        specs.selected(config, "poisons")


def test_a_threat_without_epsilon_is_refused():
    config = ml_collections.ConfigDict(dict(threat=dict(norm="linf")))
    with pytest.raises(ValueError, match="no default radius"):
        specs.threat(config)


def test_a_poison_file_enters_its_record_by_content(tmp_path):
    path = tmp_path / "p.npz"
    config = ml_collections.ConfigDict(
        dict(threat=dict(epsilon=8 / 255), poisons=dict(f=dict(name="from_file", path=str(path))))
    )
    shape = dict(image_shape=(2, 2, 1), num_classes=2)
    ps = specs.poison_spec(config, "f", **shape)

    def key():
        record = specs.poison_record(ps, fingerprint="d", key=jax.random.key(0), **shape)
        return workdir.content_key(record)

    x = np.zeros((3, 2, 2, 1), np.uint8)
    np.savez(path, x_train=x, y_train=np.zeros(3))
    first = key()
    np.savez(path, x_train=x + 1, y_train=np.zeros(3))
    assert key() != first
