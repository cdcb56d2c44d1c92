r"""Defenses × delusive poisons on CIFAR-10: clean test accuracy of every training objective on
clean data and on every poison, ℓ∞ ε = 8/255 for attacker and defender.

  jaxpoison --config=configs/defenses_cifar10.py --workdir=/tmp/defenses_cifar10
  jaxpoison --config=configs/defenses_cifar10.py:small --workdir=/tmp/defenses_small
  (append :tiny to the config path for a smoke run, e.g. :family,tiny with
  --config.select.poisons="('P5_random',)")

Objectives (``objectives.OBJECTIVES``): ST (erm), random noise, PGD-AT, TRADES (β = 6), THRM
(λ = 6), MART (β = 6), FAT (τ = 0), GAIRAT (λ = -1); the defender's inner search uses 10 steps of
2/255 (Madry et al.). UEraser (``ueraser``, no ball): the max CE over 5 augmented copies.
Gaussian noise (``gaussian_noise``, no ball): CE under N(0, 0.25²) noise (Cohen et al.).
IBP (``ibp``): certified training on interval bounds, ε and κ ramped (Gowal et al.).
Poisons: P1 adversarial, P2 hypocritical, P3 / P4 universal adversarial /
hypocritical, P5 class-wise random noise, error-minimizing noise and Regions-4, crafted with the
poison family's settings (``config_lib.FAMILY_SPECS``), and Learning to Confuse (run ``L2C``,
the generator of configs/l2c_cifar10.py at its ε = 0.032). ``summary`` is keyed
``<objective>/<poison>`` (``clean`` for the unpoisoned training set).

The defender's radius is ``config.defender_epsilon`` (a FieldReference shared by every defense,
equal to the attacker's by default); sweep it with ``--config.defender_epsilon=...``.

Presets, after the config path (``:family,sweep,tiny``):

* ``small``: ST vs PGD-AT on clean / P5 / Regions-4, 5,000 training images, the CNN at width
  0.5, 10 epochs, 2 seeds, PGD-AT with 5 steps of 2/255.
* ``family``: the data, victim and crafting settings of configs/poison_family.py (2,500-image
  subset, CNN width 0.5, Adam, 6 epochs, 3 seeds, the same poison specs; artifacts are keyed
  by run name too, so only runs of the same name, e.g. the error-minimizing ones, and the
  surrogate are shared with a poison_family workdir); defender inner search 5 steps of
  2/255. Its ``L2C`` run is the measured generator of docs/l2c.md (configs/l2c_cifar10.py:cpu
  with Algorithm 2 and 32 crafting epochs). It adds the objective ``fast_at``: PGD-AT with one
  step of 1.25 ε_def from a uniform start (FGSM-RS, Wong et al. 2020), a third of the 5-step
  cost, so AT can train for the 20+ epochs it needs at this size (5-step PGD-AT at 8/255
  reaches 16% clean accuracy in 6 epochs). Every victim is then attacked on the test set:
  ``evals.pgd20`` (PGD-20, ``acc/A``) and ``evals.aa`` (AutoAttack, ``acc/AA``; minutes per
  adversarially trained victim on a CPU, ``--config.evals.aa.num_queries=1000`` cuts Square).
* ``sweep``: the defender-budget sweep, PGD-AT at ε_def in {2, 4, 8, 12, 16}/255 (the config's
  PGD-AT steps, of ε_def / 4) beside ST (ε_def = 0), ``budget_sweep.png``; ``pgd_at`` (8/255)
  and ``erm`` are the table's runs, so a sweep in the table's workdir reuses their victims.
  It runs no evaluators.

Overrides that replace the old options:

* ``--config.select.objectives="('erm','pgd_at')"``, ``--config.select.poisons="('regions4',)"``
  keep some objectives / poison runs (the full cross product is long on a CPU; split it over
  workdirs); ``--config.include_clean=False`` leaves out the clean training set.
* ``--config.victim.epochs=20`` trains every victim for 20 epochs.
* ``--config.data.val_size=250`` holds out 250 (poisoned) training images, class-balanced, as a
  validation split; each run's summary then adds ``early_stopped_test_acc``, the clean test
  accuracy at the epoch of best validation accuracy (early stopping as a defense).
* ``--config.victim.optimizer.warmup_epochs=2``: the victims' learning rate rises linearly from
  0 over 2 epochs first.
* ``--config.objectives.gairat.begin=0.5``: GAIRAT trains as plain PGD-AT (equal weights) for
  the first half of training, then reweights (the reference's burn-in: ``--begin_epoch 60`` of
  120).

Expected: the measured ``family`` table of docs/defenses.md; the full table is not measured.
"""

import ml_collections
from ml_collections import config_dict

from jaxpoison import config_lib

# Poison run name -> key of config_lib.FAMILY_SPECS (P-numbers as in Tao et al. 2021).
POISON_RUNS = {
    "P1_adversarial": "adversarial",
    "P2_hypocritical": "hypocritical",
    "P3_universal_adversarial": "universal_adversarial",
    "P4_universal_hypocritical": "universal_hypocritical",
    "P5_random": "random",
    "error_minimizing": "error_minimizing",
    "error_minimizing_class_wise": "error_minimizing_class_wise",
    "regions4": "regions",
}

# The defender-budget sweep's radii (/255) besides the table's 8/255: 0 to 2x the attacker's.
SWEEP_EPSILONS = (2, 4, 12, 16)

