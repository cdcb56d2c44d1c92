"""Training data read from disk batch by batch: a tfds dataset's ArrayRecord files through Grain.

For training sets larger than host or device memory. The trainer draws each epoch's order on the
devices exactly as for in-memory data (`data.epoch_batches`), moves it to the host once per epoch,
and a Grain pipeline reads the examples of each global batch, this process only its rows
(`process_rows`), with threads that read ahead while the devices compute. Every record carries
its example index, so a poison's ``apply`` (a sample-wise δ looked up by index, a class-wise δ by
label) runs inside the compiled step, its state on the devices: the poisoned training set is never
materialised. With the same seed a victim trained from a `Stream` has the same history as one
trained on the same images in memory (bit for bit on one CPU device).

    stream = streaming.open_tfds("cifar10", split="train", data_dir=DIR)
    x_test, y_test = streaming.read_split("cifar10", split="test", data_dir=DIR)
    train_data = training.TrainData.create(None, None, x_test, y_test, stream=stream)
    states, history = trainer.fit(train_data, key=key)

`write_tfds` turns arrays (e.g. an ``.npz`` file) into such a dataset.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.data.sources import DataError, from_arrays, tfds_image_label

_DATA = "data"  # the mesh axis of `jaxpoison.sharding` (data cannot import it: it sits above)


@dataclasses.dataclass(frozen=True, eq=False)
class Stream:
    """A training split read example by example from disk, and optionally a poison applied to it.

    Build with `open_tfds`; add a poison with `with_poison`. `Trainer.fit` reads it through
    `epoch` when a `TrainData` carries it.

    Attributes:
      source: random access to the records, ``source[i] -> {image_key: uint8 [H, W, C],
        label_key: int}`` (a ``tfds.data_source`` split).
      image_key, label_key: the record's image and class-label features.
      num_examples, image_shape, num_classes: the split's size, image shape and classes.
      identity: what the records are (dataset, version, split sizes): part of `digest`.
      num_threads: Grain's reader threads; prefetch: batches read ahead.
      poison_apply: a poison's ``apply(state, batch) -> batch`` run in the step, or None.
      poison_state: its state (on the devices), or None.
    """

    source: Any
    image_key: str
    label_key: str
    num_examples: int
    image_shape: tuple
    num_classes: int
    identity: str
    num_threads: int = 8
    prefetch: int = 8
    poison_apply: Any = None
    poison_state: Any = None

    def with_poison(self, poison, state):
        """This stream with `poison`'s ``apply`` and its crafted `state` (e.g. from
        `poisons.craft`): each batch is poisoned inside the step by its example indices."""
        return dataclasses.replace(self, poison_apply=poison.apply, poison_state=state)

    @property
    def digest(self):
        """sha256 of the records' identity and the poison state (a checksum computed on the
        devices, so a sharded δ table is never copied to the host): keys victims' checkpoints."""
        h = hashlib.sha256(self.identity.encode())
        for leaf in jax.tree.leaves(self.poison_state):
            h.update(f"{leaf.dtype}{leaf.shape};".encode())
            h.update(jax.device_get(_checksum(leaf).addressable_data(0)).tobytes())
        return h.hexdigest()

    def read(self, order: np.ndarray) -> Iterator[dict]:
        """Host batches ``{'image': uint8 [S, b, H, W, C], 'label', 'index': int32 [S, b]}`` of
        the examples `order` [S, steps, b] names (S seeds, one batch per step), read by Grain's
        threads ahead of use."""
        s, _, b = order.shape
        flat = np.swapaxes(order, 0, 1).reshape(-1)  # step-major: step, seed, row
        for batch in self._batches(flat, s * b):
            yield {k: v.reshape(s, b, *v.shape[1:]) for k, v in batch.items()}

    def examples(self, indices, *, images=True):
        """``(uint8 images [n, H, W, C], int32 labels [n])`` of the records `indices`, read by
        Grain's threads; with ``images=False`` the images are None and only the labels are kept
        (a pass over the records that holds no images)."""
        kept = ("image", "label") if images else ("label",)
        batches = [{k: b[k] for k in kept} for b in self._batches(np.asarray(indices), 1000)]
        labels = np.concatenate([b["label"] for b in batches])
        return (np.concatenate([b["image"] for b in batches]) if images else None), labels

    def _batches(self, indices, batch_size):
        """Grain's batches of the records `indices`, in order, `num_threads` reading ahead."""
        import grain  # imported here: it takes seconds, and only streamed runs need it

        dataset = grain.MapDataset.source(indices).map(self._record).batch(batch_size)
        options = grain.ReadOptions(
            num_threads=self.num_threads, prefetch_buffer_size=self.prefetch
        )
        return iter(dataset.to_iter_dataset(options))

    def epoch(self, order, mesh) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """One epoch's global batches ``(image uint8 [S, B, H, W, C], label, index int32 [S, B])``
        in `order` [S, steps, B] (the trainer's per-seed permutation, moved to the host here),
        split along `mesh`'s ``data`` axis on B (`jax.make_array_from_process_local_data`),
        each process reading only its rows; whole on every device when the devices do not
        divide B (as the in-memory path computes such batches)."""
        if isinstance(order, jax.Array):  # replicated: every process holds all of it
            order = jax.device_get(order.addressable_data(0))
        order = np.asarray(order)
        s, _, b = order.shape
        split = b % mesh.shape[_DATA] == 0
        rows = (
            process_rows(b, process_index=jax.process_index(), process_count=jax.process_count())
            if split
            else slice(0, b)
        )
        placement = NamedSharding(mesh, P(None, _DATA) if split else P())
        for local in self.read(order[:, :, rows]):
            yield tuple(
                jax.make_array_from_process_local_data(
                    placement, local[k], (s, b, *local[k].shape[2:])
                )
                for k in ("image", "label", "index")
            )

    def _record(self, index):
        record = self.source[int(index)]
        return {
            "image": np.asarray(record[self.image_key], np.uint8),
            "label": np.int32(record[self.label_key]),
            "index": np.int32(index),
        }


