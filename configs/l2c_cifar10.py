r"""Learning to Confuse (exact meta-gradient) on CIFAR-10, ℓ∞ ε = 0.032, untargeted.

  jaxpoison --config=configs/l2c_cifar10.py --workdir=/tmp/l2c_cifar10
  (append :tiny to the config path for a smoke run on the embedded CIFAR-10 subset; :cpu for
  the reduced run of docs/l2c.md)

A U-Net generator (the paper uses one for CIFAR-10), output 0.032·tanh, trained by the exact
hypergradient of the clean loss of the 5-layer L2C CIFAR CNN after T = 10 unrolled
SGD+momentum steps (batch 64 per step; the victim continues across the trials of a crafting
epoch and restarts every epoch). The paper reports 77% -> 29% test accuracy for its CNN;
victims here are trained on a 10,000-image class-balanced subset.

Expected (docs/l2c.md): :cpu 39.50% -> 37.50% (exact, 256 trials), 39.80% -> 36.43%
(Algorithm 2, 512 trials) and 34.30% (Algorithm 2, 1,024 trials), a weak poison at that size;
this full config is not measured.
"""

import ml_collections


def get_config(arg=None):
    if arg not in (None, "", "tiny", "cpu"):
        raise ValueError(f"Unknown config argument {arg!r}; use tiny, cpu or nothing.")
    config = ml_collections.ConfigDict()
    config.name = "L2C exact, CIFAR-10 subset, linf 0.032"
    config.seed = 0
    config.data = dict(
        source="npz", name="cifar10", num_train=10000, num_test=2000, val_size=0, flip=False
    )
    epsilon = ml_collections.FieldReference(0.032)
    config.threat = dict(norm="linf", epsilon=epsilon)
    config.include_clean = True
    unroll_steps, inner_batch = 10, 64
    config.poisons = {
        "l2c": dict(
            name="l2c",
            method="exact",
            generator=dict(name="unet", width=1.0),
            victim=dict(name="cnn_cifar", width=1.0),
            inner_optimizer=dict(learning_rate=0.01, momentum=0.9, weight_decay=0.0),
            unroll_steps=unroll_steps,
            truncation=unroll_steps,
            remat=True,
            label_specific=False,
            outer_batch_size=256,
            meta_optimizer=dict(name="adam", learning_rate=1e-3),
            victim_reset_every=16,  # one victim per crafting epoch: ceil(10,000 / 640) trials
            num_epochs=5,
            batch_size=unroll_steps * inner_batch,
        )
    }
    config.objectives = {"erm": dict(name="erm")}
    config.loss_threshold = 0.5
    config.victim = dict(
        model=dict(name="cnn_cifar", width=1.0),
        epochs=20,
        batch_size=128,
        num_seeds=2,
        seed_strategy="auto",
        eval_batch_size=500,
        checkpoint_every=1,
        optimizer=dict(learning_rate=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    )
    l2c = config.poisons.l2c
    if arg == "cpu":
        # The reduced run of docs/l2c.md: poison_family's 2,500-image subset and victim (half
        # width, Adam, which learns this small set where SGD 0.01 stays near chance), T = 5
        # steps of 32 images, the crafting victim trained with the victims' optimizer and
        # restarted every 4 crafting epochs (320 steps, about the victims' 234 steps of 64).
        config.data.update(num_train=2500, num_test=1000)
        adam = dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0)
        l2c.generator.width = 0.5
        l2c.victim.width = 0.5
        l2c.inner_optimizer = dict(adam)
        l2c.unroll_steps = l2c.truncation = 5
        l2c.batch_size = 5 * 32
        l2c.outer_batch_size = 128
        l2c.victim_reset_every = 64  # 4 x ceil(2,500 / 160)
        l2c.num_epochs = 16
        config.victim.model.width = 0.5
        config.victim.epochs = 6
        config.victim.batch_size = 64
        config.victim.num_seeds = 3
        config.victim.optimizer = dict(adam, schedule="cosine")
    elif arg == "tiny":
        config.data = dict(source="embedded", name="cifar10", num_train=200, num_test=100)
        l2c.generator = dict(name="unet", width=0.25)
        l2c.victim.width = 0.25
        l2c.unroll_steps = l2c.truncation = 2
        l2c.batch_size = 2 * 16
        l2c.outer_batch_size = 16
        l2c.num_epochs = 1
        config.victim.model.width = 0.25
        config.victim.epochs = 1
        config.victim.batch_size = 50
        config.victim.num_seeds = 1
    return config
