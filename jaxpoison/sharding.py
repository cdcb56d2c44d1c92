"""Data parallelism: one `Mesh` axis, ``data``, for everything that touches data.

Crafting, training and evaluation all run the same way: the arrays they keep per example
(training images, sample-wise perturbations) are split along their example axis (`place_examples`,
`examples`), the rest (model and optimizer state, class-wise patterns, the test set) is
replicated, and inside the compiled step the batch is split along ``data``, so each device
computes B / D examples and gradients meet in one all-reduce (the batch's gather from the split
images adds one all-reduce of the B examples).

The entry points (`poisons.craft`, `poisons.apply_all`, `Trainer`, the evaluators) take a mesh
(default `data_mesh`, every device) and trace under it (`jax.set_mesh`); the pure functions they
run call `batch` / `examples` to place their arrays, which do nothing where no mesh is set, so
the same code runs on one CPU, under a user's own `jit`, or on a pod. A batch that the devices do
not divide (50 examples on 8 devices) is computed whole on every device: the numbers are the
same, only the speed-up is lost (`note_indivisible` says so once).

    mesh = sharding.data_mesh()
    with jax.set_mesh(mesh):
        images = sharding.batch(images)  # inside a jitted step

Victims trained several seeds at once (a leading seed axis) can also split the seeds:
``data_mesh(seeds=S)`` is a 2-d mesh ``('seed', 'data')``, S devices along ``seed``; each group
of D / S devices trains its share of the seeds, every batch split along its ``data`` devices
(`over_seed_axis`), so gradients meet in an all-reduce over D / S devices, not D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.progress import say

DATA = "data"
SEED = "seed"


def data_mesh(devices=None, *, seeds=1):
    """The mesh over `devices` (default: every device of every process): 1-d, axis ``data``; with
    ``seeds > 1``, 2-d ``('seed', 'data')`` with `seeds` devices along ``seed`` (they must divide
    the devices)."""
    devices = jax.devices() if devices is None else list(devices)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r} must be a positive int: the devices along 'seed'.")
    if len(devices) % seeds:
        raise ValueError(
            f"seeds={seeds} devices along 'seed' do not divide the {len(devices)} devices; use a "
            f"divisor of {len(devices)}."
        )
    if seeds == 1:
        return Mesh(np.asarray(devices), (DATA,))
    return Mesh(np.asarray(devices).reshape(seeds, -1), (SEED, DATA))


def seed_devices(mesh):
    """Devices along the ``seed`` axis of `mesh` (1 without one)."""
    return mesh.shape.get(SEED, 1)


def seed_sharding(mesh):
    """Where per-seed state lives: split along ``seed`` on its leading axis, whole on the
    ``data`` devices of each group (replicated on a mesh without ``seed``)."""
    return NamedSharding(mesh, P(SEED) if seed_devices(mesh) > 1 else P())


def over_seed_axis(fn, mesh, seeded):
    """`fn` run with the seeds split along the ``seed`` axis of `mesh`: each device group runs
    `fn` on its own seeds (`jax.shard_map`, manual over ``seed`` only, so ``data`` is still left
    to the compiler and `batch`). `seeded`: one bool per positional argument, True where it leads
    with the seed axis (the others are read whole by every group); every output leads with it.
    Without a ``seed`` axis, `fn` itself."""
    if seed_devices(mesh) == 1:
        return fn
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=tuple(P(SEED) if s else P() for s in seeded),
        out_specs=P(SEED),
        axis_names={SEED},
        # The groups never talk to each other; unchecked, so that the per-platform kernels'
        # branches (`ops`) need not mark their outputs as varying along ``seed``.
        check_vma=False,
    )


def replicated(mesh):
    """The sharding of an array every device holds whole."""
    return NamedSharding(mesh, P())


def _data_size():
    """Devices along ``data`` of the mesh being traced under (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA not in mesh.axis_names:
        return 1
    return mesh.shape[DATA]


def _split(x, axis):
    size = _data_size()
    if size == 1 or x.ndim <= axis or x.shape[axis] % size:
        return x
    spec = P(*([None] * axis), DATA)
    return jax.lax.with_sharding_constraint(x, spec)


def batch(tree, axis=0):
    """Every array of `tree` split along ``data`` on `axis` (its batch axis), where the mesh
    traced under has a ``data`` axis that divides it; otherwise unchanged (computed whole)."""
    return jax.tree.map(lambda x: _split(x, axis), tree)


def examples(tree, num_examples):
    """Arrays of `tree` whose leading axis is the `num_examples` of the dataset (per-example
    state such as sample-wise perturbations) split along ``data``; the rest replicated."""
    size = _data_size()
    if size == 1:
        return tree

    def place(x):
        if x.ndim and x.shape[0] == num_examples and num_examples % size == 0:
            return jax.lax.with_sharding_constraint(x, P(DATA))
        return jax.lax.with_sharding_constraint(x, P())

    return jax.tree.map(place, tree)


def place_examples(array, mesh):
    """A host array of per-example rows (training images) as a global array on `mesh`: split
    along ``data`` on its first axis where the devices divide it, so each device holds N / D
    rows, else replicated. Every process passes the whole array (`make_array_from_callback`
    takes each device's rows from it), as every process loads the dataset.

    A compiled step gathers its batch from the split rows by index: XLA gathers each device's
    rows locally and sums the pieces in one all-reduce of the batch (B examples, not N).
    """
    if not isinstance(array, jax.Array):
        array = np.asarray(array)
    size = mesh.shape[DATA]
    spec = P(DATA) if size > 1 and array.ndim and array.shape[0] % size == 0 else P()
    placement = NamedSharding(mesh, spec)
    if isinstance(array, jax.Array):  # already on devices: moved there, not through the host
        return jax.device_put(array, placement)
    return jax.make_array_from_callback(array.shape, placement, lambda index: array[index])


def gather_examples(x, idx):
    """``x[idx]`` of per-example rows `x` placed by `place_examples` (inside a compiled step,
    traced under the mesh), for integer indices `idx` of any shape.

    Rows split along ``data``: each device looks up the indices that fall in its rows and the
    pieces are summed in one all-reduce of the result (exact: all but one piece are zeros), so no
    device ever holds more than its N / D rows and the result. Replicated rows (no mesh, one
    device, or N not divisible): a plain gather.
    """
    size = _data_size()
    if size == 1 or x.shape[0] % size:
        return x[idx]

    def local(rows, idx):
        j = idx - jax.lax.axis_index(DATA) * rows.shape[0]
        inside = (j >= 0) & (j < rows.shape[0])
        got = rows[jnp.clip(j, 0, rows.shape[0] - 1)]
        got = jnp.where(inside.reshape(inside.shape + (1,) * (rows.ndim - 1)), got, 0)
        return jax.lax.psum(got, DATA)

    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA), P()), out_specs=P())(x, idx)


def replicate(tree):
    """Every array of `tree` whole on every device of the mesh traced under (outputs that a
    host reads, e.g. poisoned images: with several processes each one can then read them)."""
    if _data_size() == 1:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, P()), tree)


_noted = set()


def note_indivisible(what, size, mesh):
    """Says once per (size, devices) that batches of `size` examples (`what`, the first to have
    them) are computed whole on each of the mesh's devices, and how to split them."""
    devices = mesh.shape[DATA]
    if devices > 1 and size % devices and (size, devices) not in _noted:
        _noted.add((size, devices))
        say(
            f"note: {what}={size} is not a multiple of the {devices} devices, so every device "
            f"computes whole batches (same numbers, no speed-up); use a multiple of {devices} "
            "to split them."
        )


__all__ = [
    "DATA",
    "SEED",
    "batch",
    "data_mesh",
    "examples",
    "gather_examples",
    "note_indivisible",
    "over_seed_axis",
    "place_examples",
    "replicate",
    "replicated",
    "seed_devices",
    "seed_sharding",
]
