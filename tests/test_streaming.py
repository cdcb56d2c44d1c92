"""The Grain streaming path: a tfds ArrayRecord dataset read batch by batch trains the same
victims as the same images in memory, each process reads its rows, poisons apply by index."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, poisons, threat, training
from jaxpoison.data import streaming
from jaxpoison.poisons.base import Poison, SampleWiseState, apply_sample_wise

pytestmark = pytest.mark.usefixtures("fast_compiles")

NAME = "embedded_cifar10"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """256 training and 100 test images of the embedded CIFAR-10 subset as a real tfds
    ArrayRecord dataset (what `tfds build` writes), and the arrays themselves."""
    ds = data.load(source="embedded", name="cifar10", num_train=256, num_test=100)
    data_dir = tmp_path_factory.mktemp("tfds")
    splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    streaming.write_tfds(data_dir, NAME, splits, num_classes=10)
    return str(data_dir), ds


@pytest.fixture(scope="module")
def trainer():
    victim = ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.25),
            epochs=2,
            batch_size=32,
            optimizer=dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
        )
    )
    return training.Trainer.from_config(victim, num_classes=10, image_shape=(32, 32, 3))


@pytest.fixture(scope="module")
def reference(written, trainer):
    """The history of 2 victims streamed for 2 epochs with key 3."""
    data_dir, ds = written
    stream = streaming.open_tfds(NAME, data_dir=data_dir, num_threads=4)
    return trainer.fit(streamed(stream, ds), key=jax.random.key(3), num_seeds=2, progress=False)[1]


def in_memory(x, y, ds):
    return training.train_data_from(x, y, ds, crop_padding=2, flip=True)


def streamed(stream, ds):
    return training.TrainData.create(
        None, None, ds.x_test, ds.y_test, stream=stream, crop_padding=2, flip=True
    )


def test_stream_trains_the_victims_of_the_same_images_in_memory(written, trainer, reference):
    data_dir, ds = written
    loaded = data.load(source="tfds", name=NAME, data_dir=data_dir)  # any tfds classification set
    np.testing.assert_array_equal(loaded.x_train, ds.x_train)  # the files hold the images
    x_test, y_test = streaming.read_split(NAME, split="test", data_dir=data_dir)
    np.testing.assert_array_equal(x_test, ds.x_test)
    np.testing.assert_array_equal(y_test, ds.y_test)

    stream = streaming.open_tfds(NAME, data_dir=data_dir, num_threads=4)
    assert (stream.num_examples, stream.image_shape, stream.num_classes) == (256, (32, 32, 3), 10)
    _, want = trainer.fit(
        in_memory(loaded.x_train, loaded.y_train, ds),
        key=jax.random.key(3),
        num_seeds=2,
        progress=False,
    )
    assert set(reference) == set(want)
    for k in want:
        np.testing.assert_array_equal(reference[k], want[k], err_msg=k)
    assert not np.array_equal(
        np.asarray(want["train/loss"])[:, 0], np.asarray(want["train/loss"])[:, 1]
    )


def test_a_stopped_streamed_run_resumes_from_its_checkpoint(
    written, trainer, reference, tmp_path, capfd
):
    data_dir, ds = written
    key = jax.random.key(3)
    first = streamed(streaming.open_tfds(NAME, data_dir=data_dir), ds)
    again = streamed(streaming.open_tfds(NAME, data_dir=data_dir), ds)  # a restarted process
    assert trainer.checkpoint_dir(tmp_path, first, key=key, num_seeds=2) == (
        trainer.checkpoint_dir(tmp_path, again, key=key, num_seeds=2)
    )
    trainer.fit(first, key=key, num_seeds=2, ckpt_dir=tmp_path, epochs=1, progress=False)
    _, resumed = trainer.fit(again, key=key, num_seeds=2, ckpt_dir=tmp_path, progress=False)
    assert "resumed from epoch 1" in "".join(capfd.readouterr())
    for k in reference:
        np.testing.assert_array_equal(resumed[k], reference[k], err_msg=k)


def test_a_sample_wise_poison_is_applied_by_index_in_the_step(written, trainer):
    data_dir, ds = written
    linf = threat.make(epsilon=8 / 255)
    delta = linf.epsilon * jax.random.rademacher(jax.random.key(0), (256, 32, 32, 3), float)
    poison = Poison(init=None, update=None, apply=apply_sample_wise(linf), num_classes=10)
    state = SampleWiseState(delta=delta.astype(np.float32))
    x_poisoned, y_poisoned = poisons.apply_all(poison, state, ds.x_train, ds.y_train)
    assert not np.array_equal(x_poisoned, data.as_float_images(ds.x_train))

    stream = streaming.open_tfds(NAME, data_dir=data_dir, num_threads=4)
    poisoned = stream.with_poison(poison, state)
    assert poisoned.digest != stream.digest
    key = jax.random.key(4)
    _, want = trainer.fit(
        in_memory(x_poisoned, y_poisoned, ds), key=key, num_seeds=2, epochs=1, progress=False
    )
    _, got = trainer.fit(streamed(poisoned, ds), key=key, num_seeds=2, epochs=1, progress=False)
    _, clean = trainer.fit(streamed(stream, ds), key=key, num_seeds=2, epochs=1, progress=False)
    np.testing.assert_array_equal(got["train/loss"], want["train/loss"])
    np.testing.assert_array_equal(got["test/accuracy"], want["test/accuracy"])
    assert got["train/loss"] != clean["train/loss"]  # the δ was added


def test_each_process_reads_its_own_disjoint_rows_of_every_batch(written):
    data_dir, ds = written
    assert streaming.process_rows(64, process_index=1, process_count=2) == slice(32, 64)
    with pytest.raises(ValueError, match="multiple of 4"):
        streaming.process_rows(30, process_index=0, process_count=4)
    stream = streaming.open_tfds(NAME, data_dir=data_dir, num_threads=2)
    order = np.asarray(
        jax.vmap(lambda k: data.epoch_batches(k, 256, 16))(jax.random.split(jax.random.key(0), 2))
    )  # [seeds 2, steps 16, batch 16]
    reads = [
        list(stream.read(order[:, :, streaming.process_rows(16, process_index=p, process_count=2)]))
        for p in range(2)
    ]
    assert len(reads[0]) == len(reads[1]) == 16
    for step, (first, second) in enumerate(zip(*reads, strict=True)):
        idx = np.concatenate([first["index"], second["index"]], axis=1)  # [seeds, batch]
        np.testing.assert_array_equal(idx, order[:, step])
        assert not set(first["index"][0]) & set(second["index"][0])
        images = np.concatenate([first["image"], second["image"]], axis=1)
        np.testing.assert_array_equal(images, ds.x_train[idx])
        np.testing.assert_array_equal(
            np.concatenate([first["label"], second["label"]], 1), ds.y_train[idx]
        )


def test_what_is_not_an_image_classification_dataset_is_refused(tmp_path, written, trainer):
    import tensorflow_datasets as tfds

    text = tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(num_classes=2)}
    )
    with pytest.raises(data.DataError, match="one Image and one ClassLabel"):
        data.sources.tfds_image_label(text, ("text", "label"), "imdb")
    sizes = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=5),
        }
    )
    with pytest.raises(data.DataError, match="varying size"):
        data.sources.tfds_image_label(sizes, ("image", "label"), "imagenet2012")
    with pytest.raises(data.DataError, match="not available"):
        streaming.open_tfds(NAME, data_dir=str(tmp_path))
    data_dir, ds = written
    stream = streaming.open_tfds(NAME, data_dir=data_dir)
    with pytest.raises(ValueError, match="epochs=0"):
        trainer.fit(streamed(stream, ds), key=jax.random.key(0), epochs=0)
    with pytest.raises(data.DataError, match="either as x_train"):
        training.TrainData.create(ds.x_train, ds.y_train, ds.x_test, ds.y_test, stream=stream)


TWO_PROCESS_RUN = """
import json, sys
import jax, ml_collections
from jaxpoison import distributed, training
from jaxpoison.data import streaming

