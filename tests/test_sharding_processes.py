"""One run on two processes (127.0.0.1, gloo) gives the one-process run's results; when a run
joins a cluster; the multi-process flags are checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

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


def _said(stderr):
    """What a failed process said first: its error line, not the module list of a fatal
    error's dump at the end of stderr (gloo's connection lines left out)."""
    lines = [line for line in stderr.splitlines() if not line.startswith("[Gloo]")]
    return "\n".join(lines[:15])[:3000]


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
    assert one.returncode == 0, _said(one.stderr)


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
        assert p.returncode == 0, _said(err)
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
    the poisoned victims have saved a checkpoint, process 0 (stuck in a collective or failed with
    it) is killed too, both are started again on the same workdir: they resume from the
    checkpoints (process 0 says so) and results.json equals the uninterrupted one-process run's."""
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
        assert p.returncode == 0, _said(err)
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
