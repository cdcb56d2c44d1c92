r"""In-memory vs streamed (Grain over tfds ArrayRecord) training on all of CIFAR-10.

  nice -n 19 python benchmarks/streaming.py --data_dir=/tmp/stream/tfds   # both, 1 epoch
  nice -n 19 python benchmarks/streaming.py --data_dir=DIR --epochs=2 --modes=stream
  nice -n 19 python benchmarks/streaming.py --data_dir=DIR --modes=read --threads=1

The first run writes shared/data/cifar10.npz as a tfds ArrayRecord dataset ``cifar10_npz`` under
``--data_dir`` (`data.streaming.write_tfds`, PNG-encoded: lossless; skipped when it is there).
Then, for each mode, a fresh process trains the same victim (the CIFAR CNN at width 0.5, one
seed, batch 128, Adam, ``--epochs``) with the same key on the 50,000 training images and tests
it on the 10,000 test images:

- ``memory``: the .npz loaded (`data.load`), the training set on the devices (`TrainData`);
- ``stream``: the training split read from the ArrayRecord files by Grain, batch by batch
  (`data.streaming.open_tfds`), the test split read into memory;
- ``read``: reading alone, one epoch of batches through Grain with ``--threads``, no training.

Each mode prints one ``JSON {...}`` line: ``test_accuracy`` and ``train_loss`` per epoch,
``fit_s`` (the `Trainer.fit` call, compilation included), ``wall_s`` and ``peak_rss_mb`` (the
child's ``ru_maxrss``: interpreter, XLA, data and run). The two histories should be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "cifar10_npz"


def victim(epochs):
    import ml_collections

    return ml_collections.ConfigDict(
        dict(
            model=dict(name="cnn_cifar", width=0.5),
            epochs=epochs,
            batch_size=128,
            optimizer=dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0, schedule="cosine"),
        )
    )


def write(data_dir):
    """cifar10.npz as the tfds dataset `NAME` under `data_dir`, unless it is there."""
    from jaxpoison import data
    from jaxpoison.data import streaming

    if (Path(data_dir) / NAME).is_dir():
        return None
    ds = data.load(source="npz", name="cifar10")
    t0 = time.time()
    splits = {"train": (ds.x_train, ds.y_train), "test": (ds.x_test, ds.y_test)}
    streaming.write_tfds(data_dir, NAME, splits, num_classes=10)
    return time.time() - t0


def read(data_dir, threads):
    """Reads one epoch of training batches (128, a random order) from the files, no training:
    the streamed path's cost on the host."""
    import numpy as np

    from jaxpoison.data import streaming

    stream = streaming.open_tfds(NAME, split="train", data_dir=data_dir, num_threads=threads)
    steps = stream.num_examples // 128
    order = np.random.default_rng(0).permutation(stream.num_examples)[: steps * 128]
    t0 = time.time()
    records = sum(batch["index"].size for batch in stream.read(order.reshape(1, steps, 128)))
    seconds = time.time() - t0
    return {"mode": "read", "threads": threads, "records": records, "read_s": round(seconds, 1)}


def run(mode, data_dir, epochs):
    """Trains one victim in this process; returns its measurements."""
    import jax

    from jaxpoison import data, training
    from jaxpoison.data import streaming

    t0 = time.time()
    if mode == "memory":
        ds = data.load(source="npz", name="cifar10")
        train_data = training.train_data_from(ds.x_train, ds.y_train, ds)
    else:
        stream = streaming.open_tfds(NAME, split="train", data_dir=data_dir)
        x_test, y_test = streaming.read_split(NAME, split="test", data_dir=data_dir)
        train_data = training.TrainData.create(None, None, x_test, y_test, stream=stream)
    loaded = time.time() - t0
    trainer = training.Trainer.from_config(victim(epochs), num_classes=10, image_shape=(32, 32, 3))
    t1 = time.time()
    _, history = trainer.fit(train_data, key=jax.random.key(0), progress=False)
    return {
        "mode": mode,
        "epochs": epochs,
        "test_accuracy": [a[0] for a in history["test/accuracy"]],
        "train_loss": [a[0] for a in history["train/loss"]],
        "load_s": round(loaded, 1),
        "fit_s": round(time.time() - t1, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="tfds data directory (not the repo)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument(
        "--modes", default="memory,stream", help="memory, stream, read (reading alone)"
    )
    parser.add_argument("--threads", type=int, default=8, help="Grain's reader threads (read)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "read":
            result = read(args.data_dir, args.threads)
        else:
            result = run(args.child, args.data_dir, args.epochs)
        print("JSON " + json.dumps(result), flush=True)
        return
    seconds = write(args.data_dir)
    if seconds is not None:
        print(f"wrote {NAME} to {args.data_dir} in {seconds:.0f} s", flush=True)
    results = []
    for mode in args.modes.split(","):
        t0 = time.time()
        with tempfile.TemporaryFile("w+") as out:
            child = [sys.executable, __file__, f"--child={mode}", f"--data_dir={args.data_dir}"]
            child += [f"--epochs={args.epochs}", f"--threads={args.threads}"]
            proc = subprocess.Popen(child, stdout=out, text=True)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
            out.seek(0)
            line = [x for x in out.read().splitlines() if x.startswith("JSON ")]
        if os.waitstatus_to_exitcode(status) or not line:
            raise SystemExit(f"{mode} failed with status {status}")
        result = json.loads(line[0][5:])
        result["wall_s"] = round(time.time() - t0, 1)
        result["peak_rss_mb"] = round(usage.ru_maxrss / 1024)
        results.append(result)
        print("JSON " + json.dumps(result), flush=True)
    trained = [r for r in results if r["mode"] != "read"]
    if len(trained) == 2:
        same = trained[0]["test_accuracy"] == trained[1]["test_accuracy"]
        print(f"same test accuracy in both modes: {same}")


if __name__ == "__main__":
    main()
