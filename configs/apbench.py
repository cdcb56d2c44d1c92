r"""APBench's attacks × defenses grid (TMLR 2024) in one command: every availability poison of its
CIFAR-10 table against every defense, with seeds and std.

  jaxpoison --config=configs/apbench.py --workdir=/tmp/apbench              # GPU-sized
  jaxpoison --config=configs/apbench.py:cpu --workdir=/tmp/apbench_cpu      # 2 CPU cores
  (append ,tiny for a smoke run; --config.select.poisons="('em','ops')" and
  --config.select.objectives="('erm','jpeg')" run part of the grid)

Rows (``config.poisons``, APBench's names): em (error-minimizing, Huang et al.), rem (robust EM),
sem (stable EM), tap (targeted adversarial poisoning), ar (autoregressive, ℓ2 ε = 1), lsp
(linear-separable patches, ℓ2 1.30), ops (one-pixel shortcut, ℓ0), ntga, hypo (hypocritical,
Tao et al.'s P2), dc (DeepConfuse = Learning to Confuse, ℓ∞ 0.032), cuda (class-wise blur),
beside the clean training set; ℓ∞ ε = 8/255 otherwise. One row beyond APBench's: colour, a
class-wise colour (Regions-1: one ±ε colour per class, 8 colours for 10 classes), the
low-frequency pattern that ISS's grayscale is meant to defeat.

Columns (``config.objectives``: an objective with optional data-side ``transforms``,
see jaxpoison/transforms): erm (no defense), cutout (16 px), cutmix, mixup, gaussian (3x3 blur,
σ = 0.1), bdr (2-bit depth), gray (grayscale), jpeg (quality 10), ortho (orthogonal projection;
the reference's number of SGD steps for its linear model),
ueraser (max loss over 5 augmented copies; UEraser-Lite, one copy, with ``cpu``),
at (PGD-AT, 8/255; 10 steps of 2/255 on the GPU preset), dp_sgd (DP-SGD, clip 1, noise 0.3,
``cpu`` only: it needs a model without BatchNorm) and early stopping, which is not a
training of its own: with a validation split (``data.val_size``, 10 % here) every cell records
the test accuracy at the epoch of best validation accuracy, and the table's ``early_stopping``
column is that of erm.

Output, beside each run's history: ``results['defense_grid']`` (mean ± std over seeds of the final
clean test accuracy, APBench's measure; the clean row and each defense's cost on clean data),
printed as a markdown table and drawn as ``defense_grid.png``. Poisons are crafted once and
reused by content key, victims are checkpointed per cell: adding a defense (a new entry of
``config.objectives``) and rerunning in the same workdir trains only its column.

Presets:

* (default, GPU-sized) APBench's protocol: all 50,000 CIFAR-10 training images (5,000 held out
  for early stopping), ResNet-18 victims trained 200 epochs, batch 256, SGD lr 0.1, momentum 0.9,
  weight decay 5e-4, the rate halved at epoch 100 (APBench's MultiStepLR [100, 200, 300] × 0.5
  over 200 epochs), random crop (pad 4) + flip, 3 seeds; APBench's crafting settings (EM: 5 PGD
  steps of ε/5 against a ResNet-18; REM/SEM: the same, adversary at ε/2 with 5 steps of ε/10;
  TAP: 250 steps, 8 restarts, augmentation; NTGA: the reference's blocks of 512; hypo and TAP on
  a clean-trained ResNet-18, 40 epochs). Not run on the project's CPUs.
* ``cpu``: the poison family's setting (configs/poison_family.py), which finishes on 2 cores in
  hours: 2,500 / 1,000 class-balanced CIFAR-10 images (250 held out for early stopping), the
  CIFAR CNN at width 0.5 trained 10 epochs with Adam (1.5e-3, cosine), batch 64, flips, 3 seeds;
  the poisons at the family's reduced crafting steps (``config_lib.FAMILY_SPECS``), dc the CPU
  generator of docs/l2c.md; at is FGSM-RS (one step of 1.25 ε from a uniform start, Wong et al.
  2020), a third of PGD-5's cost; ueraser is UEraser-Lite (CE of one augmented copy): the max over
  5 copies does not train in 10 epochs (10.0 % on clean data, every victim predicting one class),
  Lite reaches 26.1 %; dp_sgd's noise is 0.3, not 1 (1 learns 14.9 % on clean data; 0.3 learns
  26.3 % at ε = 131: no privacy to speak of, a bound on each example's gradient). The orderings,
  not the absolute numbers, are comparable with APBench's table.
* ``diffusion`` (with or without ``cpu``): adds the column ``diffusion``, AVATAR's diffusion
  purification (``diffusion_purification``: t* = 0.1, ancestral sampling; every one of the 100
  reverse steps on the GPU preset, 10 strided ones with ``cpu``) with the score model at
  ``--config.score_model=PATH`` (made by configs/score_model.py: ``WORKDIR/score_model``, or a
  score_sde checkpoint file); without a path the run stops with that instruction.
* ``transfer``: only erm, every victim architecture of ``config.victims`` (ResNet-18, ResNet-50,
  VGG-16, WRN-28-10; with ``cpu``: the CPU widths of configs/transfer.py) on every poison.

Expected: the ``cpu`` table is in docs/results/; the GPU table is not measured.
"""

