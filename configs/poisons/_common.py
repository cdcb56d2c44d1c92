"""Shared settings of configs/poison_family.py and configs/poisons/<name>_cifar10.py.

Not a config itself: the config files load it by path, so it works however ml_collections
imports them.
"""

import ml_collections

# The error-minimizing crafting model's optimizer. The paper's SGD (lr 0.1, momentum 0.9) suits its
# ResNet-18 with BatchNorm; the BatchNorm-free CIFAR CNN does not learn with it (perturbed-data
# accuracy stuck at 17-44% over 10 passes), while Adam brings it to the 99% stop accuracy in 11.
EM_OPTIMIZER = dict(name="adam", learning_rate=1e-3, weight_decay=0.0)

# Run name -> poison spec (``name`` + factory keyword arguments + crafting ``batch_size``).
# Step counts are cut from the papers' (P1 100, error-maximizing 250, universal several epochs)
# so that crafting on 2 CPU cores takes minutes; override them for full runs.
SPECS = {
    "random": dict(name="random"),
    "regions_1": dict(name="regions", num_patches=1),
    "regions": dict(name="regions", num_patches=4),
    "regions_16": dict(name="regions", num_patches=16),
    "low_frequency": dict(name="low_frequency", frequency=4),
    "adversarial": dict(name="adversarial", num_steps=20, batch_size=256),
    "error_maximizing": dict(name="error_maximizing", num_steps=20, batch_size=256),
    "mifgsm": dict(name="mifgsm", num_steps=10, batch_size=256),
    "hypocritical": dict(name="hypocritical", num_steps=20, batch_size=256),
    "universal_adversarial": dict(
        name="universal_adversarial", num_epochs=3, num_steps=2, batch_size=256
    ),
    "universal_hypocritical": dict(
        name="universal_hypocritical", num_epochs=3, num_steps=2, batch_size=256
    ),
    "error_minimizing": dict(
        name="error_minimizing",
        model=dict(name="cnn_cifar", width=0.5),
        optimizer=EM_OPTIMIZER,
        num_epochs=20,
        num_steps=10,
        train_steps=10,
        batch_size=256,
    ),
    "error_minimizing_class_wise": dict(
        name="error_minimizing",
        class_wise=True,
        model=dict(name="cnn_cifar", width=0.5),
        optimizer=EM_OPTIMIZER,
        num_epochs=20,
        num_steps=10,
        train_steps=10,
        batch_size=256,
    ),
    "noise": dict(name="noise"),
    "mislabeling": dict(name="mislabeling"),
}

# The runs of each configs/poisons/<name>_cifar10.py (registry name -> SPECS keys).
GROUPS = {
    "regions": ("regions_1", "regions", "regions_16"),
    "error_minimizing": ("error_minimizing", "error_minimizing_class_wise"),
}

# What `:tiny` shrinks in the specs (everything small enough for a smoke run).
TINY = {
    "num_steps": 2,
    "num_epochs": 1,
    "batch_size": 50,
}


# Runs that need no crafting model (drawn at init, no `update`): a cheap first batch of results.
STATIC = ("random", "regions_1", "regions", "regions_16", "low_frequency", "noise", "mislabeling")


def get_config(runs, arg=None, *, title):
    """A config that crafts `runs` (keys of SPECS) on a class-balanced CIFAR-10 subset and
    trains the victims on each and on the clean data.

    `arg` is a comma-separated list of ``tiny`` (a smoke run), ``static`` (only the runs of
    STATIC, plus clean), ``crafted`` (only the other runs, without the clean baseline), so
    a long measurement can be split into two workdirs, ``long`` (victims trained 20 epochs
    instead of 6: sample-wise error-minimizing noise only bites once the victim fits its
    training set) and ``only=<run>+<run>...`` (a subset of the runs, by SPECS key).
    """
    options = set(arg.split(",")) if arg else set()
    only = {o for o in options if o.startswith("only=")}
    options -= only
    unknown = options - {"tiny", "static", "crafted", "long"}
    if unknown or {"static", "crafted"} <= options or len(only) > 1:
        raise ValueError(
            f"Unknown config argument {arg!r}; use tiny, static, crafted, long or "
            "only=<run>+<run>..."
        )
    if only:
        chosen = only.pop().removeprefix("only=").split("+")
        missing = [r for r in chosen if r not in runs]
        if missing:
            raise ValueError(f"only={'+'.join(chosen)}: {missing} not among the runs {list(runs)}.")
        runs = [r for r in runs if r in chosen]
    if "static" in options:
        runs = [r for r in runs if r in STATIC]
    if "crafted" in options:
        runs = [r for r in runs if r not in STATIC]
    config = ml_collections.ConfigDict()
    config.name = title
    config.seed = 0
    config.data = dict(
        source="npz",
        name="cifar10",
        num_train=2500,
        num_test=1000,
        val_size=0,
        crop_padding=0,
        flip=True,
    )
    epsilon = ml_collections.FieldReference(8 / 255)
    config.threat = dict(norm="linf", epsilon=epsilon)
    config.include_clean = "crafted" not in options
    config.poisons = {run: dict(SPECS[run]) for run in runs}
    config.objectives = {"erm": dict(name="erm")}
    config.loss_threshold = 0.5
    # The victim of the quickstart (configs/quickstart.py): Adam learns this small set in 6
    # epochs where SGD underfits.
    optimizer = dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0, schedule="cosine")
    model = dict(name="cnn_cifar", width=0.5)
    config.victim = dict(
        model=model,
        epochs=6,
        batch_size=64,
        num_seeds=3,
        seed_strategy="auto",
        eval_batch_size=500,
        checkpoint_every=5,
        optimizer=optimizer,
    )
    # The crafting model of the poisons that need one (trained on the clean subset).
    config.surrogate = dict(
        model=dict(model),
        epochs=6,
        batch_size=64,
        eval_batch_size=500,
        checkpoint_every=5,
        optimizer=dict(optimizer),
    )
    if "long" in options:
        config.victim.epochs = 20
    if "tiny" in options:
        config.data.num_train = 200
        config.data.num_test = 100
        for cfg in (config.victim, config.surrogate):
            cfg.model.width = 0.125
            cfg.epochs = 1
            cfg.batch_size = 50
            cfg.checkpoint_every = 1
        config.victim.num_seeds = 2
        for spec in config.poisons.values():
            for key, value in TINY.items():
                if key in spec:
                    spec[key] = value
            if "model" in spec:
                spec.model.width = 0.125
    return config
