r"""Quickstart: class-wise Regions-4 poison vs clean data on the embedded CIFAR-10 subset.

  jaxpoison --config=configs/quickstart.py --workdir=/tmp/quickstart
  (append :tiny to the config path for a smoke run)

Crafts Regions-4 (Sandoval-Segura et al. 2022; 2x2 patches per class, each channel ±8/255),
trains the CNN for the data's shape (``model.name='auto'``: on CIFAR-10 the 5-layer CIFAR CNN of
Learning to Confuse) at half width with standard training on the clean and on the poisoned 2,500
training images (2 seeds each, 6 epochs, batch 64, Adam) and reports clean test accuracy on the
embedded 1,000 test images.

Sized for the 3-minute budget on 2 CPU cores. Adam (lr 1.5e-3, cosine) rather than SGD: on this
small set the no-BatchNorm CNN underfits with SGD in a few epochs (SGD lr 0.05, 10 epochs, 3
seeds: clean 32.9 ± 6.3% vs poisoned 27.7 ± 2.5%).

Expected (measured 2026-11-23 on 2 idle CPU cores with the oneDNN kernels, 53 s wall in all):
clean 40.30 ± 0.99%, Regions-4 32.15 ± 2.33% final clean test accuracy (with XLA's
convolutions: 39.85 ± 1.06% and 31.85 ± 1.63%, 2 min 38 s).
"""

import ml_collections

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = "quickstart: Regions-4 vs clean (embedded CIFAR-10 subset)"
    config.seed = 0
    config.data = config_lib.data("cifar10", source="embedded", flip=True)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(8 / 255))
    config.include_clean = True
    config.poisons = {"poisoned": dict(name="regions", num_patches=4)}
    config.objectives = {"erm": dict(name="erm")}
    config.select = config_lib.select()
    config.loss_threshold = 0.5
    config.victim = config_lib.victim(
        config_lib.auto_model(0.5),
        epochs=6,
        batch_size=64,
        num_seeds=2,
        optimizer=config_lib.ADAM,
        checkpoint_every=5,
    )
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
