r"""P2 hypocritical poison on a CIFAR-10 subset, beside the clean baseline.

  jaxpoison --config=configs/poisons/hypocritical_cifar10.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run)

PGD minimizing the loss to the true label on a clean-trained CNN (Tao et al. 2021).
ℓ∞, ε = 8/255, class-balanced 2,500 training / 1,000 test images of shared/data/cifar10.npz;
standard training of the CIFAR CNN (width 0.5, Adam, 6 epochs, 3 seeds); clean test accuracy
per epoch, peak and final, in results.json. Settings are shared with configs/poison_family.py
(``config_lib.poison_family``).

Expected: the hypocritical row(s) of the table in docs/poisons.md.
"""

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = config_lib.poison_family(
        "P2 hypocritical poison vs clean (CIFAR-10)", runs=("hypocritical",)
    )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
