r"""Defenses × delusive poisons on CIFAR-10: clean test accuracy of every training objective on
clean data and on every poison, ℓ∞ ε = 8/255 for attacker and defender.

  jaxpoison --config=configs/defenses_cifar10.py --workdir=/tmp/defenses_cifar10
  jaxpoison --config=configs/defenses_cifar10.py:small --workdir=/tmp/defenses_small
  (append :tiny to the config path for a smoke run)

Objectives (``objectives.OBJECTIVES``): ST (erm), random noise, PGD-AT, TRADES (β = 6), THRM
(λ = 6), MART (β = 6), FAT (τ = 0), GAIRAT (λ = -1); the defender's inner search uses 10 steps of
2/255 (Madry et al.). Poisons: P1 adversarial, P2 hypocritical, P3 / P4 universal adversarial /
hypocritical, P5 class-wise random noise, error-minimizing noise and Regions-4, crafted with the
settings of configs/poisons/_common.py (one place for crafting settings), and Learning to Confuse
(run ``L2C``, the generator of configs/l2c_cifar10.py at its ε = 0.032); poisons not registered
in ``poisons.POISONS`` at run time are left out, so the table grows as the registry does.
``summary`` is keyed ``<objective>/<poison>`` (``clean`` for the unpoisoned training set).

The defender's radius is ``config.defender_epsilon`` (a FieldReference shared by every defense,
equal to the attacker's by default); sweep it with ``--config.defender_epsilon=...``.

Options, comma-separated after the config path:

* ``small``: ST vs PGD-AT on clean / P5 / Regions-4, 5,000 training images, CIFAR CNN at width
  0.5, 10 epochs, 2 seeds, PGD-AT with 5 steps of 2/255.
* ``family``: the data, victim and crafting settings of configs/poison_family.py (2,500-image
  subset, CNN width 0.5, Adam, 6 epochs, 3 seeds, the same poison specs), so the poison
  artifacts and surrogate of a poison_family workdir can be copied in and reused (their
  fingerprints match); defender inner search 5 steps of 2/255. Its ``L2C`` run is the measured
  generator of docs/l2c.md (configs/l2c_cifar10.py:cpu with Algorithm 2 and 32 crafting epochs),
  so that workdir's ``poison/l2c`` can be copied in as ``poison/L2C``.
* ``family`` also offers ``fast_at``: PGD-AT with one step of 1.25 ε_def from a uniform start
  (FGSM-RS, Wong et al. 2020), a third of the 5-step cost, so AT can train for the 20+ epochs
  it needs at this size (5-step PGD-AT at 8/255 reaches 16% clean accuracy in 6 epochs).
* ``sweep`` (with ``family``): the defender-budget sweep, PGD-AT at ε_def in {2, 4, 8, 12, 16}/255
  (5 steps of ε_def / 4) beside ST (ε_def = 0), ``budget_sweep.png``; ``pgd_at`` (8/255) and
  ``erm`` are the table's runs, so a sweep in the table's workdir reuses their checkpoints.
* ``objectives=<a>+<b>``, ``poisons=<a>+<b>``: keep some objectives / poison runs (the full
  cross product is long on a CPU; split it over workdirs).
* ``epochs=<n>``: train every victim for n epochs.
* ``val_size=<n>``: hold out n (poisoned) training images, class-balanced, as a validation
  split; each run's summary then adds ``early_stopped_test_acc``, the clean test accuracy at
  the epoch of best validation accuracy (early stopping as a defense), beside peak and final.
* ``warmup_epochs=<x>``: the victims' learning rate rises linearly from 0 over x epochs first.
* ``gairat_begin=<f>``: GAIRAT trains as plain PGD-AT (equal weights) for the first fraction f
  of training, then reweights (the reference's burn-in: ``--begin_epoch 60`` of 120).
* ``tiny``: a smoke run.

Expected: the measured ``family`` table of docs/defenses.md; the full table is not measured.
"""

