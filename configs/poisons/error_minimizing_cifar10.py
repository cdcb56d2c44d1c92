r"""Error-minimizing noise, sample- and class-wise on a CIFAR-10 subset, beside the clean baseline.

  jaxpoison --config=configs/poisons/error_minimizing_cifar10.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run;
  --config.victim.epochs=20 for 20-epoch victims)

Bi-level min-min until the crafting CNN (Adam) fits the noise to 99 % (Huang et al. 2021).
ℓ∞, ε = 8/255, class-balanced 2,500 training / 1,000 test images of shared/data/cifar10.npz;
standard training of the CIFAR CNN (width 0.5, Adam, 6 epochs, 3 seeds); clean test accuracy
per epoch, peak and final, in results.json. Settings are shared with configs/poison_family.py
(``config_lib.poison_family``).

Expected (docs/poisons.md): clean 40.0 %, sample-wise 37.6 %, class-wise 26.2 % at 6 epochs;
with 20-epoch victims, clean 52.0 %, sample-wise 40.8 %, class-wise 24.3 %.
"""

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = config_lib.poison_family(
        "error-minimizing noise, sample- and class-wise vs clean (CIFAR-10)",
        runs=("error_minimizing", "error_minimizing_class_wise"),
    )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
