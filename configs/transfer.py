r"""Transfer of error-maximizing poisons across architectures (issue 6): crafting model × victim.

  jaxpoison --config=configs/transfer.py --workdir=/tmp/transfer
  (append :tiny to the config path for a smoke run; :archs=mlp+cnn_cifar keeps some
  architectures, as crafting models and as victims, so the matrix can be built in parts: move
  a part's results.json away and a later, larger run in the same workdir reuses its victims
  and poisons; :victims=... sets the victims apart from the crafting models, e.g.
  :archs=mlp+cnn_cifar,victims=mlp+cnn_cifar+wrn28)

On a class-balanced 2,500-image subset of shared/data/cifar10.npz (ℓ∞ 8/255), crafts one
error-maximizing poison (PGD-20 ascent on a clean-trained surrogate, Fowl et al. 2021) with each
of five crafting architectures, at CPU-sized widths: an MLP (2 × 256 units), the CIFAR CNN of
Learning to Confuse (width 0.5), VGG-11 (BN, width 0.25), ResNet-18 (width 0.25) and WRN-28-1
(``wrn28_10`` at width 0.1); beside them
Regions-4, which needs no crafting model, and the clean set. ``config.victims`` then trains every
victim architecture (the same five) on every training set (2 seeds, 6 epochs, Adam), so runs are
named ``<victim>/<training set>``.

``results['transfer']`` (`jaxpoison.evaluation.transfer`), printed and drawn as heat maps:

* ``accuracy``: rows the training set (crafting architecture), columns the victim, cells its final
  clean test accuracy on 1,000 test images (``transfer.png``);
* ``attack_transfer``: the fraction of each poison's training examples that the *clean-trained*
  victim of every architecture misclassifies, beside its error on the clean training examples
  (``attack_transfer.png``): how well the error-maximizing perturbations transfer as adversarial
  examples (the diagonal is white-box).

Expected (docs/measurement.md, ``:archs=mlp+cnn_cifar+vgg11+resnet18,victims=<all five>``):
error-maximizing poisons take 1-13 points at this size, most from the victim of their own
architecture for the MLP and CNN; the ResNet-18- and VGG-11-crafted ones are the weakest;
Regions-4 takes 10-19 points from the deeper victims (VGG-11 53.6 -> 34.4%, ResNet-18
45.3 -> 30.7%, WRN-28-1 45.3 -> 35.1%). WRN-28-1 as a crafting model is not measured.
"""

import ml_collections

from jaxpoison import config_args

# Architecture name -> model spec, at CPU-sized widths (crafting models and victims alike).
ARCHITECTURES = {
    "mlp": dict(name="mlp", width=0.5),
    "cnn_cifar": dict(name="cnn_cifar", width=0.5),
    "vgg11": dict(name="vgg11", width=0.25),
    "resnet18": dict(name="resnet18", width=0.25),
    "wrn28": dict(name="wrn28_10", width=0.1),  # WRN-28-1
}


def get_config(arg=None):
    flags, values = config_args.parse(
        arg,
        flags=("tiny",),
        fields={
            "archs": config_args.names(ARCHITECTURES),
            "victims": config_args.names(ARCHITECTURES),
        },
    )
    tiny, archs = "tiny" in flags, values.get("archs")
    chosen = {a: ARCHITECTURES[a] for a in archs or ARCHITECTURES}
    victims = {a: ARCHITECTURES[a] for a in values.get("victims") or chosen}
    config = ml_collections.ConfigDict()
    config.name = "transfer: error-maximizing poisons across architectures (CIFAR-10)"
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
    config.poisons = {
        f"em_{arch}": dict(
            name="error_maximizing",
            num_steps=20,
            batch_size=256,
            surrogate=dict(model=dict(model)),
        )
        for arch, model in chosen.items()
    }
    config.poisons.regions4 = dict(name="regions", num_patches=4)
    config.objectives = {"erm": dict(name="erm")}
    config.loss_threshold = 0.5
    optimizer = dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0, schedule="cosine")
    config.victim = dict(
        model=dict(ARCHITECTURES["cnn_cifar"]),
        epochs=6,
        batch_size=64,
        num_seeds=2,
        seed_strategy="auto",
        eval_batch_size=500,
        checkpoint_every=3,
        optimizer=optimizer,
    )
    config.victims = {arch: dict(model=dict(model)) for arch, model in victims.items()}
    # The crafting models: this spec with each poison's ``surrogate.model``.
    config.surrogate = dict(
        model=dict(ARCHITECTURES["cnn_cifar"]),
        epochs=6,
        batch_size=64,
        eval_batch_size=500,
        checkpoint_every=3,
        optimizer=dict(optimizer),
    )
    if tiny:
        config.data.num_train = 200
        config.data.num_test = 100
        for cfg in (config.victim, config.surrogate):
            cfg.epochs = 1
            cfg.batch_size = 50
            cfg.checkpoint_every = 1
        for spec in config.poisons.values():
            if "surrogate" in spec:
                spec.num_steps = 2
                spec.batch_size = 50
                spec.surrogate.model.width = min(0.125, spec.surrogate.model.width)
        for victim in config.victims.values():
            victim.model.width = min(0.125, victim.model.width)
    return config
