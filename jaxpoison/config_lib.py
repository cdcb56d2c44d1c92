"""Pieces shared by the experiment configs of ``configs/``.

ml_collections loads a config file from its path, outside any package, so the configs share
code through this module (``from jaxpoison import config_lib``):

* `data`, `optimizer`, `victim`, `surrogate`, `auto_model`, `select`: the blocks every config
  is built from. `data` carries every key any trainer reads, so ``--config.data.data_dir=...``,
  ``--config.data.source=npz --config.data.name=mnist`` and the like work on every config.
* `FAMILY_SPECS`, `family_poisons`, `poison_family`: the poison family of
  configs/poison_family.py, whose settings the per-poison, defenses, learning-speed and
  rotation-SSL configs reuse (same specs; an artifact is shared only where run name, data and
  surrogate match too, see `jaxpoison.workdir`).
* `l2c_cifar10_poison`: the Learning-to-Confuse generator of configs/l2c_cifar10.py, also a
  poison run of configs/defenses_cifar10.py.
* `preset` and `tiny`: the config argument.

The argument after a config's path is only ``tiny`` (a smoke run: `tiny`), a preset the
config names in its docstring, or several of these joined by commas (``:family,tiny``); a config
applies its presets in its own fixed order and ``tiny`` last. Everything else is an ordinary
override, with tuples for lists::

  jaxpoison --config=configs/poison_family.py:tiny --workdir=/tmp/w \\
      --config.victim.epochs=20 --config.select.poisons="('random','regions')" \\
      --config.data.data_dir=/data
"""

from __future__ import annotations

import copy

import ml_collections

# What `tiny` caps, wherever these keys occur in the victim, surrogate, victims, poisons,
# objectives and evals blocks: training lengths, seeds, batch sizes, model widths (model specs
# are the dicts with both a ``name`` and a ``width``) and the step counts of crafting (poisons),
# of the defenders' inner attacks (objectives) and of the evaluators.
TINY_CAPS = {
    "epochs": 2,
    "num_seeds": 2,
    "batch_size": 50,
    "outer_batch_size": 50,
    "eval_batch_size": 100,
    "checkpoint_every": 1,
    "width": 0.125,
    "num_epochs": 1,
    "num_steps": 2,
    "train_steps": 2,
    "unroll_steps": 2,
    "truncation": 2,
    "victim_reset_every": 2,
}
# The data sizes of a smoke run (class-balanced subsets).
TINY_DATA = {"num_train": 200, "num_test": 100}
_TINY_BLOCKS = ("victim", "surrogate", "victims", "poisons", "objectives", "evals")


def preset(arg, presets=()):
    """The names a config argument chooses: ``tiny`` and the config's own `presets`.

    Args:
      arg: what follows the config path's colon (``None`` or ``""`` when nothing does):
        ``tiny``, one of `presets`, or several of these joined by commas, e.g. ``family,tiny``.
      presets: the names of the presets this config offers besides ``tiny``.

    Returns:
      The chosen names, a frozenset (empty for no argument).

    Raises:
      ValueError: a word that is not ``tiny`` nor one of `presets` (e.g. an old
        ``epochs=20`` option), or a repeated word; the message names the choices and the
        override syntax that replaces the old options.
    """
    words = arg.split(",") if arg else []
    if set(words) - {"tiny", *presets} or len(set(words)) < len(words):
        names = ("tiny", *presets)
        takes = f"{', '.join(names[:-1])} or {names[-1]}, several joined by commas"
        takes = takes if presets else "only tiny"
        raise ValueError(
            f"Unknown config argument {arg!r}: this config takes {takes}; set anything else "
            "with --config.<field>=<value>, e.g. --config.victim.epochs=20 or "
            "--config.select.poisons=\"('random','regions')\"."
        )
    return frozenset(words)


def tiny(config):
    """Shrinks `config` in place to a smoke run of a few minutes on a CPU, and returns it.

    The one shrink of every config: ``data`` to `TINY_DATA` images (``val_size`` to at most
    20), and in the victim, surrogate, victims, poisons, objectives and evals blocks every key
    of `TINY_CAPS` to at most its cap (so ``checkpoint_every=0``, only at the end, stays 0).
    What to run is left alone: ``select``, ``include_clean`` and the specs' other fields (a
    config with a block of its own, e.g. ``theory``, shrinks that itself).

    Args:
      config: a config built by a ``configs/*.py`` file.

    Returns:
      `config`, shrunk.
    """
    if "data" in config:
        config.data.update(TINY_DATA)
        config.data.val_size = min(config.data.val_size, 20)
    for block in _TINY_BLOCKS:
        if block in config:
            _cap(config[block])
    return config