def process_rows(batch_size, *, process_index, process_count):
    """The rows of each global batch of `batch_size` that process `process_index` of
    `process_count` reads: contiguous and disjoint, in process order (the order of
    ``jax.devices()``, hence of `sharding.data_mesh`'s ``data`` axis).

    Raises:
      ValueError: when the processes do not divide the batch.
    """
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} cannot be split over {process_count} processes; use a "
            f"multiple of {process_count}."
        )
    per = batch_size // process_count
    return slice(process_index * per, (process_index + 1) * per)


@jax.jit
def _checksum(x):
    """A position-weighted sum of `x`'s bits (uint32, wrapping): changes with any value."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def _builder(name, data_dir):
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for a dataset it cannot find
        raise DataError(
            f"tfds dataset {name!r} is not available in "
            f"data_dir={data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); prepare it there (tfds build, or "
            "streaming.write_tfds for arrays you have)."
        ) from None


def _source(name, split, data_dir):
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    image_key, label_key, num_classes, shape = tfds_image_label(
        builder.info.features, builder.info.supervised_keys, name
    )
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        raise DataError(
            f"tfds dataset {name!r} has no readable split {split!r} in "
            f"data_dir={data_dir or '~/tensorflow_datasets'} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); the streaming path reads ArrayRecord files "
            "(tfds build --file_format=array_record)."
        ) from None
    splits = {k: [v.num_examples, v.num_bytes] for k, v in builder.info.splits.items()}
    identity = json.dumps([builder.info.full_name, split, len(source), splits], sort_keys=True)
    return source, image_key, label_key, num_classes, tuple(shape), identity


def open_tfds(name, *, split="train", data_dir=None, num_threads=8, prefetch=8) -> Stream:
    """A `Stream` over split `split` of the tfds dataset `name` (ArrayRecord files, read with
    ``tfds.data_source``): any image-classification dataset with fixed-size images.

    Raises:
      DataError: the dataset is not prepared in `data_dir`, has no Image and ClassLabel
        feature, or images of varying size.
    """
    source, image_key, label_key, num_classes, shape, identity = _source(name, split, data_dir)
    if not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r}: give a whole number >= 1.")
    return Stream(
        source=source,
        image_key=image_key,
        label_key=label_key,
        num_examples=len(source),
        image_shape=shape,
        num_classes=num_classes,
        identity=identity,
        num_threads=num_threads,
        prefetch=prefetch,
    )


def read_split(name, *, split="test", data_dir=None, num_threads=8):
    """A whole split of a tfds dataset in memory, ``(uint8 [N, H, W, C], int32 [N])``, read
    with Grain's threads (for a test set next to a streamed training set)."""
    stream = open_tfds(name, split=split, data_dir=data_dir, num_threads=num_threads)
    return stream.examples(np.arange(stream.num_examples, dtype=np.int32))


