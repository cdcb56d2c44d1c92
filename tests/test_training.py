import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, progress, train_state, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def victim_config(**overrides):
    cfg = dict(
        model=dict(name="mlp", width=0.25),
        epochs=3,
        batch_size=64,
        num_seeds=2,
        optimizer=dict(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        objective=dict(name="erm"),
        checkpoint_every=1,
    )
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def digits():
    ds = data.load(ml_collections.ConfigDict(dict(source="digits", name="digits")))
    return ds, training.train_data_from(ds.x_train, ds.y_train, ds)


@pytest.fixture(scope="module")
def trained(digits):
    ds, td = digits
    trainer = training.Trainer.from_config(
        victim_config(), num_classes=10, image_shape=ds.image_shape
    )
    states, history = trainer.fit(td, key=jax.random.key(0), num_seeds=2, progress=False)
    return trainer, states, history


def test_fit_learns_every_seed_and_records_history(trained):
    _, states, history = trained
    acc = np.asarray(history["test/accuracy"])
    assert acc.shape == (3, 2)
    assert (acc[-1] > 0.85).all(), acc  # digits: an MLP reaches > 90% in a few epochs
    assert np.asarray(history["train/loss"])[-1].max() < np.asarray(history["train/loss"])[0].min()
    assert not np.allclose(acc[:, 0], acc[:, 1])  # seeds differ
    assert int(states.step[0]) == 3 * (1397 // 64)


def test_same_key_same_numbers_and_map_equals_vmap(digits, trained):
    ds, td = digits
    _, _, reference = trained
    trainer = training.Trainer.from_config(
        victim_config(seed_strategy="vmap"), num_classes=10, image_shape=ds.image_shape
    )
    _, history = trainer.fit(td, key=jax.random.key(0), num_seeds=2, progress=False)
    np.testing.assert_allclose(history["test/accuracy"], reference["test/accuracy"], atol=2e-3)
    np.testing.assert_allclose(history["train/loss"], reference["train/loss"], rtol=1e-4)


def test_step_compiles_once(digits):
    ds, td = digits
    trainer = training.Trainer.from_config(
        victim_config(), num_classes=10, image_shape=ds.image_shape
    )
    tx = trainer.optimizer(10)
    traced = chex.assert_max_traces(
        lambda s, b, k: train_state.train_step(
            s,
            b,
            k,
            apply_fn=trainer.apply_fn,
            objective=trainer.objective,
            tx=tx,
            schedule=(trainer.epochs, 10),
        ),
        n=1,
    )
    step = jax.jit(traced)
    # Placed as `fit` places states (replicated on the mesh), so outputs match inputs.
    state = jax.device_put(trainer.init(jax.random.key(0), 10), td.x_train.sharding)
    for i in range(3):
        idx = jnp.arange(i * 64, (i + 1) * 64)
        batch = {
            "image": data.device_float(td.x_train[idx]),
            "label": td.y_train[idx],
            "index": idx,
        }
        state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))
    chex.clear_trace_counter()


def test_nan_images_and_bad_batch_sizes_are_refused(digits):
    ds, _ = digits
    x = ds.x_train.astype(np.float32) / 255.0
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(data.DataError, match="NaN"):
        training.train_data_from(x, ds.y_train, ds)
    trainer = training.Trainer.from_config(
        victim_config(batch_size=5000), num_classes=10, image_shape=ds.image_shape
    )
    with pytest.raises(ValueError, match="exceeds"):
        trainer.fit(training.train_data_from(ds.x_train, ds.y_train, ds), key=jax.random.key(0))


def test_evaluate_takes_uint8_as_images_and_refuses_what_is_not(trained, digits):
    """Bug: uint8 images given to `Trainer.evaluate` were read as floats (99.6% saturated)."""
    trainer, states, _ = trained
    ds, _ = digits
    as_uint8 = trainer.evaluate(states, ds.x_test, ds.y_test)
    as_float = trainer.evaluate(states, ds.x_test.astype(np.float32) / 255.0, ds.y_test)
    np.testing.assert_array_equal(as_uint8["accuracy"], as_float["accuracy"])
    assert (np.asarray(as_uint8["accuracy"]) > 0.85).all()
    with pytest.raises(data.DataError, match="divide by 255"):
        trainer.evaluate(states, ds.x_test.astype(np.float32), ds.y_test)
    with pytest.raises(data.DataError, match="transpose"):
        training.train_data_from(np.zeros((10, 3, 16, 16), np.uint8), np.zeros(10), ds)


def test_uint8_images_stay_uint8_on_the_devices_with_the_numbers_of_floats(digits, trained):
    """Images kept at 1 byte per value (converted per batch in the step and the evaluation)
    train the same victims, bit for bit, and key the same checkpoints as their float values."""
    ds, td = digits
    trainer, _, reference = trained
    assert td.x_train.dtype == td.x_test.dtype == jnp.uint8
    floats = training.train_data_from(
        data.to_float(ds.x_train),
        ds.y_train,
        ds,
        x_val=data.to_float(ds.x_test[:50]),
        y_val=ds.y_test[:50],
    )
    mixed = training.train_data_from(
        ds.x_train, ds.y_train, ds, x_val=ds.x_test[:50], y_val=ds.y_test[:50]
    )
    assert floats.x_train.dtype == floats.x_val.dtype == jnp.float32
    assert mixed.x_val.dtype == jnp.uint8
    assert floats.digest == mixed.digest != td.digest
    _, history = trainer.fit(floats, key=jax.random.key(0), num_seeds=2, progress=False)
    for k in ("train/loss", "test/accuracy", "test/loss"):
        np.testing.assert_array_equal(history[k], reference[k], err_msg=k)