def _cap(node):
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            _cap(value)
        elif key in TINY_CAPS and isinstance(value, (int, float)) and not isinstance(value, bool):
            if key != "width" or "name" in node:
                node[key] = type(value)(min(value, TINY_CAPS[key]))


def data(
    name="cifar10",
    *,
    source="npz",
    num_train=0,
    num_test=0,
    val_size=0,
    crop_padding=0,
    flip=False,
):
    """The data block: every key `jaxpoison.data.load` and the trainers read.

    Every config's ``data`` has the same keys, so the same ``--config.data.<key>=...``
    overrides work on each.

    Args:
      name: the dataset (for ``source='npz'``, the file ``<data_dir>/<name>.npz``).
      source: one of `jaxpoison.data.SOURCES` (``npz``, ``embedded``, ``digits``, ``tfds``,
        ``mnist_cifar``).
      num_train: class-balanced training subset size (0: all).
      num_test: class-balanced test subset size (0: all).
      val_size: (poisoned) training images held out, class-balanced, as a validation split
        (0: none).
      crop_padding: random-crop padding of training batches (0: no crop).
      flip: random horizontal flips of training batches.

    Returns:
      A dict with these keys and ``data_dir`` (``''``: $JAXPOISON_DATA_DIR, ./shared/data,
      ../shared/data), ``path`` (``''``, or an .npz file read instead of
      ``<data_dir>/<name>.npz``) and ``download`` (tfds only).
    """
    return dict(
        source=source,
        name=name,
        data_dir="",
        path="",
        download=False,
        num_train=num_train,
        num_test=num_test,
        val_size=val_size,
        crop_padding=crop_padding,
        flip=flip,
    )


def optimizer(
    name="sgd",
    *,
    learning_rate,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="cosine",
    warmup_epochs=0.0,
):
    """The keyword arguments of `training.make_optimizer` that the configs set.

    ``warmup_epochs`` (a linear rise of the learning rate from 0 over that many epochs) is
    there, at 0, so ``--config.victim.optimizer.warmup_epochs=2`` can set it.
    """
    return dict(
        name=name,
        learning_rate=learning_rate,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_epochs=warmup_epochs,
    )


# The poison family's victim optimizer (the quickstart's before it moved to 10 epochs at 3e-3):
# on 2,500 CIFAR-10 images Adam learns the BatchNorm-free CNN in 6 epochs where SGD underfits.
ADAM = optimizer("adam", learning_rate=1.5e-3, weight_decay=0.0)


def auto_model(width=1.0):
    """A model spec that the trainers resolve from the data's image shape.

    ``name='auto'`` is ``cnn_mnist`` for 28x28x1 images and ``cnn_cifar`` for 32x32x3
    (`jaxpoison.specs.model_spec`), so a config runs on MNIST with data overrides only.
    """
    return dict(name="auto", width=width)


def victim(
    model, *, epochs, batch_size, num_seeds, optimizer, eval_batch_size=500, checkpoint_every=1
):
    """The victim block: the model trained on every training set, `num_seeds` times.

    ``poison_ratio`` (1.0) is APBench's poison ratio: the share of every batch trained on its
    poisoned images, the rest swapped for the clean ones (``--config.victim.poison_ratio=0.8``).
    ``model.dtype`` is the computation's precision (``--config.victim.model.dtype=bfloat16``:
    mixed precision, parameters and logits float32; `models.COMPUTE_DTYPES`).
    ``seed_devices`` (1) splits the seeds over that many groups of devices, each seed's batches
    over the devices of its group (`sharding.data_mesh`; ``num_seeds`` a multiple of it).
    """
    return dict(
        model=dict(model, dtype="float32"),
        epochs=epochs,
        batch_size=batch_size,
        num_seeds=num_seeds,
        poison_ratio=1.0,
        seed_strategy="auto",
        seed_devices=1,
        eval_batch_size=eval_batch_size,
        checkpoint_every=checkpoint_every,
        optimizer=dict(optimizer),
    )


