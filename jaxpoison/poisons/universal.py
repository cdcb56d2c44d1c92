"""Class-wise universal poisons crafted against a fixed clean-trained model (P3, P4).

For every class t one universal perturbation δ_t (one image-sized pattern) is optimised so that
the crafting model classifies ``x + δ_t`` as t:

    δ_t = argmin_{δ in ball}  E_x  CE(f(clip(x + δ, 0, 1)), t)

by projected sign (ℓ∞) or normalised (ℓ2) gradient steps on mini-batches. Every example of
class y then gets

* ``universal_adversarial`` (P3): δ_{π(y)}, a pattern of another class (π(y) = y + 1 mod K);
* ``universal_hypocritical`` (P4): δ_y, a pattern of its own class.

With ``source="all"`` (the default, as in Tao et al.'s code) δ_t is optimised over every
training example, which costs K forward/backward passes per example and step; with
``source="class"`` δ_t is optimised only over the examples that will carry it (class π⁻¹(t) for
P3, class t for P4), one pass per example and step.

The state is a `ClassWiseState` whose ``class_delta[t]`` is the pattern *toward* t.

References:
  Tao, Feng, Yi, Huang, Chen. "Better Safe Than Sorry: Preventing Delusive Adversaries with
  Adversarial Training." NeurIPS 2021 (P3, P4).
  Moosavi-Dezfooli, Fawzi, Fawzi, Frossard. "Universal Adversarial Perturbations." CVPR 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.poisons.base import ClassWiseState, Poison, label_map, perturb, project_pattern

SOURCES = ("all", "class")


def universal_poison(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    assign,
    num_epochs=2,
    num_steps=5,
    step_size=None,
    source="all",
):
    """The universal poison whose example of class y carries ``class_delta[assign[y]]``.

    Args:
      threat: an `LpBall`.
      num_classes: K.
      image_shape: (H, W, C).
      apply_fn, variables: the crafting model (trained on clean data), used in eval mode.
      assign: int [K], the pattern index (= target class) of each class.
      num_epochs: passes over the training set.
      num_steps: projected gradient steps per batch.
      step_size: step length (default ε/10).
      source: ``"all"`` or ``"class"`` (see the module docstring).

    Returns:
      A `Poison` with a `ClassWiseState`.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, not {source!r}.")
    step_size = threat.epsilon / 10 if step_size is None else step_size
    classes = jnp.arange(num_classes)

    def batch_loss(class_delta, x, y):
        def toward(delta, t):
            logits = apply_fn(variables, jnp.clip(x + delta, 0.0, 1.0), train=False)[0]
            return losses.cross_entropy(logits, jnp.full(x.shape[:1], t))

        if source == "all":
            # [K, B]: every pattern on every example of the batch.
            return jnp.sum(jax.vmap(toward)(class_delta, classes))
        t = assign[y]
        logits = apply_fn(variables, jnp.clip(x + class_delta[t], 0.0, 1.0), train=False)[0]
        return jnp.sum(losses.cross_entropy(logits, t))

    grad_fn = jax.grad(batch_loss)

    def init(key, dataset):
        del key, dataset
        return ClassWiseState(class_delta=jnp.zeros((num_classes, *image_shape), jnp.float32))

    def update(state, batch, key):
        del key
        x, y = batch["image"], batch["label"]

        def step(delta, _):
            delta = delta - step_size * threat.step_direction(grad_fn(delta, x, y))
            return project_pattern(threat, delta), None

        class_delta = jax.lax.scan(step, state.class_delta, length=num_steps)[0]
        t = assign[y]
        logits = apply_fn(variables, x + threat.project(class_delta[t], x), train=False)[0]
        metrics = {
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "target_rate": jnp.mean(losses.accuracy(logits, t)),
        }
        return ClassWiseState(class_delta=class_delta), metrics

    def apply(state, batch):
        delta = state.class_delta[assign[batch["label"]]]
        return dict(batch, image=perturb(threat, batch["image"], delta))

    return Poison(init=init, update=update, apply=apply, num_epochs=num_epochs)


def universal_adversarial(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_epochs=2,
    num_steps=5,
    step_size=None,
    source="all",
    permutation=None,
):
    """P3: class y carries the universal pattern toward π(y) (default y + 1 mod K).

    Args:
      threat, num_classes, image_shape: the threat model and data shape.
      apply_fn, variables: the crafting model trained on clean data.
      num_epochs: passes over the training set.
      num_steps: projected gradient steps per batch.
      step_size: step length (default ε/10).
      source: optimise each pattern over ``"all"`` examples or only its ``"class"``.
      permutation: target class of each class (see `base.label_map`).

    References:
      Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with
      Adversarial Training", NeurIPS.
    """
    return universal_poison(
        threat=threat,
        num_classes=num_classes,
        image_shape=image_shape,
        apply_fn=apply_fn,
        variables=variables,
        assign=label_map(num_classes, permutation),
        num_epochs=num_epochs,
        num_steps=num_steps,
        step_size=step_size,
        source=source,
    )


def universal_hypocritical(
    *,
    threat,
    num_classes,
    image_shape,
    apply_fn,
    variables,
    num_epochs=2,
    num_steps=5,
    step_size=None,
    source="all",
):
    """P4: class y carries the universal pattern toward y itself.

    Args:
      threat, num_classes, image_shape: the threat model and data shape.
      apply_fn, variables: the crafting model trained on clean data.
      num_epochs: passes over the training set.
      num_steps: projected gradient steps per batch.
      step_size: step length (default ε/10).
      source: optimise each pattern over ``"all"`` examples or only its ``"class"``.

    References:
      Tao et al. 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries with
      Adversarial Training", NeurIPS.
    """
    return universal_poison(
        threat=threat,
        num_classes=num_classes,
        image_shape=image_shape,
        apply_fn=apply_fn,
        variables=variables,
        assign=jnp.arange(num_classes, dtype=jnp.int32),
        num_epochs=num_epochs,
        num_steps=num_steps,
        step_size=step_size,
        source=source,
    )
