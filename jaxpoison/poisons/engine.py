"""The crafting engine: runs a poison's `update` over the whole training set, compiled.

Every step is one jitted call on a batch of examples (gathered on device by index, uint8 images
converted to float there, so the devices hold the training set at one byte per value); a pass over
the data is an epoch; the state is checkpointed after every epoch so a killed craft resumes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison import checkpointing, data, sharding
from jaxpoison.progress import progress_bar, say


@functools.lru_cache(maxsize=32)
def _compiled_update(poison):
    """The jitted ``(state, images, labels, idx, key) -> (state, metrics)`` of one poison.

    The training set is an argument (not a closed-over constant, which XLA would copy into the
    program) and the state is donated, so the [N, ...] perturbation buffer is updated in place.
    Under a mesh (`sharding`) the batch is split along ``data`` and per-example state along its
    example axis. Cached per poison so crafting twice (a resumed run, a test) compiles once; the
    mesh traced under is part of jit's cache key.
    """

    def step(state, images, labels, idx, key):
        image = data.device_float(sharding.gather_examples(images, idx))
        batch = sharding.batch({"image": image, "label": labels[idx], "index": idx})
        state, metrics = poison.update(state, batch, key)
        return sharding.examples(state, labels.shape[0]), metrics

    return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _compiled_init(poison):
    def init(key, images, labels):
        state = poison.init(key, {"image": data.device_float(images), "label": labels})
        return sharding.examples(state, labels.shape[0])

    return jax.jit(init)


@functools.lru_cache(maxsize=32)
def _compiled_apply(poison):
    def fn(state, images, labels, idx):
        image = data.device_float(sharding.gather_examples(images, idx))
        batch = sharding.batch({"image": image, "label": labels[idx], "index": idx})
        out = poison.apply(state, batch)
        return sharding.replicate((out["image"], out["label"]))

    return jax.jit(fn)


def _inputs(images, labels, where, mesh, num_classes=None):
    """Images (uint8 as they are, converted per batch on the devices; others as float32 in
    [0, 1] by `data.as_float_images`), split along the mesh's ``data`` axis
    (`sharding.place_examples`), and int32 labels (whole numbers in 0..num_classes-1 when the
    poison knows its classes), replicated."""
    if getattr(images, "dtype", None) == np.uint8:
        data.check_image_shape(np.shape(images), f"{where}: images")
    else:
        images = data.as_float_images(images, what=f"{where}: images")
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1]:
        raise data.DataError(
            f"{where}: labels of shape {labels.shape} do not match {images.shape[0]} images."
        )
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.number) or np.any(np.mod(labels, 1) != 0):
            raise data.DataError(
                f"{where}: labels must be whole numbers (class indices), got {labels.dtype} "
                "values such as 3.5; pass integer class indices."
            )
    top = num_classes if num_classes is not None else np.inf
    bad = labels[(labels < 0) | (labels >= top)]
    if bad.size:
        raise data.DataError(
            f"{where}: label {bad[0]:g} is outside 0..{top - 1} (the poison was made for "
            f"num_classes={num_classes}); pass labels in that range or make the poison with "
            "the dataset's number of classes."
            if num_classes is not None
            else f"{where}: label {bad[0]:g} is negative; pass class indices 0, 1, ..."
        )
    labels = jax.device_put(labels.astype(np.int32), sharding.replicated(mesh))
    return sharding.place_examples(images, mesh), labels


def craft(
    poison,
    images,
    labels,
    *,
    key,
    batch_size=256,
    ckpt_dir=None,
    start_from=None,
    name="craft",
    progress=True,
    mesh=None,
):
    """Initialises the poison's state and runs `poison.num_epochs` passes of `poison.update`.

    Args:
      poison: a `Poison`.
      images: [N, H, W, C] (jax or numpy), the clean training images: uint8 0..255 or float in
        [0, 1] (see `data.as_float_images`; anything else is refused).
      labels: int [N].
      key: PRNG key; `init` gets ``fold_in(key, 0)``, step s of epoch e ``fold_in`` of both.
      batch_size: examples per `update` call.
      ckpt_dir: optional directory for per-epoch orbax checkpoints (resumed when present).
      start_from: optional checkpoint directory of a finished shorter craft of the same poison,
        key and data, for an `extendable` poison (L2C): when `ckpt_dir` holds no checkpoint,
        crafting continues from its last one (the state, and the history of its epochs).
      mesh: the devices to craft on (`sharding.data_mesh()`, every device, by default): each
        batch is split along its ``data`` axis, per-example state along the examples.

    Returns:
      (state, history): the crafted state and per-epoch means of the update's metrics.
    """
    mesh = mesh or sharding.data_mesh()
    with jax.set_mesh(mesh):
        return _craft(
            poison, images, labels, key, batch_size, ckpt_dir, start_from, name, progress, mesh
        )


def _craft(poison, images, labels, key, batch_size, ckpt_dir, start_from, name, progress, mesh):
    if start_from is not None:
        _check_start(poison, start_from, name)
    images, labels = _inputs(images, labels, "poisons.craft", mesh, poison.num_classes)
    state = _compiled_init(poison)(jax.random.fold_in(key, 0), images, labels)
    history, start = {}, 0
    if not poison.num_epochs:
        return state, history
    manager = checkpointing.Manager(ckpt_dir) if ckpt_dir else None
    if manager is not None and manager.latest_step() is not None:
        state, history, start = manager.restore(state)
        say(f"{name}: resumed from epoch {start} ({manager.directory})")
    elif start_from is not None:
        source = checkpointing.Manager(start_from)
        if source.latest_step() > poison.num_epochs:
            raise ValueError(
                f"{name}: start_from={start_from} holds {source.latest_step()} epochs, more than "
                f"this craft's {poison.num_epochs}; it continues only a shorter craft."
            )
        state, history, start = source.restore(state)
        source.close()
        say(f"{name}: continues the {start}-epoch craft of {start_from}")
    n = labels.shape[0]
    batch_size = min(batch_size, n)
    steps = n // batch_size + (n % batch_size > 0)
    sharding.note_indivisible(f"{name}: batch_size", batch_size, mesh)

    step = _compiled_update(poison)
    bar = progress_bar(
        total=poison.num_epochs * steps, initial=start * steps, desc=name, disable=not progress
    )
    for epoch in range(start, poison.num_epochs):
        ekey = jax.random.fold_in(key, epoch + 1)
        # Every example is visited once per epoch; the last batch wraps around to stay full-size.
        order = jax.random.permutation(jax.random.fold_in(ekey, 0), n)
        order = jnp.concatenate([order, order[: steps * batch_size - n]]).reshape(steps, -1)
        sums = None
        for i in range(steps):
            state, metrics = step(state, images, labels, order[i], jax.random.fold_in(ekey, i + 1))
            sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
            bar.update(1, pending=metrics)
        record = {k: float(v) / steps for k, v in jax.device_get(sums).items()}
        for k, v in record.items():
            history.setdefault(k, []).append(v)
        bar.set_postfix(**{k: f"{v:.3f}" for k, v in record.items()})
        bar.log(
            f"{name} epoch {epoch + 1}/{poison.num_epochs} "
            + " ".join(f"{k}={v:.4f}" for k, v in record.items())
        )
        if manager is not None:
            manager.save(epoch + 1, state, history)
    bar.close()
    if manager is not None:
        manager.close()
    return state, history


def _check_start(poison, start_from, name):
    """Refuses a `start_from` that cannot be continued, before any work."""
    if not poison.extendable:
        raise ValueError(
            f"{name}: start_from is only for extendable poisons (L2C): this poison's epochs "
            "depend on its num_epochs, so a shorter craft is not the start of a longer one."
        )
    if not checkpointing.saved_steps(start_from):
        raise ValueError(
            f"{name}: start_from={start_from} holds no crafting checkpoint; name the checkpoint "
            "directory of a finished shorter craft."
        )


def apply_all(poison, state, images, labels, *, batch_size=1000, mesh=None):
    """The poisoned training set as numpy: (float32 images [N, H, W, C], int32 labels [N]).

    `images` are the clean training images, uint8 0..255 or float in [0, 1], as for `craft`.
    Labels come back from `poison.apply` too: only the substandard *mislabeling* set changes them.
    `mesh` as for `craft`.

    The images start on a 64-byte boundary, so CPU devices use their memory as is when they are
    placed (`training.TrainData`): one copy of the poisoned set in host memory, not two.
    """
    mesh = mesh or sharding.data_mesh()
    with jax.set_mesh(mesh):
        images, labels = _inputs(images, labels, "poisons.apply_all", mesh, poison.num_classes)
        n = labels.shape[0]
        fn = _compiled_apply(poison)
        poisoned = data.aligned_empty(images.shape, np.float32)  # filled in place: one host copy
        new_labels = np.empty((n,), np.int32)
        for i in range(0, n, batch_size):
            idx = jnp.arange(i, min(i + batch_size, n))
            image, label = jax.device_get(fn(state, images, labels, idx))
            if not np.isfinite(image).all():  # per batch: no [N, ...] mask
                raise data.DataError(
                    "The poison produced NaN or inf pixels; check its hyperparameters."
                )
            poisoned[i : i + batch_size], new_labels[i : i + batch_size] = image, label
    return poisoned, new_labels