def surrogate(model, *, epochs, batch_size, optimizer, eval_batch_size=500, checkpoint_every=1):
    """The surrogate block: the crafting model of the poisons that need one, trained once on
    the clean training set (a poison spec's ``surrogate`` overrides its fields)."""
    return dict(
        model=dict(model),
        epochs=epochs,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        checkpoint_every=checkpoint_every,
        optimizer=dict(optimizer),
    )


def select():
    """The ``select`` block: names of ``poisons`` / ``objectives`` / ``victims`` to run.

    An empty tuple runs them all; every spec stays in the config, so any of its fields can be
    overridden whatever is selected. E.g. ``--config.select.poisons="('random','regions')"``.
    """
    return dict(poisons=(), objectives=(), victims=())


def backdoor_trigger(config, target=0):
    """Adds ``config.trigger`` (BadNets' 3x3 checkerboard in the bottom-right corner, all-to-one
    to class `target`), one FieldReference per setting, and returns the references, to be
    shared by the poisons and the ``backdoor`` evaluation (``--config.trigger.target=3`` moves
    both)."""
    config.trigger = dict(
        target=ml_collections.FieldReference(target),
        all_to_all=ml_collections.FieldReference(False),
        patch_size=ml_collections.FieldReference(3),
        position=ml_collections.FieldReference("bottom_right"),
        pattern=ml_collections.FieldReference("checkerboard"),
    )
    return {k: config.trigger.get_ref(k) for k in config.trigger}


# The error-minimizing crafting model's optimizer (schedule: the factory's constant). The
# paper's SGD (lr 0.1, momentum 0.9) suits its ResNet-18 with BatchNorm; the BatchNorm-free CIFAR
# CNN does not learn with it (perturbed-data accuracy stuck at 17-44% over 10 passes), while Adam
# brings it to the 99% stop accuracy in 11.
EM_OPTIMIZER = dict(name="adam", learning_rate=1e-3, weight_decay=0.0)

