r"""BadNets backdoor on all of MNIST: attack success rate and clean accuracy vs clean, by rate.

  jaxpoison --config=configs/badnets_mnist.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run; --config.select.poisons="('badnets',)" runs
  only the 1 % set; --config.trigger.target=3 moves the target of both the poison and the
  evaluation)

The literature's setting (Gu et al. 2017): the whole training set (60,000 images, 10,000 test),
a 3x3 checkerboard in the bottom-right corner stamped on 1 % (run ``badnets``, 600 images),
0.5 % (``badnets_05``, 300) or 0.1 % (``badnets_01``, 60) of the training images, chosen at
random, whose labels become class 0 (all-to-one). Victim: LeNet (``cnn_mnist``) at width 0.5,
Adam 1e-3 cosine, batch 128, 2 epochs, 3 seeds, no augmentation. The ``asr`` evaluation
(``backdoor``) stamps the same trigger on the clean test images: ``eval/asr/asr`` is the share
of the non-target test images classified as the target, ``eval/asr/acc/D`` the clean accuracy.
"""

import ml_collections

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = config_lib.poison_family("BadNets backdoor vs clean (MNIST, full)", runs=())
    config.data = config_lib.data("mnist")
    # One field per trigger setting, shared by the poisons and the evaluation.
    config.trigger = dict(
        target=ml_collections.FieldReference(0),
        all_to_all=ml_collections.FieldReference(False),
        patch_size=ml_collections.FieldReference(3),
        position=ml_collections.FieldReference("bottom_right"),
        pattern=ml_collections.FieldReference("checkerboard"),
    )
    trigger = {k: config.trigger.get_ref(k) for k in config.trigger}
    config.poisons = dict(
        badnets=dict(name="badnets", fraction=0.01, **trigger),
        badnets_05=dict(name="badnets", fraction=0.005, **trigger),
        badnets_01=dict(name="badnets", fraction=0.001, **trigger),
    )
    config.evals = dict(asr=dict(name="backdoor", **trigger))
    config.victim = config_lib.victim(
        dict(name="cnn_mnist", width=0.5),
        epochs=2,
        batch_size=128,
        num_seeds=3,
        optimizer=config_lib.optimizer("adam", learning_rate=1e-3, weight_decay=0.0),
        eval_batch_size=1000,
    )
    del config.surrogate  # no poison here needs a crafting model
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