def load_tfds(name, *, data_dir=None, download=False, **_):
    """Reads a tensorflow-datasets image-classification dataset through `tfds.data_source` (no
    TensorFlow needed; Grain's threads decode the records, as `read_split`): any one
    with an Image and a ClassLabel feature (`tfds_image_label`)."""
    if download:
        import tensorflow_datasets as tfds

        tfds.data_source(name, split="train", data_dir=data_dir, download=True)
    try:
        streams = [open_tfds(name, split=s, data_dir=data_dir) for s in ("train", "test")]
    except DataError as e:
        raise DataError(
            f"{e} With internet, set data.download=True once; offline, use data.source='npz' "
            "with a local .npz file or data.source='embedded'."
        ) from None
    arrays = [a for st in streams for a in st.examples(np.arange(st.num_examples))]
    num_classes = streams[0].num_classes
    return from_arrays(name, *arrays, num_classes=num_classes)


def write_tfds(data_dir, name, splits, *, num_classes, version="1.0.0", shard_size=10_000):
    """Writes arrays as a tfds dataset of ArrayRecord files that ``tfds.data_source(name,
    data_dir=data_dir)`` and `open_tfds` read (images PNG-encoded, losslessly; no TensorFlow).

    Args:
      data_dir: the tfds data directory; the files go to ``data_dir/name/version/``.
      name: the dataset's name.
      splits: ``{split: (uint8 images [N, H, W, C], int labels [N])}``.
      num_classes: labels lie in 0..num_classes-1.
      version: the dataset version.
      shard_size: records per ArrayRecord file.

    Returns:
      The dataset's directory.
    """
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter
    from PIL import Image

    shape = None
    for split, (x, y) in splits.items():
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
            raise DataError(
                f"write_tfds: split {split!r} needs uint8 NHWC images and one label per image, "
                f"got {x.dtype} {x.shape} and {np.shape(y)} labels."
            )
        shape = shape or x.shape[1:]
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=shape),
            "label": tfds.features.ClassLabel(num_classes=num_classes),
        }
    )
    directory = Path(data_dir) / name / version
    directory.mkdir(parents=True, exist_ok=True)
    template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    infos = []
    for split, (x, y) in splits.items():
        num_shards = max(1, -(-len(x) // shard_size))
        lengths, size = [], 0
        for shard in range(num_shards):
            path = directory / f"{name}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"
            writer = ArrayRecordWriter(str(path), "group_size:1")
            rows = range(shard * shard_size, min((shard + 1) * shard_size, len(x)))
            for i in rows:
                png = io.BytesIO()
                image = x[i][..., 0] if x.shape[-1] == 1 else x[i]
                Image.fromarray(image).save(png, format="PNG")
                writer.write(features.serialize_example({"image": png.getvalue(), "label": y[i]}))
            writer.close()
            lengths.append(len(rows))
            size += os.path.getsize(path)
        infos.append(
            tfds.core.SplitInfo(
                name=split, shard_lengths=lengths, num_bytes=size, filename_template=None
            )
        )
    tfds.folder_dataset.write_metadata(
        data_dir=directory,
        features=features,
        split_infos=infos,
        filename_template=template,
        check_data=False,
        supervised_keys=("image", "label"),
    )
    return directory


__all__ = ["Stream", "load_tfds", "open_tfds", "process_rows", "read_split", "write_tfds"]