# The L2C run carries its own threat: the generator's output bound of configs/l2c_cifar10.py.
L2C_THREAT = dict(norm="linf", epsilon=0.032)


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("small", "family", "sweep"))
    if {"small", "family"} <= chosen:
        raise ValueError(f"Config argument {arg!r}: small and family exclude each other.")
    config = _family_config() if "family" in chosen else _own_config()
    if "small" in chosen:
        config.name = "ST vs PGD-AT on clean / P5 / Regions-4, 5k CIFAR-10 (linf 8/255)"
        config.data.update(num_train=5000, num_test=2000)
        config.objectives = _objectives(config.get_ref("defender_epsilon"), 5, 2 / 255)
        config.select.update(poisons=("P5_random", "regions4"), objectives=("erm", "pgd_at"))
        config.victim.update(epochs=10, num_seeds=2)
        config.victim.model.width = 0.5
    if "sweep" in chosen:
        steps = config.objectives.pgd_at.num_steps
        for k in SWEEP_EPSILONS:
            config.objectives[f"pgd_at_eps{k}"] = dict(
                name="pgd_at", norm="linf", epsilon=k / 255, num_steps=steps, step_size=k / 255 / 4
            )
        config.select.objectives = ("erm", "pgd_at", *(f"pgd_at_eps{k}" for k in SWEEP_EPSILONS))
        config.budget_sweep = dict(objective="pgd_at")
        # The sweep measures clean accuracy; AutoAttack on each of its AT victims costs more.
        if "evals" in config:  # only the family preset has evaluators
            del config.evals
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config


def _objectives(epsilon, num_steps, step_size):
    defender = dict(norm="linf", epsilon=epsilon, num_steps=num_steps, step_size=step_size)
    return {
        "erm": dict(name="erm"),
        "rand_noise": dict(name="rand_noise", norm="linf", epsilon=epsilon),
        "pgd_at": dict(name="pgd_at", **defender),
        "trades": dict(name="trades", beta=6.0, **defender),
        "thrm": dict(name="thrm", beta=6.0, **defender),
        "mart": dict(name="mart", beta=6.0, **defender),
        "fat": dict(name="fat", tau=0, **defender),
        # begin: None (no burn-in), overridable with a fraction of training.
        "gairat": dict(name="gairat", lam=-1.0, begin=config_dict.placeholder(float), **defender),
        # No ball: the max CE over 5 augmented copies all training (APBench's strongest setting).
        "ueraser": dict(name="ueraser", num_copies=5, repeat_fraction=1.0, jpeg=False),
        # No ball: Gaussian data augmentation at randomized smoothing's CIFAR-10 sigma 0.25.
        "gaussian_noise": dict(name="gaussian_noise", sigma=0.25),
        # Certified training (Gowal et al.): IBP worst-case logits, eps and kappa ramped.
        "ibp": dict(name="ibp", norm="linf", epsilon=epsilon),
    }


def _family_config():
    """poison_family's settings, with the defenses' objectives and poison run names."""
    config = config_lib.poison_family(
        "defenses x poisons, CIFAR-10 subset, poison_family settings (linf 8/255)",
        runs=POISON_RUNS,
    )
    config.poisons.L2C = dict(
        config_lib.l2c_cifar10_poison(cpu=True),
        method="algorithm2",
        num_epochs=32,
        threat=L2C_THREAT,
    )
    config.defender_epsilon = ml_collections.FieldReference(8 / 255)
    epsilon = config.get_ref("defender_epsilon")
    config.objectives = _objectives(epsilon, 5, 2 / 255)
    config.objectives.fast_at = dict(
        name="pgd_at", norm="linf", epsilon=epsilon, num_steps=1, step_size=1.25 * epsilon
    )
    # Robust accuracy on the clean test set at the attacker's threat: PGD-20 (the risk
    # evaluator's acc/A) and the standard AutoAttack (acc/AA). On a CPU AutoAttack costs minutes
    # per adversarially trained victim (APGD-T's 9 targets, Square's 5,000 queries; cut Square
    # with --config.evals.aa.num_queries=1000).
    config.evals = {
        "pgd20": dict(name="risk", num_steps=20),
        "aa": dict(name="autoattack", num_queries=5000),
    }
    return config


def _own_config():
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = "defenses x poisons, CIFAR-10 (linf 8/255)"
    config.seed = 0
    config.data = config_lib.data("cifar10", num_train=10000, crop_padding=4, flip=True)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(8 / 255))
    config.defender_epsilon = ml_collections.FieldReference(8 / 255)
    config.include_clean = True
    config.poisons = config_lib.family_poisons(POISON_RUNS)
    config.poisons.L2C = dict(config_lib.l2c_cifar10_poison(), threat=L2C_THREAT)
    config.objectives = _objectives(config.get_ref("defender_epsilon"), 10, 2 / 255)
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    sgd = config_lib.optimizer(learning_rate=0.05)
    config.victim = config_lib.victim(
        config_lib.auto_model(1.0),
        epochs=30,
        batch_size=128,
        num_seeds=3,
        optimizer=sgd,
        eval_batch_size=1000,
    )
    config.surrogate = config_lib.surrogate(
        config_lib.auto_model(1.0),
        epochs=15,
        batch_size=128,
        optimizer=sgd,
        eval_batch_size=1000,
        checkpoint_every=5,
    )
    return config
