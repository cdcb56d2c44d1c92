r"""Learning to Confuse on CIFAR-10, ℓ∞ ε = 0.032, untargeted.

  jaxpoison --config=configs/l2c_cifar10.py --workdir=/tmp/l2c_cifar10
  (append :tiny to the config path for a smoke run on the embedded CIFAR-10 subset; :cpu for
  the reduced run of docs/l2c.md; victims=cnn_cifar+mlp+vgg11+resnet18 trains victims of
  several architectures on the clean and the L2C set, the transfer study)

A U-Net generator (the paper uses one for CIFAR-10), output 0.032·tanh, trained against the
5-layer L2C CIFAR CNN by Algorithm 2 of the paper (its released single loop: one look-ahead
generator step per victim step, T = 10 SGD+momentum steps of 64 images per trial); the
crafting victim continues across trials and restarts every 320 trials, so the generator meets
victims at every stage of a 20-epoch training. ``--config.poisons.l2c.method=exact`` takes one
exact hypergradient through the 10 unrolled steps per trial instead (the :cpu run). The paper
reports 77% -> 29% test accuracy for its CNN; victims here are trained on a 10,000-image
class-balanced subset.

Expected (docs/l2c.md), a weak poison at these budgets: the full config 56.68% -> 51.23% for
the CNN (640 trials, about an hour of crafting on 2 CPU cores), ResNet-18 53.85% -> 48.58%;
:cpu 39.50% -> 37.50% (exact, 256 trials), 39.80% -> 36.43% (Algorithm 2, 512 trials) and
34.30% (Algorithm 2, 1,024 trials).
"""

import ml_collections

from jaxpoison import config_args

# Victim architectures of the transfer study (``victims=``); ``cnn_cifar`` takes the width of
# the config's own victim (the crafting architecture), the others are at CPU-sized widths.
VICTIMS = {
    "cnn_cifar": dict(name="cnn_cifar"),
    "mlp": dict(name="mlp", width=0.5),
    "vgg11": dict(name="vgg11", width=0.25),
    "resnet18": dict(name="resnet18", width=0.25),
}


def get_config(arg=None):
    flags, values = config_args.parse(
        arg, flags=("tiny", "cpu"), fields={"victims": config_args.names(VICTIMS)}
    )
    if len(flags) > 1:
        raise ValueError(f"Config argument {arg!r}: choose one of tiny and cpu.")
    arg = next(iter(flags), None)
    config = ml_collections.ConfigDict()
    config.name = "L2C, CIFAR-10 subset, linf 0.032"
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
            method="algorithm2",
            generator=dict(name="unet", width=1.0),
            victim=dict(name="cnn_cifar", width=1.0),
            inner_optimizer=dict(learning_rate=0.01, momentum=0.9, weight_decay=0.0),
            unroll_steps=unroll_steps,
            truncation=unroll_steps,
            remat=True,
            label_specific=False,
            outer_batch_size=256,
            meta_optimizer=dict(name="adam", learning_rate=1e-3),
            # A crafting victim is trained for 320 trials of 10 steps of 64 images (20 epochs of
            # the 10k images, as long as the victims below) before the next one starts.
            victim_reset_every=320,
            num_epochs=40,  # 640 trials: two crafting victims
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
        # The reduced run of docs/l2c.md, with the exact hypergradient: poison_family's
        # 2,500-image subset and victim (half width, Adam, which learns this small set where
        # SGD 0.01 stays near chance), T = 5 steps of 32 images, the crafting victim trained
        # with the victims' optimizer and restarted every 4 crafting epochs (320 steps, about
        # the victims' 234 steps of 64).
        config.data.update(num_train=2500, num_test=1000)
        adam = dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0)
        l2c.generator.width = 0.5
        l2c.victim.width = 0.5
        l2c.inner_optimizer = dict(adam)
        l2c.unroll_steps = l2c.truncation = 5
        l2c.batch_size = 5 * 32
        l2c.outer_batch_size = 128
        l2c.method = "exact"
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
    if "victims" in values:
        scale = 0.25 if arg == "tiny" else 1.0
        config.victims = {
            name: dict(model=dict(VICTIMS[name], width=_width(name, config, scale)))
            for name in values["victims"]
        }
    return config


def _width(name, config, scale):
    """A transfer victim's width: the crafting architecture's own, the others' scaled."""
    if name == "cnn_cifar":
        return config.victim.model.width
    return VICTIMS[name]["width"] * scale
