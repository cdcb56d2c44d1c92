"""Data parallelism on 1, 2 and 8 (fake CPU) devices: the same numbers, the work split.

Each test runs a fresh Python with ``--xla_force_host_platform_device_count=8`` (the device
count is fixed when jax starts) and compares meshes over the first 1, 2 or 8 devices.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_on_8_devices(code, **env):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **env},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crafted():
    """Poisons crafted and applied, a risk evaluator and a trainer run on 1, 2 and 8 devices."""
    return run_on_8_devices(
        """
        import json, jax, numpy as np, ml_collections
        from jaxpoison import models, poisons, sharding, threat, training, train_state
        from jaxpoison.evaluation import risk

        rng = np.random.default_rng(0)
        x = rng.random((32, 8, 8, 3), dtype=np.float32)
        y = rng.integers(0, 4, 32).astype(np.int32)
        ball = threat.make(epsilon=8 / 255)
        shape = dict(threat=ball, num_classes=4, image_shape=(8, 8, 3))
        # MLPs: a CNN compiles for a minute per mesh; convolutions are split as tested below.
        mlp = dict(name="mlp", width=0.25)
        module = models.make("mlp", num_classes=4, width=0.25)
        apply_fn = models.make_apply_fn(module)
        variables = models.init(module, jax.random.key(5), (8, 8, 3))
        em = dict(model=mlp, num_epochs=2, num_steps=2, train_steps=1)
        made = {
            "random": poisons.make("random", **shape),
            "error_minimizing": poisons.make("error_minimizing", **shape, **em),
            "error_minimizing_class_wise": poisons.make(
                "error_minimizing", **shape, **em, class_wise=True
            ),
            "adversarial": poisons.make(
                "adversarial", **shape, apply_fn=apply_fn, variables=variables, num_steps=2
            ),
        }
        out = {"poisons": {}, "specs": {}}
        meshes = {n: sharding.data_mesh(jax.devices()[:n]) for n in (1, 2, 8)}
        for name, poison in made.items():
            for n in (1, 2, 8) if name == "error_minimizing" else (1, 8):
                state, history = poisons.craft(
                    poison, x, y, key=jax.random.key(0), batch_size=16, progress=False,
                    mesh=meshes[n],
                )
                images, _ = poisons.apply_all(poison, state, x, y, mesh=meshes[n])
                out["poisons"].setdefault(name, {})[n] = [images.tolist(), history]
                if name == "error_minimizing":
                    out["specs"][n] = str(state.delta.sharding.spec)

        # Victims (flips, 2 seeds) with batches that 8 devices split (16, a CNN) and do not (20),
        # and a PGD evaluator (random starts).
        cnn = dict(name="cnn_cifar", width=0.125)
        cnn_apply = models.make_apply_fn(models.make("cnn_cifar", num_classes=4, width=0.125))
        evaluator = risk.make("risk", apply_fn=cnn_apply, num_classes=4, epsilon=8 / 255,
                              num_steps=2, batch_size=16)
        for batch_size, model in ((16, cnn), (20, mlp)):
            cfg = ml_collections.ConfigDict(dict(model=model, epochs=1, batch_size=batch_size,
                optimizer=dict(learning_rate=0.05, momentum=0.9, schedule="constant"),
                objective=dict(name="erm")))
            for n in (1, 8):
                trainer = training.Trainer.from_config(
                    cfg, num_classes=4, image_shape=(8, 8, 3), mesh=meshes[n]
                )
                td = training.TrainData.create(x, y, x, y, mesh=meshes[n], flip=True)
                states, history = trainer.fit(
                    td, key=jax.random.key(1), num_seeds=2, progress=False
                )
                out.setdefault(f"train_{batch_size}", {})[n] = history
                if batch_size == 16:
                    scores = evaluator(states, td.x_test, td.y_test, key=jax.random.key(2))
                    out.setdefault("risk", {})[n] = {
                        k: np.asarray(v).tolist() for k, v in scores.items()
                    }
        print(json.dumps(out))
        """
    )


POISONED = ["random", "error_minimizing", "error_minimizing_class_wise", "adversarial"]


@pytest.mark.parametrize("name", POISONED)
def test_crafting_gives_the_same_poison_on_any_number_of_devices(crafted, name):
    runs = crafted["poisons"][name]
    images, history = runs["1"]
    for n in set(runs) - {"1"}:
        other_images, other_history = runs[n]
        # Up to float reassociation: batch sums are split across devices.
        np.testing.assert_allclose(other_images, images, atol=2e-6, err_msg=n)
        for key, values in history.items():
            np.testing.assert_allclose(other_history[key], values, rtol=1e-4, err_msg=key)


def test_sample_wise_perturbations_are_split_along_the_examples(crafted):
    assert crafted["specs"] == {"1": "P()", "2": "P('data',)", "8": "P('data',)"}


@pytest.mark.parametrize("batch_size", [16, 20])
def test_training_and_evaluation_give_the_same_numbers_on_8_devices(crafted, batch_size):
    """Batches of 16 are split over 8 devices (up to float reassociation); batches of 20 are
    computed whole on each. The PGD evaluator's batches of 16 are split."""
    runs = crafted[f"train_{batch_size}"]
    for key, values in runs["1"].items():
        np.testing.assert_allclose(runs["8"][key], values, rtol=1e-4, err_msg=key)
    for key, values in crafted["risk"]["1"].items():
        np.testing.assert_allclose(crafted["risk"]["8"][key], values, atol=1e-6, err_msg=key)