# Run name -> poison spec (``name`` + factory keyword arguments + crafting ``batch_size``) of
# the poison family. Step counts are cut from the papers' (P1 100, error-maximizing 250,
# universal several epochs) so that crafting on 2 CPU cores takes minutes; override them for
# full runs.
FAMILY_SPECS = {
    "random": dict(name="random"),
    "regions_1": dict(name="regions", num_patches=1, distinct=False),
    "regions": dict(name="regions", num_patches=4),
    "regions_16": dict(name="regions", num_patches=16),
    "low_frequency": dict(name="low_frequency", frequency=4),
    "adversarial": dict(name="adversarial", num_steps=20, batch_size=256),
    "error_maximizing": dict(name="error_maximizing", num_steps=20, batch_size=256),
    # TAP (Fowl et al.): 250 steps of ε/20 and 8 restarts in the paper; here 20 steps of P1's
    # ε/5 (20 of ε/20 add up to one ε: 34.5 % against 25.9 % with ε/5, docs/poisons.md; the
    # step is absolute, 8/255 / 5: change it with the budget) and 2 restarts, with its
    # differentiable augmentation (4-pixel translations, flips) inside the loss and one crafting
    # model (num_models=k trains k surrogate seeds and averages the loss over them).
    "tap": dict(
        name="tap",
        num_steps=20,
        step_size=8 / 255 / 5,
        num_restarts=2,
        num_models=1,
        crop_padding=4,
        flip=True,
        batch_size=256,
    ),
    "mifgsm": dict(name="mifgsm", num_steps=10, batch_size=256),
    "hypocritical": dict(name="hypocritical", num_steps=20, batch_size=256),
    "universal_adversarial": dict(
        name="universal_adversarial", num_epochs=3, num_steps=2, batch_size=256
    ),
    "universal_hypocritical": dict(
        name="universal_hypocritical", num_epochs=3, num_steps=2, batch_size=256
    ),
    "error_minimizing": dict(
        name="error_minimizing",
        model=auto_model(0.5),
        optimizer=EM_OPTIMIZER,
        num_epochs=20,
        num_steps=10,
        train_steps=10,
        batch_size=256,
    ),
    "error_minimizing_class_wise": dict(
        name="error_minimizing",
        class_wise=True,
        model=auto_model(0.5),
        optimizer=EM_OPTIMIZER,
        num_epochs=20,
        num_steps=10,
        train_steps=10,
        batch_size=256,
    ),
    # REM / SEM at the family's size: the EM crafting model and optimizer, trained (with PGD-AT
    # at ε/2, 2 steps) on every batch; 12 passes of 4 noise steps (refined from pass to pass),
    # one augmentation per step (the reference: 13 passes of 10 noise steps, 10 PGD steps and
    # 5 augmentations on CIFAR-10).
    **{
        name: dict(
            name=name,
            model=auto_model(0.5),
            optimizer=EM_OPTIMIZER,
            num_epochs=12,
            num_steps=4,
            adversarial_steps=2,
            num_samples=1,
            batch_size=256,
        )
        for name in ("robust_error_minimizing", "stable_error_minimizing")
    },
    "noise": dict(name="noise"),
    "mislabeling": dict(name="mislabeling"),
    # The ℓ2 poisons at their papers' CIFAR budgets (APBench's): LSP sqrt(32*32*3) * 6/255 =
    # 1.30, AR 1.0. On other image sizes override ``poisons.<run>.threat.epsilon``.
    "lsp": dict(name="lsp", patch_size=8, threat=dict(norm="l2", epsilon=1.3043)),
    "autoregressive": dict(name="autoregressive", threat=dict(norm="l2", epsilon=1.0)),
    # Outside the lp balls: OPS changes one pixel per image (the l0 ball, its paper's threat);
    # CUDA blurs every image (unbounded), with the paper's CIFAR-10 filters (3x3, blur 0.3).
    "one_pixel": dict(name="one_pixel", threat=dict(norm="l0", pixels=1)),
    "cuda": dict(name="cuda", kernel_size=3, blur_parameter=0.3, class_wise=True),
    # NTGA with the empirical NTK of a 5-layer ReLU MLP of 64 units at init (the reference's
    # FNN is 5 x 512, infinite width), one logit; blocks of 250 scored on 250 targets (10 %),
    # 10 PGD steps, t = 4096 (the best clean kernel predictor on this subset among 1 .. 32768
    # and infinity); crafted in 38 min on 2 cores shared with 2 other runs (load 9-15); no
    # effect on the family's CNN victims (docs/results/2026-12-ntga.md).
    "ntga": dict(
        name="ntga",
        kernel_model=dict(name="mlp", width=1.0, hidden=(64, 64, 64, 64, 64)),
        t=4096.0,
        target_size=0.1,
        num_steps=10,
        batch_size=250,
    ),
    # MetaPoison-style noise (jaxpoison.poisons.meta_poison), class-wise: one pattern per class
    # (sample-wise noise had no effect here, docs/results/2026-12-bilevel.md); the family's victim
    # CNN and Adam 1.5e-3 as 4 crafting victims staggered by 30 steps, so the ensemble spans 120
    # steps of 128 images, the victims' 6 epochs of the subset; K = 2 unrolled steps (the
    # reference's nadapt), signed steps of eps/10 (absolute: change it with the budget), 4 passes
    # (80 steps per pattern; the reference: 24 victims staggered by an epoch, 61 Adam steps).
    "meta_poison": dict(
        name="meta_poison",
        model=auto_model(0.5),
        optimizer=dict(name="adam", learning_rate=1.5e-3, momentum=0.9, weight_decay=0.0),
        unroll_steps=2,
        num_models=4,
        stagger_steps=30,
        step_size=8 / 255 / 10,
        num_epochs=4,
        class_wise=True,
        batch_size=128,
    ),
    # Functional poisons (jaxpoison.poisons.functional) against the family's crafting model, P1's
    # target y + 1 and 20 signed steps (P1's count here; the ReColorAdv reference: 100 Adam
    # steps): StAdv flows of at most 0.775 pixels (the reference's 0.05 in [-1, 1] coordinates
    # on 32 x 32; in pixels: change it with the image size) with L_flow; ReColorAdv RGB grids of
    # 8^3 points moved by at most 0.06 per channel (the reference: 16 x 32 x 32 CIELUV points).
    # Both leave the lp ball by design.
    "stadv": dict(name="stadv", max_flow=0.775, num_steps=20, batch_size=256),
    "recoloradv": dict(name="recoloradv", epsilon=0.06, resolution=8, num_steps=20, batch_size=256),
}

