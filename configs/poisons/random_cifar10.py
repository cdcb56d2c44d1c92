r"""P5 class-wise random noise on a CIFAR-10 subset, beside the clean baseline.

  jaxpoison --config=configs/poisons/random_cifar10.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run)

One fixed uniform [-ε, ε] pattern per class (Tao et al. 2021).
ℓ∞, ε = 8/255, class-balanced 2,500 training / 1,000 test images of shared/data/cifar10.npz;
standard training of the CIFAR CNN (width 0.5, Adam, 6 epochs, 3 seeds); clean test accuracy
per epoch, peak and final, in results.json. Settings are shared with configs/poison_family.py
(configs/poisons/_common.py).

Expected: the random row(s) of the table in docs/poisons.md.
"""

from pathlib import Path


def get_config(arg=None):
    common = _common()
    runs = common.GROUPS.get("random", ("random",))
    return common.get_config(runs, arg, title="P5 class-wise random noise vs clean (CIFAR-10)")


def _common():
    import importlib.util

    path = Path(__file__).resolve().parent / "_common.py"
    spec = importlib.util.spec_from_file_location("jaxpoison_configs_poisons_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