def test_compiled_steps_split_the_batch_and_reduce_gradients_once():
    """With XLA's convolutions on 8 devices, the victim's train step and the error-minimizing
    craft step convolve B/8 examples per device; the train step holds one (combined) gradient
    all-reduce and gathers nothing."""
    out = run_on_8_devices(
        """
        import json, re, jax, jax.numpy as jnp, numpy as np, ml_collections
        from jaxpoison import poisons, sharding, threat, training
        from jaxpoison.poisons import engine

        def census(text):
            ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
            counts = {op: len(re.findall(rf"\\b{op}(-start)?\\(", text)) for op in ops}
            conv = r"= f32\\[(\\d+),[\\d,]+\\][^\\n]*convolution\\("
            batches = sorted({int(b) for b in re.findall(conv, text)})
            return dict(counts, conv_batches=batches)

        cfg = ml_collections.ConfigDict(dict(model=dict(name="cnn_cifar", width=0.125),
            epochs=1, batch_size=64, optimizer=dict(learning_rate=0.05, momentum=0.9,
            schedule="constant"), objective=dict(name="erm")))
        trainer = training.Trainer.from_config(cfg, num_classes=4, image_shape=(8, 8, 3))
        x = jnp.zeros((128, 8, 8, 3))
        y = jnp.zeros(128, jnp.int32)
        with jax.set_mesh(trainer.mesh):
            x, y = jax.device_put((x, y), sharding.replicated(trainer.mesh))
            states = trainer.init_seeds(jax.random.key(0), 2, 2)
            step = trainer.compiled_step(2, 0, False)
            idx = jnp.zeros((2, 64), jnp.int32)
            keys = jax.random.split(jax.random.key(1), 2)
            train = step.lower(states, x, y, idx, keys).compile().as_text()

            poison = poisons.make("error_minimizing", threat=threat.make(epsilon=8 / 255),
                num_classes=4, image_shape=(8, 8, 3), model=dict(name="cnn_cifar", width=0.125),
                num_steps=2, train_steps=1)
            state = engine._compiled_init(poison)(jax.random.key(0), x, y)
            update = engine._compiled_update(poison)
            craft = update.lower(state, x, y, jnp.arange(64), jax.random.key(1)).compile()
        print(json.dumps({"train": census(train), "craft": census(craft.as_text())}))
        """,
        JAXPOISON_CONV="xla",
    )
    train, craft = out["train"], out["craft"]
    assert train["conv_batches"] == [64 // 8], train
    assert train["all-reduce"] == 1 and train["all-gather"] == 0, train
    assert train["all-to-all"] == 0 and train["collective-permute"] == 0, train
    assert craft["conv_batches"] == [64 // 8], craft


TWO_PROCESS_ARGS = [
    "--config=configs/poison_family.py:tiny",
    "--quiet",
    "--config.select.poisons=('error_minimizing',)",
    "--config.data.source=digits",
    "--config.data.name=digits",
    "--config.data.num_train=0",
    "--config.data.num_test=0",
    "--config.victim.model.name=mlp",
    "--config.poisons.error_minimizing.model.name=mlp",
]
TWO_PROCESS_ENV = {**os.environ, "JAXPOISON_HUGE_PAGES": "0"}


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_processes(workdir, *extra):
    """The two processes of one run on 127.0.0.1 (a fresh coordinator port each time)."""
    port = _free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jaxpoison.main",
                *TWO_PROCESS_ARGS,
                *extra,
                f"--workdir={workdir}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=REPO,
            env=TWO_PROCESS_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (0, 1)
    ]


def _run_one_process(workdir, *extra):
    one = subprocess.run(
        [sys.executable, "-m", "jaxpoison.main", *TWO_PROCESS_ARGS, *extra, f"--workdir={workdir}"],
        cwd=REPO,
        env={**TWO_PROCESS_ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-2000:]


def _results(workdir):
    out = json.loads((workdir / "results.json").read_text())
    for run in out["runs"].values():
        run.pop("wall_time_s")
    return {k: v for k, v in out.items() if k not in ("wall_time_s", "results_sha256")}


def test_two_processes_give_the_results_of_one_and_write_once(tmp_path):
    """A crafting-epoch poison and its victims on two processes (127.0.0.1, gloo): results.json
    equals the one-process run's on as many devices, every file is written once (by process 0)
    and the other process says nothing."""
    procs = _start_processes(tmp_path / "two")
    _run_one_process(tmp_path / "one")
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    two, one = _results(tmp_path / "two"), _results(tmp_path / "one")
    assert (two.pop("processes"), one.pop("processes")) == (2, 1)
    assert two == one

    def files(name):
        """Every file, and the checkpoint steps (inside them orbax keeps a part per process)."""
        paths = [p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*")]
        steps = [p for p in paths if p.parts[0] == "checkpoints" and len(p.parts) == 4]
        kept = [p for p in paths if p.parts[0] != "checkpoints" and (tmp_path / name / p).is_file()]
        return sorted(map(str, steps + kept))

    assert files("two") == files("one")
    log = lambda name: (tmp_path / name / "log.txt").read_text().splitlines()  # noqa: E731
    assert len(log("two")) == len(log("one"))
    said = [line for line in outs[1][1].splitlines() if not line.startswith("[Gloo]")]
    assert said == [], said


@pytest.mark.slow
def test_a_sigkill_of_one_process_then_a_restart_of_both_resumes_to_the_same_results(tmp_path):
    """Two processes (127.0.0.1, gloo) with a checkpoint every epoch: process 1 is SIGKILLed once
    the poisoned victims have saved a checkpoint, process 0 (stuck in a collective or failed with it) is
    killed too, both are started again on the same workdir: they resume from the checkpoints
    (process 0 says so) and results.json equals the uninterrupted one-process run's."""
    import signal
    import time

    extra = ("--config.victim.checkpoint_every=1", "--config.victim.epochs=4")
    _run_one_process(tmp_path / "one", *extra)
    workdir = tmp_path / "two"
    procs = _start_processes(workdir, *extra)
    deadline = time.time() + 900
    # Killed once the poisoned victims' first epoch is saved (checkpoints/<run>/<key>/<epoch>).
    while not list((workdir / "checkpoints").glob("error_minimizing/*/[0-9]*")):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait()
    try:
        procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
    assert not (workdir / "results.json").exists()
    procs = _start_processes(workdir, *extra)
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert "resumed from epoch" in (workdir / "log.txt").read_text()
    two, one = _results(workdir), _results(tmp_path / "one")
    assert (two.pop("processes"), one.pop("processes")) == (2, 1)
    assert two == one


@pytest.mark.parametrize(
    "env,size",
    [
        ({}, 1),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, 1),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, 4),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, 4),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "3"}, 3),
        ({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, 1),
    ],
)
def test_a_run_joins_a_cluster_only_when_it_is_one_of_several_processes(monkeypatch, env, size):
    from jaxpoison import distributed

    for name in (
        "SLURM_JOB_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.cluster_size() == size


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_processes=2), r"--coordinator_address, --process_id missing"),
        (
            dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2),
            r"--process_id=2 is not in 0..1",
        ),
    ],
)
def test_incomplete_multi_process_flags_are_refused(kwargs, match):
    from jaxpoison import distributed

    with pytest.raises(ValueError, match=match):
        distributed.initialize(**kwargs)


def test_the_flags_as_environment_variables_are_checked_too(monkeypatch):
    from jaxpoison import distributed

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.delenv("JAX_PROCESS_ID", raising=False)
    with pytest.raises(ValueError, match=r"--process_id missing"):
        distributed.initialize()
    monkeypatch.setenv("JAX_PROCESS_ID", "5")
    with pytest.raises(ValueError, match=r"--process_id=5 is not in 0..1"):
        distributed.initialize()