# The family's poisons that need no crafting model (drawn at init): a cheap first batch.
STATIC = (
    "random",
    "regions_1",
    "regions",
    "regions_16",
    "low_frequency",
    "noise",
    "mislabeling",
    "lsp",
    "autoregressive",
    "one_pixel",
    "cuda",
)


def family_poisons(runs=None):
    """``{run name: spec}`` from `FAMILY_SPECS` (deep copies).

    Args:
      runs: None (every spec), a sequence of `FAMILY_SPECS` keys, or a mapping from run name
        to `FAMILY_SPECS` key (e.g. ``{'P5_random': 'random'}``).
    """
    if runs is None:
        runs = tuple(FAMILY_SPECS)
    if not isinstance(runs, dict):
        runs = {run: run for run in runs}
    return {run: copy.deepcopy(FAMILY_SPECS[key]) for run, key in runs.items()}


def poison_family(title, runs=None):
    """The poison-family config: poisons crafted on a CIFAR-10 subset, victims trained on each.

    Class-balanced 2,500 training / 1,000 test images of cifar10.npz, flips; ℓ∞ ε = 8/255;
    the quickstart's victim (the CNN for the data at width 0.5, Adam 1.5e-3 cosine, batch 64,
    6 epochs, 3 seeds) and the same model as the surrogate, trained 6 epochs on the clean set.

    Args:
      title: the config's ``name``.
      runs: the poison runs, as `family_poisons` takes them (None: every spec).

    Returns:
      A ConfigDict for the grid trainer.
    """
    config = ml_collections.ConfigDict()
    config.trainer = "grid"
    config.name = title
    config.seed = 0
    config.data = data("cifar10", num_train=2500, num_test=1000, flip=True)
    config.threat = dict(norm="linf", epsilon=ml_collections.FieldReference(8 / 255))
    config.include_clean = True
    config.poisons = family_poisons(runs)
    config.objectives = {"erm": dict(name="erm")}
    config.select = select()
    config.loss_threshold = 0.5
    config.victim = victim(
        auto_model(0.5), epochs=6, batch_size=64, num_seeds=3, optimizer=ADAM, checkpoint_every=5
    )
    config.surrogate = surrogate(
        auto_model(0.5), epochs=6, batch_size=64, optimizer=ADAM, checkpoint_every=5
    )
    return config


def l2c_cifar10_poison(cpu=False):
    """The ``l2c`` poison spec of configs/l2c_cifar10.py (without its threat: ε = 0.032).

    A U-Net generator trained against the 5-layer L2C CIFAR CNN by Algorithm 2 (one look-ahead
    generator step per victim step, T = 10 SGD+momentum steps of 64 images per trial), the
    crafting victim restarted every 320 trials, 40 crafting epochs (640 trials). With `cpu`,
    the reduced run of docs/l2c.md: half-width networks, Adam inner steps, T = 5 steps of 32
    images, the exact hypergradient, a victim restarted every 64 trials, 16 epochs.
    """
    unroll_steps, inner_batch = 10, 64
    spec = dict(
        name="l2c",
        method="algorithm2",
        generator=dict(name="unet", width=1.0),
        victim=dict(name="cnn_cifar", width=1.0),
        inner_optimizer=dict(learning_rate=0.01, momentum=0.9, weight_decay=0.0),
        unroll_steps=unroll_steps,
        truncation=unroll_steps,
        remat=True,
        label_specific=False,
        outer_batch_size=256,
        meta_optimizer=dict(name="adam", learning_rate=1e-3),
        # A crafting victim is trained for 320 trials of 10 steps of 64 images (20 epochs of
        # 10k images, as long as the config's victims) before the next one starts.
        victim_reset_every=320,
        num_epochs=40,
        batch_size=unroll_steps * inner_batch,
    )
    if cpu:
        # The crafting victim trained with the victims' Adam (SGD 0.01 stays near chance on
        # 2,500 images) and restarted every 4 crafting epochs (320 steps, about the victims'
        # 234 steps of 64).
        spec.update(
            method="exact",
            generator=dict(name="unet", width=0.5),
            victim=dict(name="cnn_cifar", width=0.5),
            inner_optimizer=dict(name="adam", learning_rate=1.5e-3, weight_decay=0.0),
            unroll_steps=5,
            truncation=5,
            batch_size=5 * 32,
            outer_batch_size=128,
            victim_reset_every=64,  # 4 x ceil(2,500 / 160)
            num_epochs=16,
        )
    return spec