import ml_collections

from jaxpoison import config_lib

EPS = 8 / 255
RESNET18 = dict(name="resnet18", width=1.0)
SGD = config_lib.optimizer(learning_rate=0.1, momentum=0.9, weight_decay=5e-4)
# The crafting model of tap and hypo (APBench: a clean-trained ResNet-18, here 40 epochs).
RESNET18_SURROGATE = dict(model=RESNET18)
# APBench's victim schedule: MultiStepLR(milestones=[100, 200, 300], gamma=0.5) over 200 epochs.
APBENCH_SGD = dict(SGD, schedule="piecewise", milestones=(0.5,), decay_factor=0.5)

# Row name -> FAMILY_SPECS key of the cpu preset (dc is built separately).
CPU_ATTACKS = {
    "em": "error_minimizing",
    "rem": "robust_error_minimizing",
    "sem": "stable_error_minimizing",
    "tap": "tap",
    "ar": "autoregressive",
    "lsp": "lsp",
    "ops": "one_pixel",
    "ntga": "ntga",
    "hypo": "hypocritical",
    "cuda": "cuda",
    "colour": "regions_1",
}

# APBench's defense settings; `at` is set per preset.
TRANSFORM_DEFENSES = {
    "cutout": dict(cutout=dict(length=16)),
    "cutmix": dict(cutmix=dict(alpha=1.0)),
    "mixup": dict(mixup=dict(alpha=1.0)),
    "gaussian": dict(gaussian_blur=dict(kernel_size=3, sigma=0.1)),
    "bdr": dict(bit_depth=dict(bits=2)),
    "gray": dict(grayscale={}),
    "jpeg": dict(jpeg=dict(quality=10)),
    "ortho": dict(orthogonal_projection={}),
}

TRANSFER_GPU = {
    "resnet18": RESNET18,
    "resnet50": dict(name="resnet50", width=1.0),
    "vgg16": dict(name="vgg16", width=1.0),
    "wrn28_10": dict(name="wrn28_10", width=1.0),
}
TRANSFER_CPU = {
    "cnn_cifar": dict(name="cnn_cifar", width=0.5),
    "vgg11": dict(name="vgg11", width=0.25),
    "resnet18": dict(name="resnet18", width=0.25),
    "wrn28": dict(name="wrn28_10", width=0.1),
}


def _objectives(at):
    objectives = {"erm": dict(name="erm")}
    for label, transforms in TRANSFORM_DEFENSES.items():
        objectives[label] = dict(name="erm", transforms=transforms)
    # UEraser: the max loss over 5 augmented copies for the whole run (APBench: its first 300
    # epochs, longer than its 200-epoch victims); the JPEG variant APBench uses for TAP and AR
    # is --config.objectives.ueraser.jpeg=True.
    objectives["ueraser"] = dict(name="ueraser", num_copies=5, repeat_fraction=1.0)
    objectives["at"] = at
    return objectives


def _gpu_poisons():
    em = dict(num_steps=5, step_size=EPS / 5, batch_size=512, model=RESNET18)
    robust = dict(
        em, adversarial_epsilon=EPS / 2, adversarial_steps=5, adversarial_step_size=EPS / 10
    )
    return {
        "em": dict(name="error_minimizing", num_epochs=20, **em),
        "rem": dict(name="robust_error_minimizing", **robust),
        "sem": dict(name="stable_error_minimizing", **robust),
        "tap": dict(
            name="tap",
            num_steps=250,
            num_restarts=8,
            crop_padding=4,
            flip=True,
            batch_size=512,
            surrogate=RESNET18_SURROGATE,
        ),
        "ar": dict(name="autoregressive", threat=dict(norm="l2", epsilon=1.0)),
        "lsp": dict(name="lsp", patch_size=8, threat=dict(norm="l2", epsilon=1.3043)),
        "ops": dict(name="one_pixel", threat=dict(norm="l0", pixels=1)),
        "ntga": dict(
            name="ntga",
            kernel_model=dict(name="mlp", width=1.0, hidden=(512,) * 5),
            t=64.0,
            diag_reg=1e-4,
            target_size=0.2,
            num_steps=10,
            batch_size=512,
        ),
        "hypo": dict(
            name="hypocritical", num_steps=100, batch_size=512, surrogate=RESNET18_SURROGATE
        ),
        "dc": dict(config_lib.l2c_cifar10_poison(), threat=dict(norm="linf", epsilon=0.032)),
        "cuda": dict(name="cuda", kernel_size=3, blur_parameter=0.3, class_wise=True),
        "colour": config_lib.family_poisons(("regions_1",))["regions_1"],
    }


