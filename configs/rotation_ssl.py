r"""Rotation self-supervised learning as a defense (Tao et al. 2021, after Gidaris et al. 2018):
rotation prediction with ST or PGD-AT on clean / poisoned CIFAR-10, then a linear probe.

  jaxpoison --config=configs/rotation_ssl.py --workdir=/tmp/rotation_ssl
  (append :tiny to the config path for a smoke run)

Training sets: clean, P5 class-wise random noise and Regions-4 (ℓ∞ 8/255, crafted with the
poison family's settings, ``config_lib.FAMILY_SPECS``) on a class-balanced 5,000-image subset of
../shared/data/cifar10.npz; the probe is tested on the full 10,000-image clean test set.
Pretext: the CNN for the data (on CIFAR-10 the CIFAR CNN) with 4 outputs predicts the rotation
(0/90/180/270°) of every training image, all four rotations of each batch, labels ignored;
``st`` trains it with cross-entropy (erm), ``at`` with PGD-AT on the rotation loss (ℓ∞ 8/255, 5
steps of 2/255), ``fast_at`` with one step of 1.25 ε from a uniform start (FGSM-RS, a third of
the 5-step cost). CNN at width 0.5, SGD lr 0.05 / cosine, batch 128 (512 rotated images), crop +
flip, 15 epochs, 2 seeds: sized for 2 CPU cores, far smaller than the paper's ResNet-18 runs.
Then a linear probe (multinomial logistic regression, 500 full-batch Adam steps on standardized
frozen penultimate features) is fitted on the same (poisoned) training images with their clean
labels and evaluated on the clean test set.

``summary['<st|at|fast_at>/<clean|P5_random|regions4>']['probe_test_acc']`` (also
``final_test_acc``) is the probe's clean test accuracy; ``pretext_final_test_acc`` the rotation
accuracy on clean test images.

Preset ``family`` (``:family``): the 2,500-image subset, poison specs and surrogate of
configs/poison_family.py (artifacts are keyed by run name and surrogate too, so each run is
crafted under its own key); training sets clean,
P3, class-wise error-minimizing noise and Regions-4, the poisons that take most from supervised
ST there (docs/defenses.md); test on its 1,000 test images.

Overrides: ``--config.select.objectives="('st','fast_at')"`` and
``--config.select.poisons="('regions4',)"`` keep some objectives / training sets
(``--config.include_clean=False`` drops the clean one); ``--config.victim.epochs=20``;
``--config.victim.optimizer.warmup_epochs=2`` (the learning rate rises linearly from 0 over 2
epochs first, the remedy for AT runs that never leave chance).

Expected (paper): the poisons hurt the probe of the ST-pretext model far less than they hurt
supervised ST, and the AT pretext less still. Measured with ``family`` (docs/defenses.md): the
ST pretext's probe 33.3% on clean data, 30.5% on class-wise error-minimizing noise (supervised
ST: 53.0 and 25.4%), 27.0% on Regions-4; the one-step AT pretext stays at chance at this size.
The full config is not measured.
"""

import ml_collections

from jaxpoison import config_lib

POISON_RUNS = {"P5_random": "random", "regions4": "regions"}
# The `family` training sets: those that take most from supervised ST on that subset.
FAMILY_POISON_RUNS = {
    "P3_universal_adversarial": "universal_adversarial",
    "error_minimizing_class_wise": "error_minimizing_class_wise",
    "regions4": "regions",
}


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("family",))
    config = ml_collections.ConfigDict()
    config.trainer = "rotation_ssl"
    config.name = "rotation SSL (ST / AT pretext) + linear probe, CIFAR-10 (linf 8/255)"
    config.seed = 0
    config.data = config_lib.data("cifar10", num_train=5000, crop_padding=4, flip=True)
    config.threat = dict(norm="linf", epsilon=8 / 255)
    config.include_clean = True
    config.poisons = config_lib.family_poisons(POISON_RUNS)
    config.objectives = {
        "st": dict(name="erm"),
        "at": dict(name="pgd_at", norm="linf", epsilon=8 / 255, num_steps=5, step_size=2 / 255),
        "fast_at": dict(
            name="pgd_at", norm="linf", epsilon=8 / 255, num_steps=1, step_size=1.25 * 8 / 255
        ),
    }
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    config.victim = config_lib.victim(
        config_lib.auto_model(0.5),
        epochs=15,
        batch_size=128,
        num_seeds=2,
        optimizer=config_lib.optimizer(learning_rate=0.05),
        eval_batch_size=1000,
    )
    config.ssl = dict(
        pretext_test_size=1000,
        feature_batch_size=1000,
        probe=dict(num_steps=500, learning_rate=0.05, weight_decay=5e-4),
    )
    if "family" in chosen:
        family = config_lib.poison_family(config.name, runs=FAMILY_POISON_RUNS)
        config.data = family.data
        config.data.crop_padding = 4
        config.poisons = family.poisons
        config.surrogate = family.surrogate
        config.victim.eval_batch_size = 500
        config.ssl.feature_batch_size = 500
    if "tiny" in chosen:
        config_lib.tiny(config)
        # The study's own block, which `tiny` does not know.
        config.ssl.update(pretext_test_size=100, feature_batch_size=100)
        config.ssl.probe.num_steps = 50
    return config
