r"""Every delusive poison of the registry on one CIFAR-10 subset, beside the clean baseline.

  jaxpoison --config=configs/poison_family.py --workdir=/tmp/poison_family
  (append :tiny to the config path for a smoke run; :static / :crafted split the run in two:
  the poisons that need no crafting model plus clean, and the others; :long trains the victims
  20 epochs instead of 6; :only=<run>+<run> keeps some runs, e.g. :long,only=random+regions)

Crafts P5 random noise, Regions-1/4/16, low-frequency noise, P1 adversarial, error-maximizing,
MI-FGSM, P2 hypocritical, P3/P4 universal, error-minimizing (sample- and class-wise), and the
substandard Noise and Mislabeling sets on a class-balanced 2,500-image subset of
shared/data/cifar10.npz (ℓ∞, ε = 8/255), trains the 5-layer CIFAR CNN (width 0.5, Adam, the
quickstart's victim) with standard training on each (3 seeds, 6 epochs) and reports clean test
accuracy on 1,000 class-balanced test images; ``summary`` is keyed by run name = poison name
(the Regions and class-wise variants have a suffix). Crafting step counts are reduced from the
papers' (see configs/poisons/_common.py) so the whole run fits 2 CPU cores in under an hour.

Expected: the table in docs/poisons.md (measured on 2 shared CPU cores).
"""

from pathlib import Path


def get_config(arg=None):
    common = _common()
    return common.get_config(
        tuple(common.SPECS), arg, title="poison family: every delusive poison vs clean (CIFAR-10)"
    )


def _common():
    import importlib.util

    path = Path(__file__).resolve().parent / "poisons" / "_common.py"
    spec = importlib.util.spec_from_file_location("jaxpoison_configs_poisons_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
