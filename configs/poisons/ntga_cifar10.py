r"""NTGA on all of CIFAR-10 with the reference's settings, beside the clean baseline (a GPU run).

  jaxpoison --config=configs/poisons/ntga_cifar10.py --workdir=WORKDIR
  (append :tiny to the config path for a smoke run; the CPU-sized NTGA of the poison family
  is --config=configs/poison_family.py --config.select.poisons="('ntga',)")

Neural tangent generalization attack (Yuan & Wu 2021), as lionelmessi6410/ntga's
generate_attack.py sets it for CIFAR-10: ℓ∞ ε = 8/255; blocks of 512 training images, each
attacked once with its own kernel; 10 PGD steps of 1.1 ε / 10; the kernel predictor at
t = 64 with diagonal regulariser 1e-4, scored on a clean target set of 10,000 training images
(20 %); the surrogate is the reference's FNN (5 dense layers of 512 units), here a finite ReLU
MLP whose empirical NTK at initialisation (one logit) replaces the infinite-width Erf kernel.
The victims: the CIFAR CNN at full width, Adam, batch 128, 20 epochs, 3 seeds, flips, on all
50,000 training images; clean test accuracy on the 10,000 test images.

Crafting holds, per PGD step, the kernel of 10,000 targets against a block of 512 examples:
Jacobians of 256 examples at a time (2.7 GB in float32 for the 2.6M-parameter MLP), about
1.3e13 flops for the contraction and three times that with its gradient; sized for one GPU.

Expected: not measured yet (no GPU was lent to the session that wrote it); the CPU-sized
family run is in docs/results/2026-12-ntga.md.
"""

from jaxpoison import config_lib


def get_config(arg=None):
    chosen = config_lib.preset(arg)
    config = config_lib.poison_family(
        "NTGA (empirical NTK of a 5x512 MLP) vs clean, all of CIFAR-10", runs=("ntga",)
    )
    config.data.num_train = 0
    config.data.num_test = 0
    config.poisons.ntga = dict(
        name="ntga",
        kernel_model=dict(name="mlp", width=1.0, hidden=(512, 512, 512, 512, 512)),
        num_outputs=1,
        t=64.0,
        diag_reg=1e-4,
        target_size=0.2,  # 10,000 of the 50,000 training images
        num_steps=10,
        num_epochs=1,
        chunk_size=256,
        batch_size=512,
    )
    config.victim.model = config_lib.auto_model(1.0)
    config.victim.epochs = 20
    config.victim.batch_size = 128
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
