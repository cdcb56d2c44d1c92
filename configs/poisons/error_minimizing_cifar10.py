r"""Error-minimizing noise, sample- and class-wise on a CIFAR-10 subset, beside the clean baseline.

  jaxpoison --config=configs/poisons/error_minimizing_cifar10.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run, :long for 20-epoch victims)

Bi-level min-min until the crafting CNN (Adam) fits the noise to 99 % (Huang et al. 2021).
ℓ∞, ε = 8/255, class-balanced 2,500 training / 1,000 test images of shared/data/cifar10.npz;
standard training of the CIFAR CNN (width 0.5, Adam, 6 epochs, 3 seeds); clean test accuracy
per epoch, peak and final, in results.json. Settings are shared with configs/poison_family.py
(configs/poisons/_common.py).

Expected (docs/poisons.md): clean 40.0 %, sample-wise 37.6 %, class-wise 26.2 % at 6 epochs;
with :long, clean 52.0 %, sample-wise 40.8 %, class-wise 24.3 %.
"""

from pathlib import Path


def get_config(arg=None):
    common = _common()
    runs = common.GROUPS.get("error_minimizing", ("error_minimizing",))
    return common.get_config(
        runs, arg, title="error-minimizing noise, sample- and class-wise vs clean (CIFAR-10)"
    )


def _common():
    import importlib.util

    path = Path(__file__).resolve().parent / "_common.py"
    spec = importlib.util.spec_from_file_location("jaxpoison_configs_poisons_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
