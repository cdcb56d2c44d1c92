r"""Transfer of error-maximizing poisons across architectures (issue 6): crafting model × victim.

  jaxpoison --config=configs/transfer.py --workdir=/tmp/transfer
  (append :tiny to the config path for a smoke run; some architectures, as crafting models
  and as victims, with --config.select.poisons="('em_mlp','em_cnn_cifar','regions4')"
  --config.select.victims="('mlp','cnn_cifar')", so the matrix can be built in parts: move a
  part's results.json away and a later, larger run in the same workdir reuses its victims
  and poisons)

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

Expected (docs/measurement.md; crafting models mlp, cnn_cifar, vgg11, resnet18, all five
victims): error-maximizing poisons take 1-13 points at this size, most from the victim of their
own architecture for the MLP and CNN; the ResNet-18- and VGG-11-crafted ones are the weakest;
Regions-4 takes 10-19 points from the deeper victims (VGG-11 53.6 -> 34.4%, ResNet-18
45.3 -> 30.7%, WRN-28-1 45.3 -> 35.1%). WRN-28-1 as a crafting model is not measured.
"""

import ml_collections

from jaxpoison import config_lib

# Architecture name -> model spec, at CPU-sized widths (crafting models and victims alike).
ARCHITECTURES = {
    "mlp": dict(name="mlp", width=0.5),
    "cnn_cifar": dict(name="cnn_cifar", width=0.5),
    "vgg11": dict(name="vgg11", width=0.25),
    "resnet18": dict(name="resnet18", width=0.25),
    "wrn28": dict(name="wrn28_10", width=0.1),  # WRN-28-1
}


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = "transfer: error-maximizing poisons across architectures (CIFAR-10)"
    config.seed = 0
    config.data = config_lib.data("cifar10", num_train=2500, num_test=1000, flip=True)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(8 / 255))
    config.include_clean = True
    # One error-maximizing poison per crafting architecture (``em_<arch>``), and Regions-4.
    config.poisons = {
        f"em_{arch}": dict(
            name="error_maximizing",
            num_steps=20,
            batch_size=256,
            surrogate=dict(model=dict(model)),
        )
        for arch, model in ARCHITECTURES.items()
    }
    config.poisons.regions4 = dict(name="regions", num_patches=4)
    config.objectives = {"erm": dict(name="erm")}
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    # The fields every victim shares; ``victims`` gives each its architecture.
    config.victim = config_lib.victim(
        config_lib.auto_model(0.5),
        epochs=6,
        batch_size=64,
        num_seeds=2,
        optimizer=config_lib.ADAM,
        checkpoint_every=3,
    )
    config.victims = {arch: dict(model=dict(model)) for arch, model in ARCHITECTURES.items()}
    # The crafting models: this spec with each poison's ``surrogate.model``.
    config.surrogate = config_lib.surrogate(
        config_lib.auto_model(0.5),
        epochs=6,
        batch_size=64,
        optimizer=config_lib.ADAM,
        checkpoint_every=3,
    )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
