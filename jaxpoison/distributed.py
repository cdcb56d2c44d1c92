"""Several processes (hosts) on one run: `jax.distributed`, one writer, barriers, host copies.

Every process runs the same program on its own devices; together they form one global mesh
(`jaxpoison.sharding.data_mesh` spans every device of every process), so crafting, training and
evaluation are single programs split along ``data``. The workdir (shared storage, as orbax
requires) is written by process 0 only: `is_writer` gates ``config.json``, ``results.json``,
``spec.json`` claims, poison artifacts, plots and the log, and `barrier` makes the other
processes wait until what they will read exists. Checkpoints are orbax's: every process saves
its shards of the global arrays.

    jaxpoison --config=... --workdir=/shared/run \\
        --coordinator_address=host0:1234 --num_processes=2 --process_id=0   # on host 0
    ... --process_id=1                                                       # on host 1
"""

from __future__ import annotations

import os

import jax
import numpy as np


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Joins this process to the run: `jax.distributed.initialize` with these arguments.

    With none of them given, a single process runs unless the environment says this process is
    one of several (`cluster_size`): then the arguments come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` when set, else jax reads them from the
    scheduler (SLURM, Open MPI, a TPU pod). On CPUs the processes exchange data through gloo.

    Raises:
      ValueError: only some of the three arguments are given, or they disagree.
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()):
        if cluster_size() < 2:
            return
        env = os.environ
        if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
            given = {
                "coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                "num_processes": int(env["JAX_NUM_PROCESSES"]),
                "process_id": int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None,
            }
    if any(v is None for v in given.values()) and any(v is not None for v in given.values()):
        missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
        raise ValueError(
            f"multi-process run: {missing} missing; give --coordinator_address=HOST:PORT, "
            "--num_processes=N and --process_id=I (0..N-1) together, or none of them."
        )
    pid, count = given["process_id"], given["num_processes"]
    if pid is not None and count is not None and not 0 <= pid < count:
        raise ValueError(
            f"--process_id={pid} is not in 0..{count - 1} (--num_processes={count}); number "
            "the processes from 0."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def cluster_size():
    """How many processes the environment starts this run with: ``JAX_NUM_PROCESSES`` (with
    ``JAX_COORDINATOR_ADDRESS``: the flags as variables), SLURM's tasks, Open MPI's world size
    or a TPU pod's workers; 1 elsewhere. Environment variables only: a single-process job on a
    cluster (one SLURM task, a Kubernetes pod) stays a single process, and nothing is asked of
    a metadata server."""
    env = os.environ
    counts = [
        env.get("JAX_NUM_PROCESSES") if env.get("JAX_COORDINATOR_ADDRESS") else None,
        env.get("SLURM_NTASKS") if env.get("SLURM_JOB_ID") else None,
        env.get("OMPI_COMM_WORLD_SIZE"),
    ]
    sizes = [int(c) for c in counts if c and c.strip().isdigit()]
    workers = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return max([1, len(workers), *sizes])


def is_writer():
    """True in the one process that writes the workdir (process 0; the only one, usually)."""
    return jax.process_index() == 0


def barrier(name):
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class WriterFailed(RuntimeError):
    """The writing process failed to write what this one was waiting for."""


def on_writer(name, write):
    """Runs ``write()`` in the writing process; every process returns once it has written.

    Every process calls it where the run writes shared state (a spec, an artifact) that the
    others read right after. The writer's failure reaches them all: it raises its own error, and
    every other process raises `WriterFailed` with its message, where a barrier would have left
    them waiting for jax's shutdown timeout. An interrupt (not an ``Exception``) is not passed
    on.
    """
    error = None
    if is_writer():
        try:
            write()
        except Exception as e:  # noqa: BLE001 (raised again below, after the others know)
            error = e
    said = _said_by_writer(name, "" if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if said:
        raise WriterFailed(f"the writing process failed at {name!r}: {said}")


# The bytes of the writer's message that reach the others (longer messages are cut).
_MESSAGE_BYTES = 1024


def _said_by_writer(name, message):
    """The writer's `message` on every process, once every process has reached `name` (a
    barrier, with `barrier`'s check that the names agree); "" with one process."""
    if jax.process_count() == 1:
        return ""
    from jax.experimental import multihost_utils

    # In the writer only, before the collectives: nothing here may raise (a lone surrogate).
    text = message.encode(errors="replace")[:_MESSAGE_BYTES]
    # int32, not uint8: the broadcast is a psum, and every backend sums int32 (TPUs 8-bit ints
    # not necessarily); the first entry is the length.
    buffer = np.zeros(_MESSAGE_BYTES + 1, np.int32)
    buffer[0] = len(text)
    buffer[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    barrier(name)
    buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return bytes(buffer[1 : 1 + int(buffer[0])].astype(np.uint8)).decode(errors="replace")


def to_host(tree):
    """`jax.device_get` of `tree` that also takes arrays split over several processes (every
    process gets the whole array; every process must call it, as it gathers)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(get, tree)


__all__ = [
    "WriterFailed",
    "barrier",
    "cluster_size",
    "initialize",
    "is_writer",
    "on_writer",
    "to_host",
]
