r"""THRM vs TRADES λ sweep (Tao et al. 2022): natural risk against hypocritical risk on D-.

  jaxpoison --config=configs/lambda_sweep.py --workdir=/tmp/lambda_sweep
  (append :tiny to the config path for a smoke run; :lambdas=1+6 picks the weights)

Trains the victim (CIFAR CNN, width 0.5, Adam, 10 epochs, 2 seeds) on a clean class-balanced
2,500-image subset of shared/data/cifar10.npz with standard training (λ = 0) and with TRADES and
THRM at λ (``beta``) in {1, 3, 6, 12} (defender: ℓ∞ 8/255, 5 inner PGD steps of 2/255), and
with PGD-AT at the same budget, then runs the ``risk`` evaluator (ℓ∞ 8/255, 10 steps) on 1,000
test images. ``lambda_sweep.png`` plots R_nat (x) against R_hyp/D- (y), the share of the
misclassified test examples that the hypocritical attack makes correct, one line per objective
family, points labelled by λ, PGD-AT as a lone marker; ``results['lambda_sweep']`` holds the
same points (`jaxpoison.evaluation.tradeoff`).

A config of its own rather than a section of configs/substandard.py: the sweep varies the
training *objective* on the clean set, while the substandard study varies the training *set*
under standard training; the experiment trains every objective on every training set, so one
config holding both would train 9 × 5 victims, 36 of them meaningless.

Expected (docs/measurement.md, this config): R_hyp on D- falls from 88.6% (ST) to 69.0 / 77.1%
(TRADES / THRM, λ = 1), 61.5 / 61.8% (λ = 3), 45.4 / 51.1% (λ = 6), 40.8 / 38.1% (λ = 12) and
13.2% (PGD-AT); THRM and TRADES trace one trade-off curve at this size (the paper's point, THRM
below TRADES at equal natural risk, is not reproduced consistently).
"""

import ml_collections

from jaxpoison import config_args

LAMBDAS = (1.0, 3.0, 6.0, 12.0)


def _objectives(lambdas, defender):
    out = {"erm": dict(name="erm"), "pgd_at": dict(name="pgd_at", **defender)}
    for family in ("trades", "thrm"):
        for lam in lambdas:
            out[f"{family}_{lam:g}"] = dict(name=family, beta=lam, **defender)
    return out


def get_config(arg=None):
    flags, values = config_args.parse(
        arg, flags=("tiny",), fields={"lambdas": config_args.positive_floats}
    )
    tiny, lambdas = "tiny" in flags, values.get("lambdas")
    config = ml_collections.ConfigDict()
    config.name = "THRM vs TRADES: natural risk vs hypocritical risk on D- (CIFAR-10)"
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
    config.include_clean = True
    config.poisons = {}
    defender = dict(norm="linf", epsilon=epsilon, num_steps=5, step_size=2 / 255)
    config.objectives = _objectives(lambdas or LAMBDAS, defender)
    config.evals = {"linf": dict(name="risk", norm="linf", epsilon=epsilon, num_steps=10)}
    config.lambda_sweep = dict(eval="linf", train_set="clean")
    config.loss_threshold = 0.5
    config.victim = dict(
        model=dict(name="cnn_cifar", width=0.5),
        epochs=10,
        batch_size=64,
        num_seeds=2,
        seed_strategy="auto",
        eval_batch_size=500,
        checkpoint_every=5,
        optimizer=dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0, schedule="cosine"),
    )
    if tiny:
        config.data.num_train = 200
        config.data.num_test = 100
        tiny_defender = dict(norm="linf", epsilon=epsilon, num_steps=2, step_size=4 / 255)
        config.objectives = _objectives(lambdas or (1.0, 6.0), tiny_defender)
        config.evals.linf.num_steps = 3
        config.victim.model.width = 0.125
        config.victim.epochs = 1
        config.victim.batch_size = 50
        config.victim.checkpoint_every = 1
    return config
