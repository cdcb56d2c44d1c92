r"""Rotation self-supervised learning as a defense (Tao et al. 2021, after Gidaris et al. 2018):
rotation prediction with ST or PGD-AT on clean / poisoned CIFAR-10, then a linear probe.

  jaxpoison --config=configs/rotation_ssl.py --workdir=/tmp/rotation_ssl
  (append :tiny to the config path for a smoke run)

Training sets: clean, P5 class-wise random noise and Regions-4 (ℓ∞ 8/255, crafted with the
settings of configs/poisons/_common.py) on a class-balanced 5,000-image subset of
../shared/data/cifar10.npz; the probe is tested on the full 10,000-image clean test set.
Pretext: the CIFAR CNN with 4 outputs predicts the rotation (0/90/180/270°) of every training
image, all four rotations of each batch, labels ignored; ``st`` trains it with cross-entropy
(erm), ``at`` with PGD-AT on the rotation loss (ℓ∞ 8/255, 5 steps of 2/255). CIFAR CNN at width
0.5, SGD lr 0.05 / cosine, batch 128 (512 rotated images), crop + flip, 15 epochs, 2 seeds: sized
for 2 CPU cores, far smaller than the paper's ResNet-18 runs. Then a linear probe (multinomial
logistic regression, 500 full-batch Adam steps on standardized frozen penultimate features) is
fitted on the same (poisoned) training images with their clean labels and evaluated on the clean
test set.

``summary['<st|at>/<clean|P5_random|regions4>']['probe_test_acc']`` (also ``final_test_acc``) is
the probe's clean test accuracy; ``pretext_final_test_acc`` the rotation accuracy on clean test
images.

Options, comma-separated after the config path:

* ``family``: the 2,500-image subset, poison specs and surrogate of configs/poison_family.py, so
  a poison_family workdir's artifacts (``poison/<SPECS key>`` copied to ``poison/<run name>``)
  and ``checkpoints/surrogate`` are reused; training sets clean, P3, class-wise
  error-minimizing noise and Regions-4, the poisons that take most from supervised ST there
  (docs/defenses.md); test on its 1,000 test images.
* ``objectives=<a>+<b>`` among ``st``, ``at`` and ``fast_at`` (the AT pretext with one step of
  1.25 ε from a uniform start, FGSM-RS, a third of the 5-step cost); ``poisons=<a>+<b>`` (with
  ``clean``) to keep some training sets; ``epochs=<n>``; ``warmup_epochs=<x>`` (the learning rate
  rises linearly from 0 over x epochs first, the remedy for AT runs that never leave chance).
* ``tiny``: a smoke run.

Expected (paper): the poisons hurt the probe of the ST-pretext model far less than they hurt
supervised ST, and the AT pretext less still. Measured with ``family`` (docs/defenses.md): the
ST pretext's probe 33.3% on clean data, 30.5% on class-wise error-minimizing noise (supervised
ST: 53.0 and 25.4%), 27.0% on Regions-4; the one-step AT pretext stays at chance at this size.
The full config is not measured.
"""

from pathlib import Path

import ml_collections

from jaxpoison import config_args

POISON_RUNS = {"P5_random": "random", "regions4": "regions"}
# The `family` training sets: those that take most from supervised ST on that subset.
FAMILY_POISON_RUNS = {
    "P3_universal_adversarial": "universal_adversarial",
    "error_minimizing_class_wise": "error_minimizing_class_wise",
    "regions4": "regions",
}


def _common():
    import importlib.util

    path = Path(__file__).resolve().parent / "poisons" / "_common.py"
    spec = importlib.util.spec_from_file_location("jaxpoison_configs_poisons_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg=None):
    options, keep = config_args.parse(
        arg,
        flags=("tiny", "family"),
        fields={
            "objectives": config_args.names(),
            "poisons": config_args.names(),
            "epochs": config_args.positive_int,
            "warmup_epochs": config_args.positive_float,
        },
    )
    config = _config("tiny" in options)
    if "family" in options:
        _to_family(config, tiny="tiny" in options)
    if "epochs" in keep:
        config.victim.epochs = keep["epochs"]
    if "warmup_epochs" in keep:
        config.victim.optimizer.warmup_epochs = keep["warmup_epochs"]
    if "objectives" in keep:
        config.objectives = config_args.keep(
            dict(config.objectives), keep["objectives"], "objectives"
        )
    if "poisons" in keep:
        config.include_clean = "clean" in keep["poisons"]
        chosen = [p for p in keep["poisons"] if p != "clean"]
        config.poisons = config_args.keep(dict(config.poisons), chosen, "poisons")
    return config


def _to_family(config, *, tiny):
    """poison_family's data, poison specs and surrogate (its artifacts can be copied in)."""
    family = _common().get_config(
        tuple(FAMILY_POISON_RUNS.values()), "tiny" if tiny else None, title=config.name
    )
    config.data = dict(family.data, crop_padding=4)
    config.poisons = {run: dict(family.poisons[key]) for run, key in FAMILY_POISON_RUNS.items()}
    config.surrogate = family.surrogate
    if not tiny:
        config.victim.eval_batch_size = 500
        config.ssl.pretext_test_size = 1000
        config.ssl.feature_batch_size = 500


def _config(tiny):
    specs = _common().SPECS
    config = ml_collections.ConfigDict()
    config.experiment = "rotation_ssl"
    config.name = "rotation SSL (ST / AT pretext) + linear probe, CIFAR-10 (linf 8/255)"
    config.seed = 0
    config.data = dict(
        source="npz", name="cifar10", num_train=5000, num_test=0, crop_padding=4, flip=True
    )
    config.threat = dict(norm="linf", epsilon=8 / 255)
    config.include_clean = True
    config.poisons = {run: dict(specs[key]) for run, key in POISON_RUNS.items()}
    config.objectives = {
        "st": dict(name="erm"),
        "at": dict(name="pgd_at", norm="linf", epsilon=8 / 255, num_steps=5, step_size=2 / 255),
        "fast_at": dict(
            name="pgd_at", norm="linf", epsilon=8 / 255, num_steps=1, step_size=1.25 * 8 / 255
        ),
    }
    config.loss_threshold = 0.5
    config.victim = dict(
        model=dict(name="cnn_cifar", width=0.5),
        epochs=15,
        batch_size=128,
        num_seeds=2,
        seed_strategy="auto",
        eval_batch_size=1000,
        checkpoint_every=1,
        optimizer=dict(learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine"),
    )
    config.ssl = dict(
        pretext_test_size=1000,
        feature_batch_size=1000,
        probe=dict(num_steps=500, learning_rate=0.05, weight_decay=5e-4),
    )
    if tiny:
        config.data.num_train = 200
        config.data.num_test = 100
        config.poisons = {"regions4": dict(specs["regions"])}
        config.objectives.at.num_steps = 2
        config.objectives.at.step_size = 4 / 255
        del config.objectives["fast_at"]
        config.victim.model.width = 0.125
        config.victim.epochs = 1
        config.victim.batch_size = 50
        config.victim.num_seeds = 1
        config.victim.eval_batch_size = 100
        config.ssl.pretext_test_size = 100
        config.ssl.feature_batch_size = 100
        config.ssl.probe.num_steps = 50
    return config
