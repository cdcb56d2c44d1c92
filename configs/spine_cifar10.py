r"""The spine's evidence run: the L2C CIFAR CNN on a 10k CIFAR-10 subset, clean vs Regions-4 vs P5.

  jaxpoison --config=configs/spine_cifar10.py --workdir=/tmp/spine_cifar10
  jaxpoison --config=configs/spine_cifar10.py:clean30 --workdir=/tmp/spine_clean30
  (append :tiny to the config path for a smoke run)

Standard training of the CNN for the data (``model.name='auto'``: on CIFAR-10 the 5-layer
CIFAR CNN of Learning to Confuse, 390k parameters), SGD (lr 0.03, momentum 0.9, weight decay
5e-4, cosine schedule), batch 128, random crop (pad 4) and flip, 15 epochs, 2 seeds per run,
on a class-balanced 10,000-image subset of ../shared/data/cifar10.npz, evaluated on the full
10,000-image test set after every epoch. Poisons: class-wise Regions-4 and class-wise random
noise (P5), both ℓ∞ ε = 8/255.

15 epochs rather than 30 to fit the CPU budget of a 2-core machine. `:clean30` is the evidence
that the trainer trains: the clean run alone, 30 epochs, 1 seed (39 minutes on 2 shared cores).

Expected: see docs/results/2026-11-quickstart-and-spine.md for the numbers of the last run.
"""

import ml_collections

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("clean30",))
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = "CIFAR CNN, 10k CIFAR-10: clean vs Regions-4 vs P5 (linf 8/255)"
    config.seed = 0
    config.data = config_lib.data("cifar10", num_train=10000, crop_padding=4, flip=True)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(8 / 255))
    config.include_clean = True
    config.poisons = {
        "regions4": dict(name="regions", num_patches=4),
        "random_p5": dict(name="random"),
    }
    config.objectives = {"erm": dict(name="erm")}
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    config.victim = config_lib.victim(
        config_lib.auto_model(1.0),
        epochs=15,
        batch_size=128,
        num_seeds=2,
        optimizer=config_lib.optimizer(learning_rate=0.03),
        eval_batch_size=1000,
    )
    if "clean30" in chosen:
        # The clean run alone: `select` cannot choose no poison, so the specs go.
        config.name = "CIFAR CNN, 10k CIFAR-10: clean, 30 epochs"
        config.poisons = {}
        config.victim.epochs = 30
        config.victim.num_seeds = 1
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
