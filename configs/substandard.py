r"""Substandard models (Tao et al. 2022, "With False Friends Like These, Who Can Notice
Mistakes?", Table 1): accuracy on clean (D), adversarial (A) and hypocritical (F) test examples.

  jaxpoison --config=configs/substandard.py --workdir=/tmp/substandard
  (append :tiny to the config path for a smoke run; the preset :linf evaluates the ℓ∞ threat
  model only, half the evaluation cost)

One run trains the victim (the quickstart's CNN for the data, width 0.5, Adam, 10 epochs, 3 seeds)
on the five training sets of the paper, built from a class-balanced 2,500-image subset of
shared/data/cifar10.npz, and evaluates it on 1,000 class-balanced test images:

=============  ==========================================================================
run            training set
=============  ==========================================================================
naive          none: the victim at initialisation (``include_naive``, zero epochs)
noise          every image replaced by uniform noise (``poisons.substandard.noise``)
mislabeling    every label replaced by a random one (``poisons.substandard.mislabeling``)
poisoning      P1, the adversarial poison (PGD on a clean-trained surrogate, ℓ∞ 8/255)
clean          the clean data: the paper's *Quality* model
=============  ==========================================================================

``config.evals`` runs the ``risk`` evaluator (`jaxpoison.evaluation.risk`) in the paper's two
threat models, ℓ∞ 8/255 and ℓ2 0.5 (10 PGD steps each, to fit the CPU budget; the reference uses
more): ``summary[run]['evals'][norm]['acc/D' | 'acc/A' | 'acc/F']`` hold mean ± std over seeds,
printed as a table at the end and in ``jaxpoison report``. What to look for (the paper's point):
a substandard model's accuracy on F lies far above its accuracy on D, so a false friend who
controls the verification data can make it look as good as the Quality model.

The THRM / TRADES λ sweep of the same paper is its own config, configs/lambda_sweep.py: it
varies the training objective on the clean set, an axis orthogonal to these training sets (the
experiment trains every objective on every set, so one config would train 5 × 9 victims).

Expected: the table of docs/results/2026-11-substandard.md, both threat models (measured on 2
shared CPU cores; Quality model D 45.1%, F 94.5% in ℓ∞ and 76.8% in ℓ2).
"""

import ml_collections

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("linf",))
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = "substandard models: accuracy on D / A / F (CIFAR-10)"
    config.seed = 0
    config.data = config_lib.data("cifar10", num_train=2500, num_test=1000, flip=True)
    epsilon = ml_collections.FieldReference(8 / 255)
    config.threat = dict(norm="linf", epsilon=epsilon)
    config.include_clean = True  # the Quality model
    config.include_naive = True  # the Naive model: untrained
    config.poisons = {
        "noise": dict(name="noise"),
        "mislabeling": dict(name="mislabeling"),
        "poisoning": dict(name="adversarial", num_steps=20, batch_size=256),
    }
    config.objectives = {"erm": dict(name="erm")}
    config.select = config_lib.select()
    config.evals = {
        "linf": dict(name="risk", norm="linf", epsilon=epsilon, num_steps=10, batch_size=500),
        "l2": dict(name="risk", norm="l2", epsilon=0.5, num_steps=10, batch_size=500),
    }
    config.loss_threshold = 0.5
    config.victim = config_lib.victim(
        config_lib.auto_model(0.5),
        epochs=10,
        batch_size=64,
        num_seeds=3,
        optimizer=config_lib.ADAM,
        checkpoint_every=5,
    )
    # The crafting model of the Poisoning set (trained on the clean subset).
    config.surrogate = config_lib.surrogate(
        config_lib.auto_model(0.5),
        epochs=10,
        batch_size=64,
        optimizer=config_lib.ADAM,
        checkpoint_every=5,
    )
    if "linf" in chosen:
        del config.evals["l2"]
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
