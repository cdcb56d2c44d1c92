r"""Learning speed vs poison effectiveness (Sandoval-Segura et al. 2022, Figures 1 and 2).

  jaxpoison --config=configs/learning_speed.py --workdir=/tmp/learning_speed
  jaxpoison --config=configs/learning_speed.py:all --workdir=/tmp/learning_speed_all
  (append :tiny, or :all,tiny, to the config path for a smoke run)

Trains the victim (the quickstart's CIFAR CNN, width 0.5, Adam, 3 seeds) with standard training
for 15 epochs on the clean class-balanced 2,500-image subset of shared/data/cifar10.npz and on
each poison of the family that needs no crafting model: P5 class-wise random noise, Regions-1,
-4, -16, low-frequency noise, and the substandard Noise and Mislabeling sets (8 runs; ``:all``
adds the crafted poisons of configs/poisons/_common.py, 16 runs). Per run, ``summary`` holds peak
and final clean test accuracy, the epoch of the peak and the first epoch whose training loss is
below ``loss_threshold``; ``results['learning_speed']`` holds Spearman's ρ of epoch-to-threshold
vs peak accuracy (Figure 1: poisons learned faster are more effective, ρ > 0) and of peak vs
final accuracy (Figure 2), drawn in ``learning_speed_epochs_vs_peak.png`` and
``learning_speed_peak_vs_final.png`` (`jaxpoison.evaluation.speed`); the ρ are printed.

15 epochs rather than the 6 of configs/poison_family.py: the learning-speed statistic needs the
training loss of the slower runs to cross the threshold within the run.

Expected: not measured yet.
"""

from pathlib import Path


def get_config(arg=None):
    options = set(arg.split(",")) if arg else set()
    if options - {"tiny", "all"}:
        raise ValueError(f"Unknown config argument {arg!r}; use tiny, all or all,tiny.")
    common = _common()
    runs = tuple(common.SPECS) if "all" in options else common.STATIC
    config = common.get_config(
        runs,
        "tiny" if "tiny" in options else None,
        title="learning speed vs poison effectiveness (CIFAR-10)",
    )
    config.loss_threshold = 0.5
    if "tiny" in options:
        config.victim.epochs = 2
    else:
        config.victim.epochs = 15
    return config


def _common():
    import importlib.util

    path = Path(__file__).resolve().parent / "poisons" / "_common.py"
    spec = importlib.util.spec_from_file_location("jaxpoison_configs_poisons_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