from pathlib import Path

import ml_collections

from jaxpoison import config_args

# Poison run name -> key of configs/poisons/_common.py SPECS (P-numbers as in Tao et al. 2021).
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
        "gairat": dict(name="gairat", lam=-1.0, **defender),
    }


def _sibling(relative_path, name):
    """A config module of this directory, loaded by path (configs are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _common():
    return _sibling("poisons/_common.py", "jaxpoison_configs_poisons_common")


def _specs():
    module = _common()
    return module.SPECS, module.TINY


def _l2c_spec(arg, **overrides):
    """The ``l2c`` poison of configs/l2c_cifar10.py (with `arg`), carrying its own ε = 0.032."""
    l2c_config = _sibling("l2c_cifar10.py", "jaxpoison_configs_l2c_cifar10").get_config(arg)
    l2c = dict(l2c_config.poisons.l2c)
    l2c.update(overrides, threat=dict(l2c_config.threat))
    return l2c


def _options(arg):
    options, keep = config_args.parse(
        arg,
        flags=("tiny", "small", "family", "sweep"),
        fields={
            "objectives": config_args.names(),
            "poisons": config_args.names(),
            "epochs": config_args.positive_int,
            "val_size": config_args.positive_int,
            "warmup_epochs": config_args.positive_float,
            "gairat_begin": config_args.positive_float,
        },
    )
    if keep.get("gairat_begin", 0) >= 1:
        raise ValueError(
            f"gairat_begin={keep['gairat_begin']}: give the fraction of training before GAIRAT's "
            "reweighting starts, in (0, 1), e.g. gairat_begin=0.5."
        )
    if {"small", "family"} <= options or ("sweep" in options) > ("family" in options):
        raise ValueError(
            f"Config argument {arg!r}: small and family exclude each other, and sweep needs "
            "family (e.g. family,sweep)."
        )
    return options, keep


def get_config(arg=None):
    from jaxpoison import poisons

    options, keep = _options(arg)
    if "family" in options:
        config = _family_config(options)
    else:
        config = _own_config(options)
    if "epochs" in keep:
        config.victim.epochs = keep["epochs"]
    if "val_size" in keep:
        config.data.val_size = keep["val_size"]
    if "warmup_epochs" in keep:
        config.victim.optimizer.warmup_epochs = keep["warmup_epochs"]
    if "gairat_begin" in keep:
        if "gairat" not in config.objectives:
            raise ValueError(f"Config argument {arg!r}: gairat_begin needs the gairat objective.")
        config.objectives.gairat.begin = keep["gairat_begin"]
    if "objectives" in keep:
        config.objectives = config_args.keep(
            dict(config.objectives), keep["objectives"], "objectives"
        )
    if "poisons" in keep:
        chosen = [p for p in keep["poisons"] if p != "clean"]
        config.include_clean = "clean" in keep["poisons"]
        config.poisons = config_args.keep(dict(config.poisons), chosen, "poisons")
    config.poisons = {
        run: spec for run, spec in config.poisons.items() if spec["name"] in poisons.POISONS
    }
    return config


def _family_config(options):
    """poison_family's settings, with the defenses' objectives and poison run names.

    A poison_family workdir's artifacts are reused by copying ``poison/<SPECS key>`` to
    ``poison/<run name of POISON_RUNS>`` (and ``checkpoints/surrogate``) into the new workdir.
    """
    common = _common()
    config = common.get_config(
        tuple(POISON_RUNS.values()),
        "tiny" if "tiny" in options else None,
        title="defenses x poisons, CIFAR-10 subset, poison_family settings (linf 8/255)",
    )
    config.poisons = {run: dict(config.poisons[key]) for run, key in POISON_RUNS.items()}
    if "tiny" in options:
        config.poisons.L2C = _l2c_spec("tiny")
    else:
        config.poisons.L2C = _l2c_spec("cpu", method="algorithm2", num_epochs=32)
    config.defender_epsilon = ml_collections.FieldReference(8 / 255)
    steps, size = (2, 4 / 255) if "tiny" in options else (5, 2 / 255)
    epsilon = config.get_ref("defender_epsilon")
    config.objectives = _objectives(epsilon, steps, size)
    config.objectives.fast_at = dict(
        name="pgd_at", norm="linf", epsilon=epsilon, num_steps=1, step_size=1.25 * epsilon
    )
    if "sweep" in options:
        sweep = {"erm": config.objectives.erm, "pgd_at": config.objectives.pgd_at}
        for k in SWEEP_EPSILONS:
            eps = k / 255
            sweep[f"pgd_at_eps{k}"] = dict(
                name="pgd_at", norm="linf", epsilon=eps, num_steps=steps, step_size=eps / 4
            )
        config.objectives = sweep
        config.budget_sweep = dict(objective="pgd_at")
    return config


def _own_config(options):
    arg = "small" if "small" in options else "tiny" if "tiny" in options else None
    specs, tiny_overrides = _specs()
    config = ml_collections.ConfigDict()
    config.name = "defenses x poisons, CIFAR-10 (linf 8/255)"
    config.seed = 0
    config.data = dict(
        source="npz",
        name="cifar10",
        num_train=10000,
        num_test=0,
        val_size=0,
        crop_padding=4,
        flip=True,
    )
    epsilon = ml_collections.FieldReference(8 / 255)
    config.threat = dict(norm="linf", epsilon=epsilon)
    config.defender_epsilon = ml_collections.FieldReference(8 / 255)
    config.include_clean = True
    config.poisons = {run: dict(specs[key]) for run, key in POISON_RUNS.items()}
    config.poisons.L2C = _l2c_spec(None)
    config.objectives = _objectives(config.get_ref("defender_epsilon"), 10, 2 / 255)
    config.loss_threshold = 0.5
    optimizer = dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    config.victim = dict(
        model=dict(name="cnn_cifar", width=1.0),
        epochs=30,
        batch_size=128,
        num_seeds=3,
        seed_strategy="auto",
        eval_batch_size=1000,
        checkpoint_every=1,
        optimizer=optimizer,
    )
    # The crafting model of the poisons that need one (trained on the clean subset).
    config.surrogate = dict(
        model=dict(name="cnn_cifar", width=1.0),
        epochs=15,
        batch_size=128,
        eval_batch_size=1000,
        checkpoint_every=5,
        optimizer=dict(optimizer),
    )
    if arg == "small":
        config.name = "ST vs PGD-AT on clean / P5 / Regions-4, 5k CIFAR-10 (linf 8/255)"
        config.data.num_train = 5000
        config.data.num_test = 2000
        config.poisons = {run: dict(specs[POISON_RUNS[run]]) for run in ("P5_random", "regions4")}
        config.objectives = {
            k: v
            for k, v in _objectives(config.get_ref("defender_epsilon"), 5, 2 / 255).items()
            if k in ("erm", "pgd_at")
        }
        config.victim.model.width = 0.5
        config.victim.epochs = 10
        config.victim.num_seeds = 2
    elif arg == "tiny":
        # Every objective, on clean data and P5 (the poisons have their own smoke runs in
        # configs/poison_family.py:tiny): 16 small runs.
        config.data.num_train = 200
        config.data.num_test = 100
        config.poisons = {"P5_random": dict(specs["random"])}
        config.objectives = _objectives(config.get_ref("defender_epsilon"), 2, 4 / 255)
        for cfg in (config.victim, config.surrogate):
            cfg.model.width = 0.125
            cfg.epochs = 1
            cfg.batch_size = 50
            cfg.eval_batch_size = 100
            cfg.checkpoint_every = 1
        config.victim.num_seeds = 2
        for spec in config.poisons.values():
            for key, value in tiny_overrides.items():
                if key in spec:
                    spec[key] = value
            if "model" in spec:
                spec.model.width = 0.125
    return config
