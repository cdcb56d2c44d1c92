"""Sample-wise poisons crafted against a fixed model trained on clean data.

Every training example gets its own perturbation, found by an attack on a crafting model that
was trained on the clean training set (the experiment trains it, see `REQUIRES_MODEL`):

* ``adversarial`` (P1): targeted PGD toward t = π(y), a fixed label permutation
  (default y + 1 mod K): the poisoned images carry features of class π(y) but keep label y.
* ``error_maximizing``: untargeted PGD that maximizes the cross-entropy to y.
* ``tap``: P1 crafted with Fowl et al.'s recipe: 250 steps, differentiable augmentation inside
  the loss, restarts (the best kept per example), optionally an ensemble of crafting models.
* ``mifgsm``: the same attacks with MI-FGSM (momentum, starting from zero).
* ``hypocritical`` (P2): PGD that *minimizes* the cross-entropy to the true label y, making the
  examples look easier than they are.

The model is used in eval mode (BatchNorm running statistics), as Tao et al. do. One engine pass
(``num_epochs=1``) crafts every example once; `update` is one attack on one batch. Augmentation,
restarts and an ensemble of crafting models are options of the shared core, `attack_poison`, so
P1 and error-maximizing take them too (off by default).

References:
  Tao, Feng, Yi, Huang, Chen. "Better Safe Than Sorry: Preventing Delusive Adversaries with
  Adversarial Training." NeurIPS 2021 (P1 adversarial, P2 hypocritical).
  Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein. "Adversarial Examples Make Strong Poisons."
  NeurIPS 2021 (error-maximizing poisons).
  Dong, Liao, Pang, Su, Zhu, Hu, Li. "Boosting Adversarial Attacks with Momentum." CVPR 2018.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison import attacks, losses
from jaxpoison.data import pipeline
from jaxpoison.poisons.base import Poison, SampleWiseState, apply_sample_wise, label_map


def attack_poison(
    *,
    threat,
    apply_fn,
    variables,
    num_classes,
    num_steps,
    step_size,
    goal,
    method="pgd",
    permutation=None,
    random_start=True,
    decay=1.0,
    num_models=1,
    num_restarts=1,
    crop_padding=0,
    flip=False,
):
    """A sample-wise poison: one attack per batch on the fixed crafting model(s).

    The objective of an example is the cross-entropy of the crafting model at ``x + δ`` (to π(y)
    or to y), averaged over an ensemble of `num_models` models, of ``augment(x + δ)`` when
    crafting augments (a new random crop and flip at every step, as the victim will see the
    image), and the attack is run `num_restarts` times from different random starts, keeping for
    each example the restart whose final objective (un-augmented) is best.

    Args:
      threat: an `LpBall`.
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)`` of the crafting model.
      variables: its variables (trained on the clean data); with ``num_models > 1`` the
        variables of that many models stacked on a leading axis.
      num_classes: K.
      num_steps: attack iterations per example.
      step_size: step length in the threat model's norm.
      goal: ``"target"`` (minimize the loss toward π(y)), ``"error"`` (maximize the loss to y)
        or ``"true"`` (minimize the loss to y).
      method: ``"pgd"`` or ``"mifgsm"``.
      permutation: the target map of ``goal="target"`` (see `base.label_map`).
      random_start: PGD starts from a random point of the ball (MI-FGSM always starts at 0).
      decay: MI-FGSM momentum.
      num_models: crafting models in `variables` (1: unstacked variables of one model).
      num_restarts: attacks per example from independent random starts; the best is kept.
      crop_padding: differentiable augmentation inside the loss: random translations by up to
        this many pixels (zero fill; `data.pipeline.augment`); 0 for none.
      flip: differentiable augmentation: random horizontal flips.

    Returns:
      A `Poison` with a `SampleWiseState` and ``num_epochs=1``.

    Raises:
      ValueError: an unknown goal or method, or a count or padding that is not a whole number in
        range.
    """
    if goal not in ("target", "error", "true"):
        raise ValueError(f"goal must be 'target', 'error' or 'true', not {goal!r}.")
    if method not in ("pgd", "mifgsm"):
        raise ValueError(f"method must be 'pgd' or 'mifgsm', not {method!r}.")
    for field, value, least in (
        ("num_models", num_models, 1),
        ("num_restarts", num_restarts, 1),
        ("crop_padding", crop_padding, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{field}={value!r}: give a whole number >= {least}.")
    if num_restarts > 1 and method == "mifgsm":
        raise ValueError(
            "num_restarts > 1 needs random starts, but MI-FGSM starts at 0; use num_restarts=1."
        )
    if num_restarts > 1 and not random_start:
        raise ValueError("num_restarts > 1 needs random_start=True (each restart starts apart).")
    targets = label_map(num_classes, permutation)
    loss_of = losses.LOSSES["cross_entropy"]
    goal_of = (lambda y: targets[y]) if goal == "target" else (lambda y: y)

    # The models are a Python loop over the leading axis, not a vmap: on CPU a vmapped ensemble
    # of 2 CIFAR CNNs (width 0.5, batch 256) took 0.58-0.71 s per gradient, the loop 0.37 s
    # (vmapped weights become batched convolutions).
    def logits_of(x):
        """The logits of each crafting model, a list of M arrays [B, K]."""
        if num_models == 1:
            return [apply_fn(variables, x, train=False)[0]]
        model = lambda i: jax.tree.map(lambda a: a[i], variables)
        return [apply_fn(model(i), x, train=False)[0] for i in range(num_models)]

    def loss_fn(x, y):
        """[B] loss, averaged over the crafting models."""
        return sum(loss_of(z, goal_of(y)) for z in logits_of(x)) / num_models

    augment_fn = None
    if crop_padding or flip:
        augment_fn = lambda key, x: pipeline.augment(key, x, crop_padding=crop_padding, flip=flip)
    maximize = goal == "error"
    if method == "pgd":
        attack_once = lambda x, y, key: attacks.pgd(
            loss_fn,
            x,
            y,
            key=key,
            threat=threat,
            num_steps=num_steps,
            step_size=step_size,
            maximize=maximize,
            random_start=random_start,
            augment_fn=augment_fn,
        )
    else:
        attack_once = lambda x, y, key: attacks.mifgsm(
            loss_fn,
            x,
            y,
            key=key,
            threat=threat,
            num_steps=num_steps,
            step_size=step_size,
            decay=decay,
            maximize=maximize,
            augment_fn=augment_fn,
        )

    def attack(x, y, key):
        if num_restarts == 1:
            return attack_once(x, y, key)
        sign = -1.0 if maximize else 1.0  # the restart with the lowest sign * loss wins

        def restart(best, restart_key):
            delta = attack_once(x, y, restart_key)
            score = sign * loss_fn(x + delta, y)
            better = (score < best[1]).reshape((-1,) + (1,) * (x.ndim - 1))
            return (jnp.where(better, delta, best[0]), jnp.minimum(score, best[1])), None

        start = (jnp.zeros_like(x), jnp.full(x.shape[:1], jnp.inf, x.dtype))
        return jax.lax.scan(restart, start, jax.random.split(key, num_restarts))[0][0]

    def init(key, dataset):
        del key
        return SampleWiseState(delta=jnp.zeros_like(dataset["image"]))

    def update(state, batch, key):
        x, y = batch["image"], batch["label"]
        delta = attack(x, y, key)
        logits = logits_of(x + delta)  # metrics averaged over the crafting models
        mean = lambda fn, labels: sum(jnp.mean(fn(z, labels)) for z in logits) / num_models
        metrics = {
            "accuracy": mean(losses.accuracy, y),
            "loss": mean(losses.cross_entropy, y),
        }
        if goal == "target":
            metrics["target_rate"] = mean(losses.accuracy, targets[y])
        state = state.replace(delta=state.delta.at[batch["index"]].set(delta))
        return state, metrics

    return Poison(init=init, update=update, apply=apply_sample_wise(threat), num_epochs=1)


def adversarial(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_steps=100,
    step_size=None,
    permutation=None,
    num_models=1,
    num_restarts=1,
    crop_padding=0,
    flip=False,
):
    """P1: targeted PGD toward t = π(y) against the clean-trained model (Tao et al. 2021).

    Args:
      threat, num_classes, image_shape: the threat model and data shape (``image_shape`` unused).
      apply_fn, variables: the crafting model, trained on clean data.
      num_steps: PGD steps (Tao et al.: 100).
      step_size: PGD step (default ε/5, as Tao et al.).
      permutation: target class of each class (default y + 1 mod K).
      num_models, num_restarts, crop_padding, flip: an ensemble of crafting models, restarts
        and differentiable augmentation, as `tap` (see `attack_poison`); off by default.

    References:
      Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with
      Adversarial Training", NeurIPS.
    """
    del image_shape
    return attack_poison(
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=threat.epsilon / 5 if step_size is None else step_size,
        goal="target",
        permutation=permutation,
        num_models=num_models,
        num_restarts=num_restarts,
        crop_padding=crop_padding,
        flip=flip,
    )


def error_maximizing(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_steps=250,
    step_size=None,
    num_models=1,
    num_restarts=1,
    crop_padding=0,
    flip=False,
):
    """Untargeted error-maximizing poison: PGD ascent on CE(f(x + δ), y) (Fowl et al. 2021).

    Args:
      threat, num_classes, image_shape: the threat model and data shape (``image_shape`` unused).
      apply_fn, variables: the crafting model, trained on clean data.
      num_steps: PGD steps (Fowl et al.: 250).
      step_size: PGD step (default ε/10).
      num_models, num_restarts, crop_padding, flip: an ensemble of crafting models, restarts
        and differentiable augmentation, as `tap` (see `attack_poison`); off by default.

    References:
      Fowl et al. 2021, "Adversarial Examples Make Strong Poisons", NeurIPS.
    """
    del image_shape
    return attack_poison(
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=threat.epsilon / 10 if step_size is None else step_size,
        goal="error",
        num_models=num_models,
        num_restarts=num_restarts,
        crop_padding=crop_padding,
        flip=flip,
    )


def tap(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_steps=250,
    step_size=None,
    permutation=None,
    num_models=1,
    num_restarts=8,
    crop_padding=None,
    flip=True,
):
    """TAP: class-targeted adversarial poison with Fowl et al.'s crafting recipe.

    Targeted PGD toward t = π(y) (default y + 1 mod K), like P1, but crafted as the reference
    code does: 250 signed steps of ε/20 (its ``tau=0.05``), differentiable augmentation inside
    the loss at every step (random translations and horizontal flips, so the features of π(y)
    survive the victim's own augmentation), `num_restarts` restarts (8) and optionally an
    ensemble of crafting models whose losses are averaged (the reference's ``--ensemble``, 1).

    Departures from the reference: the restart kept is chosen per example (the reference keeps
    the one whole poison with the lowest mean target loss); the start is uniform in the ball
    (the reference draws a Gaussian of scale ε, clipped); translations are whole pixels with
    zero fill (the reference's grid sampler shifts by up to 8/31 of the half-width, ±4 pixels
    on CIFAR-10, bilinearly).

    Args:
      threat, num_classes, image_shape: the threat model and data shape (H, W, C).
      apply_fn, variables: the crafting model(s), trained on clean data; with ``num_models > 1``
        the variables of that many models stacked on a leading axis (the experiment trains them
        as seeds of one surrogate run).
      num_steps: PGD steps (Fowl et al.: 250).
      step_size: PGD step (default ε/20, the reference's ``tau``).
      permutation: target class of each class (default y + 1 mod K).
      num_models: crafting models (the reference's ``--ensemble``, default 1).
      num_restarts: attacks per example from independent random starts, the best kept (8).
      crop_padding: random translations by up to this many pixels inside the loss (default
        H // 8: 4 on CIFAR-10, the reference's shift); 0 for none.
      flip: random horizontal flips inside the loss.

    References:
      Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein. "Adversarial Examples Make Strong
      Poisons." NeurIPS 2021 (code: github.com/lhfowl/adversarial_poisons, recipe ``targeted``).
      Geiping et al. "Witches' Brew: Industrial Scale Data Poisoning via Gradient Matching."
      ICLR 2021 (the differentiable augmentation, restarts and ensembles of the crafting code).
    """
    return attack_poison(
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=threat.epsilon / 20 if step_size is None else step_size,
        goal="target",
        permutation=permutation,
        num_models=num_models,
        num_restarts=num_restarts,
        crop_padding=image_shape[0] // 8 if crop_padding is None else crop_padding,
        flip=flip,
    )


def mifgsm(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_steps=10,
    step_size=None,
    decay=1.0,
    targeted=True,
    permutation=None,
):
    """MI-FGSM poison: momentum iterative attack, targeted toward π(y) or untargeted.

    Args:
      threat, num_classes, image_shape: the threat model and data shape (``image_shape`` unused).
      apply_fn, variables: the crafting model, trained on clean data.
      num_steps: iterations (10, 100 or 250 in Fowl et al.'s comparison).
      step_size: step (default ε / num_steps, Dong et al.'s choice).
      decay: momentum factor μ.
      targeted: toward π(y) (as P1) if True, else error-maximizing.
      permutation: target class of each class (default y + 1 mod K).

    References:
      Dong et al. 2018, "Boosting Adversarial Attacks with Momentum", CVPR.
      Fowl et al. 2021, "Adversarial Examples Make Strong Poisons", NeurIPS.
    """
    del image_shape
    return attack_poison(
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=threat.epsilon / num_steps if step_size is None else step_size,
        goal="target" if targeted else "error",
        method="mifgsm",
        permutation=permutation,
        decay=decay,
    )


def hypocritical(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_steps=100,
    step_size=None,
    random_start=False,
):
    """P2: PGD descent on CE(f(x + δ), y), toward the true label (Tao et al. 2021).

    Args:
      threat, num_classes, image_shape: the threat model and data shape (``image_shape`` unused).
      apply_fn, variables: the crafting model, trained on clean data.
      num_steps: PGD steps (default 100, as for P1).
      step_size: PGD step (default ε/5).
      random_start: start from a random point of the ball; the default starts at δ = 0, where
        the clean-trained model's loss is already low (a random start would first raise it).

    References:
      Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with
      Adversarial Training", NeurIPS.
    """
    del image_shape
    return attack_poison(
        threat=threat,
        apply_fn=apply_fn,
        variables=variables,
        num_classes=num_classes,
        num_steps=num_steps,
        step_size=threat.epsilon / 5 if step_size is None else step_size,
        goal="true",
        random_start=random_start,
    )
