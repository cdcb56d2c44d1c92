"""Sample-wise poisons crafted against a fixed model trained on clean data.

Every training example gets its own perturbation, found by an attack on a crafting model that
was trained on the clean training set (the experiment trains it, see `REQUIRES_MODEL`):

* ``adversarial`` (P1): targeted PGD toward t = π(y), a fixed label permutation
  (default y + 1 mod K): the poisoned images carry features of class π(y) but keep label y.
* ``error_maximizing``: untargeted PGD that maximizes the cross-entropy to y.
* ``mifgsm``: the same attacks with MI-FGSM (momentum, starting from zero).
* ``hypocritical`` (P2): PGD that *minimizes* the cross-entropy to the true label y, making the
  examples look easier than they are.

The model is used in eval mode (BatchNorm running statistics), as Tao et al. do. One engine pass
(``num_epochs=1``) crafts every example once; `update` is one attack on one batch.

References:
  Tao, Feng, Yi, Huang, Chen. "Better Safe Than Sorry: Preventing Delusive Adversaries with
  Adversarial Training." NeurIPS 2021 (P1 adversarial, P2 hypocritical).
  Fowl, Goldblum, Chiang, Geiping, Czaja, Goldstein. "Adversarial Examples Make Strong Poisons."
  NeurIPS 2021 (error-maximizing poisons).
  Dong, Liao, Pang, Su, Zhu, Hu, Li. "Boosting Adversarial Attacks with Momentum." CVPR 2018.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpoison import attacks, losses
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
):
    """A sample-wise poison: one attack per batch on the fixed crafting model.

    Args:
      threat: an `LpBall`.
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)`` of the crafting model.
      variables: its variables (trained on the clean data).
      num_classes: K.
      num_steps: attack iterations per example.
      step_size: step length in the threat model's norm.
      goal: ``"target"`` (minimize the loss toward π(y)), ``"error"`` (maximize the loss to y)
        or ``"true"`` (minimize the loss to y).
      method: ``"pgd"`` or ``"mifgsm"``.
      permutation: the target map of ``goal="target"`` (see `base.label_map`).
      random_start: PGD starts from a random point of the ball (MI-FGSM always starts at 0).
      decay: MI-FGSM momentum.

    Returns:
      A `Poison` with a `SampleWiseState` and ``num_epochs=1``.
    """
    if goal not in ("target", "error", "true"):
        raise ValueError(f"goal must be 'target', 'error' or 'true', not {goal!r}.")
    if method not in ("pgd", "mifgsm"):
        raise ValueError(f"method must be 'pgd' or 'mifgsm', not {method!r}.")
    targets = label_map(num_classes, permutation)
    target_fn = (lambda y: targets[y]) if goal == "target" else None
    loss_fn = attacks.model_loss(apply_fn, variables, target=target_fn)
    maximize = goal == "error"
    if method == "pgd":
        attack = lambda x, y, key: attacks.pgd(
            loss_fn,
            x,
            y,
            key=key,
            threat=threat,
            num_steps=num_steps,
            step_size=step_size,
            maximize=maximize,
            random_start=random_start,
        )
    else:
        attack = lambda x, y, key: attacks.mifgsm(
            loss_fn,
            x,
            y,
            key=key,
            threat=threat,
            num_steps=num_steps,
            step_size=step_size,
            decay=decay,
            maximize=maximize,
        )

    def init(key, dataset):
        del key
        return SampleWiseState(delta=jnp.zeros_like(dataset["image"]))

    def update(state, batch, key):
        x, y = batch["image"], batch["label"]
        delta = attack(x, y, key)
        logits = apply_fn(variables, x + delta, train=False)[0]
        metrics = {
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "loss": jnp.mean(losses.cross_entropy(logits, y)),
        }
        if goal == "target":
            metrics["target_rate"] = jnp.mean(losses.accuracy(logits, targets[y]))
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
):
    """P1: targeted PGD toward t = π(y) against the clean-trained model (Tao et al. 2021).

    Args:
      threat, num_classes, image_shape: the threat model and data shape (``image_shape`` unused).
      apply_fn, variables: the crafting model, trained on clean data.
      num_steps: PGD steps (Tao et al.: 100).
      step_size: PGD step (default ε/5, as Tao et al.).
      permutation: target class of each class (default y + 1 mod K).

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
):
    """Untargeted error-maximizing poison: PGD ascent on CE(f(x + δ), y) (Fowl et al. 2021).

    Args:
      threat, num_classes, image_shape: the threat model and data shape (``image_shape`` unused).
      apply_fn, variables: the crafting model, trained on clean data.
      num_steps: PGD steps (Fowl et al.: 250).
      step_size: PGD step (default ε/10).

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
