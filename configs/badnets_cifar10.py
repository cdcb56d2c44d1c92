r"""BadNets backdoor on a CIFAR-10 subset: attack success rate and clean accuracy vs clean.

  jaxpoison --config=configs/badnets_cifar10.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run, :full for all of CIFAR-10;
  --config.trigger.target=3 moves the target of both the poison and the evaluation,
  --config.poisons.badnets.fraction=0.05 the rate)

A 3x3 checkerboard in the bottom-right corner, stamped on 1 % (run ``badnets``) or 10 %
(``badnets_10``) of the training images, chosen at random, whose labels become class 0 (Gu et
al. 2017, all-to-one). The poison family's setting (``config_lib.poison_family``): class-balanced
2,500 training / 1,000 test images of shared/data/cifar10.npz, flips, the CIFAR CNN at width 0.5,
Adam, 6 epochs, 3 seeds. The ``asr`` evaluation (``backdoor``) stamps the same trigger on the
clean test images: ``eval/asr/asr`` is the share of non-target images classified as the target,
``eval/asr/acc/D`` the clean accuracy.

Expected (2026-12-06, commit 38d6c6f; docs/results/2026-12-badnets.md): ``badnets_10`` ASR
100.00 ± 0.00 % at 38.80 ± 1.83 % clean accuracy (clean 39.93 ± 0.95 %); ``badnets`` (1 %) ASR
6.67 ± 0.44 %, the clean model's base rate (6.00 %): not learned by these 6-epoch victims.

``full``: the literature's setting, all 50,000 training images (1 % = 500 poisoned) and the
10,000 test images, only ``badnets`` (1 %) beside clean training; the CNN at width 0.5, batch
128, 8 epochs, 1 seed (about 30 minutes a run on 2 shared CPU cores), a checkpoint every epoch.
``--config.include_clean=False`` trains the poisoned run alone; moving that workdir's
results.json away and running ``:full`` in it again adds the clean run (the poisoned one is
restored from its checkpoints). Expected (2026-12-06, commits 43f508a / 45c9920, the two runs):
``badnets`` ASR 96.73 % at 69.88 % clean accuracy, clean training 70.60 % (ASR 2.40 %): the
issue's 1 % criterion met with one seed; the backdoor appears in epochs 3-4.
"""

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("full",))
    config = config_lib.poison_family("BadNets backdoor vs clean (CIFAR-10)", runs=())
    trigger = config_lib.backdoor_trigger(config)  # shared by the poisons and the evaluation
    config.poisons = dict(
        badnets=dict(name="badnets", fraction=0.01, **trigger),
        badnets_10=dict(name="badnets", fraction=0.1, **trigger),
    )
    config.evals = dict(asr=dict(name="backdoor", **trigger))
    if "full" in chosen:
        config.name = "BadNets backdoor vs clean (CIFAR-10, full)"
        config.data.update(num_train=0, num_test=0)
        config.select.poisons = ("badnets",)
        config.victim.update(
            epochs=8, batch_size=128, num_seeds=1, eval_batch_size=1000, checkpoint_every=1
        )
        del config.surrogate  # no poison here needs a crafting model
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
