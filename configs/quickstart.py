r"""Quickstart: class-wise Regions-4 poison vs clean data on the embedded CIFAR-10 subset.

  jaxpoison --config=configs/quickstart.py --workdir=/tmp/quickstart
  (append :tiny to the config path for a smoke run)

Crafts Regions-4 (Sandoval-Segura et al. 2022; 2x2 patches per class, each channel ±8/255),
trains the 5-layer CIFAR CNN of Learning to Confuse (at half width, so the whole run takes a few
minutes on 2 CPU cores) with standard training on the clean and on the poisoned 2,500 training
images (3 seeds each, 10 epochs), and reports clean test accuracy on the embedded 1,000 test
images.

Adam (lr 1e-3, cosine) rather than SGD: on this small set the no-BatchNorm CNN underfits with SGD
in 10 epochs (measured 2026-11-22: SGD lr 0.05 gave clean 32.9 ± 6.3% vs poisoned 27.7 ± 2.5%;
Adam gave clean 39.5 ± 0.9% vs poisoned 32.3 ± 1.8%, 3 seeds each).

Expected: clean 39.5 ± 0.9%, Regions-4 32.3 ± 1.8% final clean test accuracy (commit adc6977
settings with Adam, measured on 2 shared CPU cores in 12 min at load ~8).
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.name = "quickstart: Regions-4 vs clean (embedded CIFAR-10 subset)"
    config.seed = 0
    config.data = dict(
        source="embedded",
        name="cifar10",
        data_dir="",
        num_train=0,
        num_test=0,
        val_size=0,
        crop_padding=0,
        flip=True,
    )
    epsilon = ml_collections.FieldReference(8 / 255)
    config.threat = dict(norm="linf", epsilon=epsilon)
    config.include_clean = True
    config.poisons = {"poisoned": dict(name="regions", num_patches=4)}
    config.objectives = {"erm": dict(name="erm")}
    config.loss_threshold = 0.5
    config.victim = dict(
        model=dict(name="cnn_cifar", width=0.5),
        epochs=10,
        batch_size=128,
        num_seeds=3,
        seed_strategy="auto",
        eval_batch_size=500,
        checkpoint_every=5,
        optimizer=dict(
            name="adam", learning_rate=1e-3, momentum=0.9, weight_decay=0.0, schedule="cosine"
        ),
    )
    if arg == "tiny":
        config.data.num_train = 200
        config.data.num_test = 100
        config.victim.model.width = 0.25
        config.victim.epochs = 2
        config.victim.batch_size = 50
        config.victim.num_seeds = 2
        config.victim.checkpoint_every = 1
    return config
