r"""Clean vs class-wise random noise and Regions-4, the training set streamed from disk.

  jaxpoison --config=configs/stream_tfds.py --workdir=/tmp/stream \
      --config.data.data_dir=DIR [--config.data.name=cifar10_npz]
  (append :tiny to the config path for a smoke run: the first 200 training and 100 test
  records (data.num_train / num_test: the first records of a stream, not class-balanced),
  2 epochs, a CNN of width 0.125, batch 50)

The streamed trainer (``config.trainer='streamed'``, `jaxpoison.trainers.streamed`) reads the
training split of a prepared tfds dataset (ArrayRecord files) batch by batch with Grain and
applies each poison inside the training step by label, so neither the clean nor the poisoned
training set is ever in memory; the test split is read into memory. It trains the quickstart's
victim (the CNN for the data's shape, width 0.5, Adam 3e-3 with a cosine decay, batch 64,
random flips) on the clean records and on them with P5 class-wise random noise and Regions-4
(ℓ∞ 8/255, both made from the key: nothing is crafted), 1 seed, 10 epochs.

Make DIR from arrays (uint8 NHWC images, int labels) with `data.streaming.write_tfds`, e.g.
all of CIFAR-10 from shared/data/cifar10.npz as the dataset ``cifar10_npz`` (about 2 minutes)::

  python -c "from jaxpoison import data; from jaxpoison.data import streaming; \
    ds = data.load(source='npz', name='cifar10'); streaming.write_tfds('DIR', 'cifar10_npz', \
    {'train': (ds.x_train, ds.y_train), 'test': (ds.x_test, ds.y_test)}, num_classes=10)"

(``python benchmarks/streaming.py --data_dir=DIR`` writes the same), or any tfds
image-classification dataset built as ArrayRecord (``tfds build --file_format=array_record``).
Slice the splits with ``--config.stream.train_split='train[:10%]'`` (or
``--config.data.num_train=N``); poisons crafted on a subset of records read into memory
(class-wise ones) take ``--config.stream.craft_subset=N``; ``--config.stream.num_threads``
sets Grain's readers.

Expected: the in-memory grid's numbers for the same config (``--config.trainer=grid
--config.data.source=npz --config.data.name=cifar10``). Measured 2026-12-07 (commit 3cfe88d) on
all of CIFAR-10 with ``--config.victim.epochs=2 --config.select.poisons="('random',)"``: clean
62.65 %, random noise 61.43 % final test accuracy (1 seed), the grid's histories exactly; 468 s
and 867 MB peak RSS streamed vs 380 s and 1,724 MB in memory on 2 busy CPU cores
(docs/results/2026-12-scale-out.md, Streaming). The full config (10 epochs, Regions-4 too) is
not measured.
"""

import ml_collections

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = ml_collections.ConfigDict()
    config.trainer = "streamed"
    config.name = "streamed: random noise and Regions-4 vs clean (tfds ArrayRecord)"
    config.seed = 0
    config.data = config_lib.data("cifar10_npz", source="tfds", flip=True)
    config.stream = dict(train_split="train", test_split="test", num_threads=8, craft_subset=0)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(8 / 255))
    config.include_clean = True
    config.poisons = {
        "random": dict(name="random"),
        "regions": dict(name="regions", num_patches=4),
    }
    config.objectives = {"erm": dict(name="erm")}
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    config.victim = config_lib.victim(
        config_lib.auto_model(0.5),
        epochs=10,
        batch_size=64,
        num_seeds=1,
        optimizer=config_lib.optimizer("adam", learning_rate=3e-3, weight_decay=0.0),
        checkpoint_every=1,
    )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