def _cpu_poisons():
    poisons = config_lib.family_poisons(CPU_ATTACKS)
    poisons["dc"] = dict(
        config_lib.l2c_cifar10_poison(cpu=True),
        method="algorithm2",
        num_epochs=32,
        threat=dict(norm="linf", epsilon=0.032),
    )
    return poisons


def get_config(arg=None):
    chosen = config_lib.preset(arg, ("cpu", "transfer", "diffusion"))
    cpu = "cpu" in chosen
    if cpu:
        config = config_lib.poison_family("APBench grid, CIFAR-10 subset (CPU preset)")
        config.data.val_size = 250
        config.poisons = _cpu_poisons()
        config.victim.epochs = 10
        at = dict(name="pgd_at", norm="linf", epsilon=EPS, num_steps=1, step_size=1.25 * EPS)
        # DP-SGD needs a model without BatchNorm: the CIFAR CNN here, not ResNet-18. Noise 1
        # learns nothing in 10 epochs on 2,250 images (14.9 % on clean data), 0.3 learns 26.3 %.
        extra = {"dp_sgd": dict(name="erm", privacy=dict(l2_norm_clip=1.0, noise_multiplier=0.3))}
    else:
        config = ml_collections.ConfigDict()
        config.trainer = "grid"
        config.name = "APBench grid, CIFAR-10, ResNet-18"
        config.seed = 0
        config.data = config_lib.data("cifar10", crop_padding=4, flip=True)
        config.data.val_size = 5000
        config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(EPS))
        config.include_clean = True
        config.poisons = _gpu_poisons()
        config.select = config_lib.select()
        config.loss_threshold = 0.5
        config.victim = config_lib.victim(
            RESNET18,
            epochs=200,
            batch_size=256,
            num_seeds=3,
            optimizer=APBENCH_SGD,
            eval_batch_size=1000,
            checkpoint_every=10,
        )
        # The data's CNN by default; tap and hypo name their ResNet-18 (RESNET18_SURROGATE).
        config.surrogate = config_lib.surrogate(
            config_lib.auto_model(1.0),
            epochs=40,
            batch_size=128,
            optimizer=SGD,
            eval_batch_size=1000,
        )
        at = dict(name="pgd_at", norm="linf", epsilon=EPS, num_steps=10, step_size=2 / 255)
        extra = {}
    config.objectives = _objectives(at) | extra
    if cpu:
        # The max over 5 copies leaves every 10-epoch victim predicting one class (10.0 % on
        # clean data); UEraser-Lite (one augmented copy throughout) learns 26.1 %.
        config.objectives.ueraser.repeat_fraction = 0.0
        # The reference fits ortho's linear model for 20 epochs of 49 batches of 1,024 (980 SGD
        # steps on 50,000 images). Here an epoch is 3 batches, so 320 epochs take as many steps;
        # 20 (60 steps) fit the LSP and OPS sets to 38 % and 37 % (92 % and 96 % after 320).
        config.objectives.ortho.transforms.orthogonal_projection.epochs = 320
    if "diffusion" in chosen:
        config.score_model = ml_collections.FieldReference("", field_type=str)
        purification = dict(
            score_model=config.get_ref("score_model"),
            t_star=0.1,
            num_steps=10 if cpu else None,
            sampler="ddpm",
        )
        config.objectives.diffusion = dict(
            name="erm", transforms=dict(diffusion_purification=purification)
        )
    if "transfer" in chosen:
        # erm only, declared alone: its runs are named by victim and poison, not by objective.
        config.objectives = ml_collections.ConfigDict({"erm": config.objectives.erm.to_dict()})
        config.victims = {
            name: dict(model=model)
            for name, model in (TRANSFER_CPU if cpu else TRANSFER_GPU).items()
        }
    if "tiny" in chosen:
        config_lib.tiny(config)
    return config
