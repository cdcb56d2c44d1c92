r"""Simplicity bias on MNIST-CIFAR (Shah et al. 2020), ST vs AT restricted to the MNIST half
(Tao et al. 2021): does adversarial training make the network learn the CIFAR half?

  jaxpoison --config=configs/simplicity_bias.py --workdir=/tmp/simplicity_bias
  (append :tiny to the config path for a smoke run; the preset :mlp for the MLP victim)

Data: ``data.source='mnist_cifar'`` (jaxpoison/data/mnist_cifar.py) stacks an MNIST digit (0 or
1, padded to 32x32x3) on a CIFAR-10 image (automobile or truck), 64x32x3, the two halves agreeing
in training and test; 10,000 training and 1,960 test images from ../shared/data/mnist.npz and
cifar10.npz (or ``--config.data.data_dir``). Victim: the CIFAR CNN at width 0.5 (sized for 2 CPU
cores) with ``head='flatten'``, Adam lr 1e-3 / cosine, batch 128, 10 epochs, 2 seeds. The CNN's
default global average pooling would add the 2x1 last feature map's two positions, the digit's
and the CIFAR image's, so no FC layer could ignore the digit and AT restricted to it could only
collapse (measured: chance on both test sets after 2 epochs); the flattened head keeps the
halves apart. ``mlp``: the two-layer MLP at width 0.5 (256 units) instead.

AT's radius grows linearly from 0 to 1 over the first half of training (``epsilon_ramp=0.5``),
and the optimizer is Adam: with SGD (lr 0.05 or 0.01, momentum 0.9, weight decay 5e-4), with or
without the ramp, AT restricted to the digit collapsed the MLP to a constant output (training
loss ln 2, 1-7 of its 256 first-layer units still active), measured; docs/defenses.md.

Runs (``summary`` keys): ``st`` (erm) and ``at_mnist_half`` (pgd_at, ℓ∞ ε = 1 on the MNIST half
only, nothing elsewhere: ``mask`` = rows 0-31; 5 steps of 0.3). Each is evaluated after every
epoch on the normal test set (``final_test_acc``) and on the MNIST-randomized test set, whose
digits are shuffled across the test set (``final_mnist_randomized_acc``; 50% = the CIFAR half is
not used at all).

Expected (papers): ST ≈100% / ≈50%; AT restricted to the MNIST half ≈ the accuracy of a CIFAR
car-vs-truck classifier on both. Measured (docs/defenses.md): MLP ST 100 / 49.4%, AT 71.2 /
67.8% (2 seeds); CNN ST 100 / 49.3%, AT 80.1 / 76.7% (1 seed).
"""

import ml_collections

from jaxpoison import config_lib


def _mnist_mask():
    # = jaxpoison.data.mnist_cifar.mnist_mask(): rows 0-31 (the digit) may move, rows 32-63 not.
    return [[[1.0]]] * 32 + [[[0.0]]] * 32


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("mlp",))
    config = ml_collections.ConfigDict()
    config.trainer = "simplicity_bias"
    config.name = "simplicity bias: MNIST-CIFAR, ST vs AT on the MNIST half (linf 1)"
    config.seed = 0
    config.data = config_lib.data("mnist_cifar", source="mnist_cifar")
    config.objectives = {
        "st": dict(name="erm"),
        "at_mnist_half": dict(
            name="pgd_at",
            norm="linf",
            epsilon=1.0,
            num_steps=5,
            step_size=0.3,
            mask=_mnist_mask(),
            epsilon_ramp=0.5,
        ),
    }
    config.select = config_lib.select()
    config.loss_threshold = 0.1
    config.victim = config_lib.victim(
        dict(name="cnn_cifar", width=0.5, head="flatten"),
        epochs=10,
        batch_size=128,
        num_seeds=2,
        optimizer=config_lib.optimizer("adam", learning_rate=1e-3, weight_decay=0.0),
        eval_batch_size=1000,
    )
    if "mlp" in chosen:
        config.victim.model = dict(name="mlp", width=0.5)
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
