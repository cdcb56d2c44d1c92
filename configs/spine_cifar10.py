r"""The spine's evidence run: the L2C CIFAR CNN on a 10k CIFAR-10 subset, clean vs Regions-4 vs P5.

  jaxpoison --config=configs/spine_cifar10.py --workdir=/tmp/spine_cifar10
  jaxpoison --config=configs/spine_cifar10.py:clean30 --workdir=/tmp/spine_clean30
  (append :tiny to the config path for a smoke run)

Standard training of the 5-layer CIFAR CNN of Learning to Confuse (390k parameters), SGD
(lr 0.03, momentum 0.9, weight decay 5e-4, cosine schedule), batch 128, random crop (pad 4) and
flip, 15 epochs, 2 seeds per run, on a class-balanced 10,000-image subset of ../shared/data
cifar10.npz, evaluated on the full 10,000-image test set after every epoch. Poisons: class-wise
Regions-4 and class-wise random noise (P5), both ℓ∞ ε = 8/255.

15 epochs rather than 30 to fit the CPU budget of a 2-core machine. `:clean30` is the evidence
that the trainer trains: the clean run alone, 30 epochs, 1 seed (39 minutes on 2 shared cores).

Expected: see README.md ("Measured") for the numbers of the last run.
"""

import ml_collections


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.name = "CIFAR CNN, 10k CIFAR-10: clean vs Regions-4 vs P5 (linf 8/255)"
    config.seed = 0
    config.data = dict(source="npz", name="cifar10", data_dir="", num_train=10000, num_test=0,
                       val_size=0, crop_padding=4, flip=True)  # fmt: skip
    epsilon = ml_collections.FieldReference(8 / 255)
    config.threat = dict(norm="linf", epsilon=epsilon)
    config.include_clean = True
    config.poisons = {
        "regions4": dict(name="regions", num_patches=4),
        "random_p5": dict(name="random"),
    }
    config.objectives = {"erm": dict(name="erm")}
    config.loss_threshold = 0.5
    config.victim = dict(
        model=dict(name="cnn_cifar", width=1.0),
        epochs=15,
        batch_size=128,
        num_seeds=2,
        seed_strategy="auto",
        eval_batch_size=1000,
        checkpoint_every=1,
        optimizer=dict(learning_rate=0.03, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    )
    if arg not in (None, "", "tiny", "clean30"):
        raise ValueError(f"Unknown config argument {arg!r}; use tiny or clean30.")
    if arg == "clean30":
        config.name = "CIFAR CNN, 10k CIFAR-10: clean, 30 epochs"
        config.poisons = {}
        config.victim.epochs = 30
        config.victim.num_seeds = 1
    if arg == "tiny":
        config.data.num_train = 200
        config.data.num_test = 100
        config.victim.model.width = 0.25
        config.victim.epochs = 2
        config.victim.batch_size = 50
        config.victim.eval_batch_size = 100
    return config
