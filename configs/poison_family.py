r"""Every delusive poison of the registry on one CIFAR-10 subset, beside the clean baseline.

  jaxpoison --config=configs/poison_family.py --workdir=/tmp/poison_family
  (append :tiny to the config path for a smoke run; the presets :static and :crafted split
  the run in two workdirs: the poisons that need no crafting model plus clean, and the others
  without clean; --config.victim.epochs=20 trains the victims 20 epochs instead of 6, and
  --config.select.poisons="('random','regions')" keeps some runs)

Crafts P5 random noise, Regions-1/4/16, low-frequency noise, P1 adversarial, error-maximizing,
MI-FGSM, P2 hypocritical, P3/P4 universal, error-minimizing (sample- and class-wise), and the
substandard Noise and Mislabeling sets on a class-balanced 2,500-image subset of
shared/data/cifar10.npz (ℓ∞, ε = 8/255), trains the quickstart's victim (the CNN for the data,
on CIFAR-10 the 5-layer CIFAR CNN, width 0.5, Adam) with standard training on each (3 seeds, 6
epochs) and reports clean test accuracy on 1,000 class-balanced test images; ``summary`` is
keyed by run name = poison name (the Regions and class-wise variants have a suffix). Crafting
step counts are reduced from the papers' (``config_lib.FAMILY_SPECS``) so the whole run fits 2
CPU cores in under an hour.

Expected: the table in docs/poisons.md (measured on 2 shared CPU cores).
"""

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("static", "crafted"))
    if {"static", "crafted"} <= chosen:
        raise ValueError(f"Config argument {arg!r}: static and crafted exclude each other.")
    config = config_lib.poison_family("poison family: every delusive poison vs clean (CIFAR-10)")
    if "static" in chosen:
        config.select.poisons = config_lib.STATIC
    if "crafted" in chosen:
        config.select.poisons = tuple(r for r in config.poisons if r not in config_lib.STATIC)
        config.include_clean = False
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
