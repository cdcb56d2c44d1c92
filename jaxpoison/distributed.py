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

import jax
import numpy as np


def initialize(coordinator_address=None, num_processes=None, process_id=None):
    """Joins this process to the run: `jax.distributed.initialize` with these arguments.

    With none of them given, a single process runs unless jax detects a cluster by itself
    (SLURM, Open MPI, a TPU pod: ``JAX_COORDINATOR_ADDRESS`` or the scheduler's variables).
    On CPUs the processes exchange data through gloo.

    Raises:
      ValueError: only some of the three arguments are given, or they disagree.
    """
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()):
        if not _cluster_detected():
            return
    elif any(v is None for v in given.values()):
        missing = ", ".join(f"--{k}" for k, v in given.items() if v is None)
        raise ValueError(
            f"multi-process run: {missing} missing; give --coordinator_address=HOST:PORT, "
            "--num_processes=N and --process_id=I (0..N-1) together, or none of them."
        )
    elif not 0 <= process_id < num_processes:
        raise ValueError(
            f"--process_id={process_id} is not in 0..{num_processes - 1} "
            f"(--num_processes={num_processes}); number the processes from 0."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})


def _cluster_detected():
    from jax._src import clusters

    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types)


def is_writer():
    """True in the one process that writes the workdir (process 0; the only one, usually)."""
    return jax.process_index() == 0


def barrier(name):
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


__all__ = ["barrier", "initialize", "is_writer", "to_host"]