def run_python(code, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # a real run killed once; test_faults.py (--runslow) kills 10 at random
def test_sigkill_then_resume_gives_identical_results(tmp_path):
    """A run SIGKILLed right after its 2nd checkpoint resumes and ends with the same numbers."""
    overrides = [
        "--config.data.source=digits",
        "--config.data.name=digits",
        "--config.data.flip=False",
        "--config.victim.model.name=mlp",
        "--config.victim.model.width=0.25",
        "--config.victim.epochs=4",
        "--config.victim.batch_size=64",
        "--config.victim.checkpoint_every=1",
        "--config.victim.optimizer.learning_rate=0.05",
    ]
    cli = [sys.executable, "-m", "jaxpoison.main", "--config=configs/quickstart.py", "--quiet"]

    def run(workdir, kill_after_saves=None):
        prelude = ""
        if kill_after_saves:
            prelude = textwrap.dedent(f"""
                import os, signal
                from jaxpoison import checkpointing
                _save, _count = checkpointing.Manager.save, [0]
                def save(self, *a, **k):
                    _save(self, *a, **k)
                    _count[0] += 1
                    if _count[0] == {kill_after_saves}:
                        os.kill(os.getpid(), signal.SIGKILL)
                checkpointing.Manager.save = save
            """)
        code = prelude + "import sys\nfrom jaxpoison import main\nsys.argv = %r\nmain.run()\n" % (
            ["jaxpoison", *cli[3:], f"--workdir={workdir}", *overrides]
        )
        return subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
        )

    killed = run(tmp_path / "a", kill_after_saves=2)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "a" / "results.json").exists()
    resumed = run(tmp_path / "a")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = run(tmp_path / "b")
    assert straight.returncode == 0, straight.stderr[-2000:]
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    for run_name in ("clean", "poisoned"):
        assert a["runs"][run_name]["history"] == b["runs"][run_name]["history"]
    again = run(tmp_path / "a")  # a complete run says so and exits
    assert again.returncode == 0 and "complete" in again.stderr


def test_warmup_rises_linearly_then_follows_the_schedule():
    def rates(epochs=3, **kwargs):
        tx = train_state.make_optimizer(
            learning_rate=0.1,
            momentum=0,
            weight_decay=0,
            epochs=epochs,
            steps_per_epoch=4,
            **kwargs,
        )
        state, out = tx.init(jnp.zeros(())), []
        for _ in range(4 * epochs):
            update, state = tx.update(jnp.ones(()), state, jnp.zeros(()))
            out.append(-float(update))
        return np.array(out)

    warm = rates(schedule="cosine", warmup_epochs=1)
    np.testing.assert_allclose(warm[:5], [0, 0.025, 0.05, 0.075, 0.1], atol=1e-7)
    # After the warmup: the cosine schedule over the remaining 2 epochs.
    np.testing.assert_allclose(warm[4:], rates(epochs=2, schedule="cosine"), atol=1e-7)
    np.testing.assert_allclose(rates(schedule="constant", warmup_epochs=0.5)[2:], 0.1, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_epochs=3"):
        rates(schedule="cosine", warmup_epochs=3)


def test_progress_bar_counts_steps_once_computed():
    """A step is counted when the next one is dispatched and its outputs are ready, not queued."""
    bar = progress.ProgressBar(total=3, desc="test")
    bar.update(1, pending=jnp.ones(3))
    assert bar._bar.n == 0
    bar.update(1, pending=jnp.ones(3) + 1)
    assert bar._bar.n == 1
    bar.set_postfix(loss="0.1")  # an epoch's end: everything dispatched is counted
    assert bar._bar.n == 2
    bar.update(1, pending=jnp.zeros(()))
    bar.close()
    assert bar._bar.n == 3


def test_the_step_loop_moves_nothing_from_the_host(digits, capfd):
    # Under jax.transfer_guard("log") every implicit host-to-device transfer is logged; a fit
    # with twice the steps per epoch logs as many: none happens per step (setup and the epoch's
    # index and key draws only).
    ds, _ = digits
    td = training.train_data_from(ds.x_train[:400], ds.y_train[:400], ds)
    counts = {}
    for batch_size in (100, 50):
        trainer = training.Trainer.from_config(
            victim_config(batch_size=batch_size, epochs=2, checkpoint_every=0),
            num_classes=10,
            image_shape=ds.image_shape,
        )
        trainer.fit(td, key=jax.random.key(0), num_seeds=2, progress=False)  # compiles
        key = jax.random.key(1)
        capfd.readouterr()
        with jax.transfer_guard("log"):
            trainer.fit(td, key=key, num_seeds=2, progress=False)
        counts[batch_size] = capfd.readouterr().err.count("host-to-device transfer")
    assert counts[100] == counts[50], counts
