r"""Learning speed vs poison effectiveness (Sandoval-Segura et al. 2022, Figures 1 and 2).

  jaxpoison --config=configs/learning_speed.py --workdir=/tmp/learning_speed
  jaxpoison --config=configs/learning_speed.py --workdir=/tmp/learning_speed_all \
      --config.select.poisons="()"
  (append :tiny to the config path for a smoke run)

Trains the victim (the quickstart's CNN, width 0.5, Adam, 3 seeds) with standard training for
15 epochs on the clean class-balanced 2,500-image subset of shared/data/cifar10.npz and on each
poison of the family that needs no crafting model (``config_lib.STATIC``): P5 class-wise
random noise, Regions-1, -4, -16, low-frequency noise, LSP, autoregressive noise, the
one-pixel shortcut, CUDA, and the substandard Noise and Mislabeling sets (12 runs, the default
``select.poisons``; an empty selection adds the crafted poisons of ``config_lib.FAMILY_SPECS``).
Per run, ``summary`` holds peak and final clean test accuracy, the epoch of the peak
and the first epoch whose training loss is below ``loss_threshold``; ``results['learning_speed']``
holds Spearman's ρ of epoch-to-threshold vs peak accuracy (Figure 1: poisons learned faster are
more effective, ρ > 0) and of peak vs final accuracy (Figure 2), drawn in
``learning_speed_epochs_vs_peak.png`` and ``learning_speed_peak_vs_final.png``
(`jaxpoison.evaluation.speed`); the ρ are printed.

15 epochs rather than the 6 of configs/poison_family.py: the learning-speed statistic needs the
training loss of the slower runs to cross the threshold within the run.

Expected: not measured yet.
"""

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = config_lib.poison_family("learning speed vs poison effectiveness (CIFAR-10)")
    config.select.poisons = config_lib.STATIC
    config.victim.epochs = 15
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
