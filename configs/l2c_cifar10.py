r"""Learning to Confuse on CIFAR-10, ℓ∞ ε = 0.032, untargeted.

  jaxpoison --config=configs/l2c_cifar10.py --workdir=/tmp/l2c_cifar10
  (append :tiny to the config path for a smoke run; :cpu for the reduced run of docs/l2c.md;
  :transfer also trains victims of other architectures on the clean and the L2C set, the
  transfer study: every one of VICTIMS, or some with
  --config.select.victims="('cnn_cifar','resnet18')"; e.g. :cpu,transfer)

A U-Net generator (the paper uses one for CIFAR-10), output 0.032·tanh, trained against the
5-layer L2C CIFAR CNN by Algorithm 2 of the paper (its released single loop: one look-ahead
generator step per victim step, T = 10 SGD+momentum steps of 64 images per trial); the
crafting victim continues across trials and restarts every 320 trials, so the generator meets
victims at every stage of a 20-epoch training (``config_lib.l2c_cifar10_poison``).
``--config.poisons.l2c.method=exact`` takes one exact hypergradient through the 10 unrolled
steps per trial instead (the :cpu run). The paper reports 77% -> 29% test accuracy for its CNN;
victims here are trained on a 10,000-image class-balanced subset.

Expected (docs/l2c.md), a weak poison at these budgets: the full config 56.68% -> 51.23% for
the CNN (640 trials, about an hour of crafting on 2 CPU cores), ResNet-18 53.85% -> 48.58%;
:cpu 39.50% -> 37.50% (exact, 256 trials), 39.80% -> 36.43% (Algorithm 2, 512 trials) and
34.30% (Algorithm 2, 1,024 trials).
"""

import ml_collections

from jaxpoison import config_lib

# Victim architectures of the transfer study (preset ``transfer``); ``cnn_cifar`` takes the
# width of the config's own victim (the crafting architecture), the others are at CPU-sized
# widths.
VICTIMS = {
    "cnn_cifar": dict(name="cnn_cifar"),
    "mlp": dict(name="mlp", width=0.5),
    "vgg11": dict(name="vgg11", width=0.25),
    "resnet18": dict(name="resnet18", width=0.25),
}


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("cpu", "transfer"))
    cpu = "cpu" in chosen
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = "L2C, CIFAR-10 subset, linf 0.032"
    config.seed = 0
    config.data = config_lib.data("cifar10", num_train=10000, num_test=2000)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(0.032))
    config.include_clean = True
    config.poisons = {"l2c": config_lib.l2c_cifar10_poison(cpu=cpu)}
    config.objectives = {"erm": dict(name="erm")}
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    config.victim = config_lib.victim(
        dict(name="cnn_cifar", width=1.0),
        epochs=20,
        batch_size=128,
        num_seeds=2,
        optimizer=config_lib.optimizer(learning_rate=0.01),
    )
    if cpu:
        # The reduced run of docs/l2c.md: poison_family's 2,500-image subset and victim (half
        # width, Adam, which learns this small set where SGD 0.01 stays near chance).
        config.data.update(num_train=2500, num_test=1000)
        config.victim.update(epochs=6, batch_size=64, num_seeds=3, optimizer=config_lib.ADAM)
        config.victim.model.width = 0.5
    if "transfer" in chosen:
        own = config.victim.model.width
        config.victims = {
            name: dict(model=dict(model, width=own if name == "cnn_cifar" else model["width"]))
            for name, model in VICTIMS.items()
        }
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