data_dir, port, process_id, num_processes = sys.argv[1:]
if num_processes == "2":
    distributed.initialize(f"127.0.0.1:{port}", 2, int(process_id))
victim = ml_collections.ConfigDict(dict(model=dict(name="mlp", width=0.25), epochs=1,
    batch_size=32, optimizer=dict(learning_rate=0.05, momentum=0.9, schedule="cosine")))
trainer = training.Trainer.from_config(victim, num_classes=10, image_shape=(32, 32, 3))
x_test, y_test = streaming.read_split("%s", split="test", data_dir=data_dir)
stream = streaming.open_tfds("%s", data_dir=data_dir, num_threads=2)
td = training.TrainData.create(None, None, x_test, y_test, stream=stream, crop_padding=2)
_, history = trainer.fit(td, key=jax.random.key(5), num_seeds=2, progress=False)
if num_processes == "1":  # the same images in memory, on the same two devices
    ds = streaming.read_split("%s", split="train", data_dir=data_dir)
    td = training.TrainData.create(*ds, x_test, y_test, crop_padding=2)
    _, memory = trainer.fit(td, key=jax.random.key(5), num_seeds=2, progress=False)
    history = {"stream": history, "memory": memory}
if jax.process_index() == 0:
    print("JSON " + json.dumps(history))
""" % ((NAME,) * 3)


@pytest.mark.slow
def test_two_processes_stream_the_history_of_one(written):
    """Two processes on 127.0.0.1 (gloo), one CPU device each, each reading its half of every
    batch, train the victims of one process with two devices reading whole batches, which are
    those of the same images in memory."""
    import os
    import socket
    import subprocess
    import sys

    data_dir, _ = written
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "JAXPOISON_HUGE_PAGES": "0"}
    one_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

    def start(process_id, count, run_env):
        args = [sys.executable, "-c", TWO_PROCESS_RUN, data_dir, port, str(process_id), count]
        return subprocess.Popen(
            args, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def history(proc):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        return json.loads([x for x in out.splitlines() if x.startswith("JSON ")][0][5:])

    two = [start(i, "2", env) for i in (0, 1)]
    got = history(two[0])
    _, err = two[1].communicate(timeout=600)
    assert two[1].returncode == 0, err[-2000:]
    one = history(start(0, "1", one_env))
    for k in one["memory"]:
        np.testing.assert_array_equal(one["stream"][k], one["memory"][k], err_msg=k)
        np.testing.assert_array_equal(got[k], one["stream"][k], err_msg=k)
