"""Error-minimizing noise ("unlearnable examples"), sample-wise or class-wise.

The bi-level min-min problem of Huang et al. (2021),

    min_θ  E_(x, y)  min_{δ in ball}  CE(f_θ(x + δ), y),

is solved by alternation: a few SGD steps on the crafting model θ over perturbed batches, then
projected gradient *descent* on δ against the current model, until the model's accuracy on the
perturbed training set exceeds ``stop_accuracy`` (0.99). The noise then carries an easy,
label-correlated shortcut, and a victim trained on it learns little of the clean images.

Fitted to the crafting engine (one jitted `update` per batch, `num_epochs` passes):

* the model is trained on ``train_steps`` batches per pass, spread evenly over the pass (Huang et
  al.'s 10 steps per outer iteration), with `objectives.erm` and the trainer's `train_step`;
* every batch then gets ``num_steps`` PGD(maximize=False) steps, starting from its current δ
  (so δ accumulates over passes; it starts as uniform noise in the ball);
* the model's eval-mode accuracy on the perturbed batches is accumulated over the pass; at the
  end of a pass that reaches ``stop_accuracy`` the state is marked done and later updates are
  no-ops (`lax.cond`), so the engine's remaining passes cost almost nothing.

The crafting model, its optimizer state and the counters live in the poison state, so the
engine's per-epoch checkpoints make a killed craft resume exactly.

`min_min` is that engine with options: an inner perturbation ρ of the learner (PGD or random
noise, with PGD adversarial training of the crafting model), several augmentations averaged per
step, no stop accuracy. REM and SEM (`jaxpoison.poisons.robust`) are its other settings.

References:
  Huang, Ma, Erfani, Bailey, Wang. "Unlearnable Examples: Making Personal Data Unexploitable."
  ICLR 2021.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison import attacks, data, losses, models, objectives, train_state
from jaxpoison.poisons.base import Poison, perturb, project_pattern


@flax.struct.dataclass
class MinMinState:
    """State of error-minimizing crafting.

    Attributes:
      delta: [N, H, W, C] (sample-wise) or [K, H, W, C] (class-wise) perturbations.
      model: the crafting model's `train_state.TrainState`.
      step: batches processed so far.
      correct, loss_sum, seen: the current pass's running eval accuracy / loss counts.
      accuracy, loss: the crafting model's accuracy and mean loss on the perturbed data over
        the last full pass.
      done: True once a pass reached the stop accuracy.
      num_examples: N, the size of the training set (static).
    """

    delta: jax.Array
    model: train_state.TrainState
    step: jax.Array
    correct: jax.Array
    loss_sum: jax.Array
    seen: jax.Array
    accuracy: jax.Array
    loss: jax.Array
    done: jax.Array
    num_examples: int = flax.struct.field(pytree_node=False, default=0)


def error_minimizing(
    *,
    threat,
    num_classes,
    image_shape,
    class_wise=False,
    model=None,
    optimizer=None,
    num_epochs=10,
    num_steps=20,
    step_size=None,
    train_steps=10,
    stop_accuracy=0.99,
):
    """Error-minimizing noise (Huang et al. 2021).

    Args:
      threat: an `LpBall`.
      num_classes: K.
      image_shape: (H, W, C).
      class_wise: one δ per class (added to every example of the class) instead of one per
        example.
      model: ``{'name', 'width'}`` of the crafting model (default ResNet-18, as the paper).
      optimizer: keyword arguments of `train_state.make_optimizer` (default SGD lr 0.1, momentum
        0.9, weight decay 5e-4, constant schedule, as the paper).
      num_epochs: at most this many passes over the training set.
      num_steps: PGD steps on δ per batch and pass (paper: 20).
      step_size: PGD step (default ε/10, the paper's 0.8/255 for ε = 8/255).
      train_steps: model SGD steps per pass (paper: 10).
      stop_accuracy: stop once the model's accuracy on the perturbed data reaches this.

    Returns:
      A `Poison` whose state is a `MinMinState`.

    References:
      Huang et al. 2021, "Unlearnable Examples: Making Personal Data Unexploitable", ICLR.
    """
    return min_min(
        threat=threat,
        num_classes=num_classes,
        image_shape=image_shape,
        class_wise=class_wise,
        model=model,
        optimizer=optimizer,
        num_epochs=num_epochs,
        num_steps=num_steps,
        step_size=threat.epsilon / 10 if step_size is None else step_size,
        train_steps=train_steps,
        stop_accuracy=stop_accuracy,
    )


class Inner(NamedTuple):
    """The perturbation ρ that noise crafting expects a learner to add on top of x + δ.

    Attributes:
      kind: ``"pgd"`` (the worst case in the ball, REM) or ``"random"`` (uniform in the ball,
        SEM).
      threat: the ball of ρ, an `LpBall` (the poison's norm, a smaller radius).
      num_steps, step_size: the PGD steps that find ρ, and that the crafting model is
        adversarially trained with (both kinds: the crafting model always trains with PGD-AT).
    """

    kind: str
    threat: Any
    num_steps: int
    step_size: float


def min_min(
    *,
    threat,
    num_classes,
    image_shape,
    class_wise,
    model,
    optimizer,
    num_epochs,
    num_steps,
    step_size,
    train_steps,
    stop_accuracy,
    inner=None,
    num_samples=1,
    crop_padding=0,
    flip=False,
):
    """The min-min crafting engine shared by error-minimizing, REM and SEM noise.

    Per batch: one training step of the crafting model on the perturbed batch (on `train_steps`
    batches per pass), then `num_steps` steps of projected descent on δ of

        Σ_{s < num_samples}  CE(f_θ(T_s(x + δ) + ρ_s), y),

    with T_s a random crop (`crop_padding`) and flip (`data.augment`, differentiable in the
    images; fresh draws at every step) and ρ_s the `inner` perturbation of the augmented image
    (zero without one). ρ is found on the detached image and held fixed when differentiating
    with respect to δ (Danskin's theorem, as the REM reference). Without `inner`, augmentation
    and with one sample this is exactly Huang et al.'s step.

    Args:
      threat, num_classes, image_shape, class_wise, model, optimizer, num_epochs, num_steps,
        step_size, stop_accuracy: as `error_minimizing` (`step_size` resolved, `model` and
        `optimizer` may be None for the paper's). `stop_accuracy` None never stops: all
        `num_epochs` passes run.
      train_steps: model steps per pass, spread evenly over it; None trains on every batch.
        With an int, `optimizer`'s schedule spans ``num_epochs * train_steps`` steps.
      inner: None, or an `Inner`: ρ for the noise, and PGD adversarial training (the same
        ball and steps) for the crafting model instead of standard training.
      num_samples: augmentations averaged per descent step.
      crop_padding, flip: the augmentation T, also applied to the crafting model's batches.

    Returns:
      A `Poison` whose state is a `MinMinState`.
    """
    model = dict(model or {"name": "resnet18", "width": 1.0})
    opt_kwargs = dict(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant")
    opt_kwargs.update(optimizer or {})
    module = models.make(model["name"], num_classes=num_classes, width=model.get("width", 1.0))
    apply_fn = models.make_apply_fn(module)
    if inner is None:
        objective = objectives.make("erm")
    else:
        objective = objectives.make(
            "pgd_at", threat=inner.threat, num_steps=inner.num_steps, step_size=inner.step_size
        )
    tx = train_state.make_optimizer(
        epochs=num_epochs if train_steps else 1, steps_per_epoch=train_steps or 1, **opt_kwargs
    )
    robust = inner is not None or num_samples > 1 or crop_padding or flip

    def perturbed(delta, x, y, index):
        """The batch's images plus their perturbation (projected into the ball and the box)."""
        return perturb(threat, x, delta[y] if class_wise else delta[index])

    def variables_of(model_state):
        return {"params": model_state.params, **model_state.model_state}

    def init(key, dataset):
        delta_key, model_key = jax.random.split(key)
        x = dataset["image"]
        if class_wise:
            shape = (num_classes, *x.shape[1:])
            delta = project_pattern(threat, threat.random_init(delta_key, jnp.full(shape, 0.5)))
        else:
            delta = threat.random_init(delta_key, x)
        zero_f = jnp.zeros((), jnp.float32)
        return MinMinState(
            delta=delta,
            model=train_state.init_state(module, model_key, tuple(image_shape), tx),
            step=jnp.zeros((), jnp.int32),
            correct=zero_f,
            loss_sum=zero_f,
            seen=zero_f,
            accuracy=zero_f,
            loss=zero_f,
            done=jnp.zeros((), bool),
            num_examples=x.shape[0],
        )

    def noise_grad_fn(loss_fn, images_of, y):
        """``(d, key) -> gradient`` of the noise objective with respect to d."""
        if not robust:
            return lambda d, key: jax.grad(lambda d: jnp.sum(loss_fn(images_of(d), y)))(d)

        def sample_loss(d, key):
            aug_key, inner_key = jax.random.split(key)
            images = data.augment(aug_key, images_of(d), crop_padding=crop_padding, flip=flip)
            fixed = jax.lax.stop_gradient(images)
            if inner is None:
                rho = jnp.zeros_like(fixed)
            elif inner.kind == "pgd":
                rho = attacks.pgd(
                    loss_fn,
                    fixed,
                    y,
                    key=inner_key,
                    threat=inner.threat,
                    num_steps=inner.num_steps,
                    step_size=inner.step_size,
                )
            else:
                rho = inner.threat.random_init(inner_key, fixed)
            return jnp.sum(loss_fn(images + jax.lax.stop_gradient(rho), y))

        def grad(d, key):
            # One sample's backward pass at a time (as the reference), not S in one graph.
            def body(total, s):
                return total + jax.grad(sample_loss)(d, jax.random.fold_in(key, s)), None

            return jax.lax.scan(body, jnp.zeros_like(d), jnp.arange(num_samples))[0]

        return grad

    def descend(start, grad_fn, project, key):
        def step(d, t):
            g = grad_fn(d, jax.random.fold_in(key, t))
            return project(d - step_size * threat.step_direction(g)), None

        return jax.lax.scan(step, start, jnp.arange(num_steps))[0]

    def active(state, batch, key):
        x, y, index = batch["image"], batch["label"], batch["index"]
        train_key, noise_key = jax.random.split(key)
        # The engine visits ceil(N / B) batches per pass (the last one wraps around).
        steps_per_epoch = -(-state.num_examples // x.shape[0])
        i = state.step % steps_per_epoch
        per_pass = train_steps or steps_per_epoch
        train_every = max(1, steps_per_epoch // max(1, per_pass))
        do_train = jnp.logical_and(i % train_every == 0, i // train_every < per_pass)

        # 1. A training step of the crafting model on the perturbed batch.
        poisoned = dict(batch, image=perturbed(state.delta, x, y, index))
        model_state = jax.lax.cond(
            do_train,
            lambda m: train_state.train_step(
                m,
                poisoned,
                train_key,
                apply_fn=apply_fn,
                objective=objective,
                tx=tx,
                crop_padding=crop_padding,
                flip=flip,
            )[0],
            lambda m: m,
            state.model,
        )

        # 2. Projected descent on δ against the updated model, from the current δ.
        variables = variables_of(model_state)
        loss_fn = attacks.model_loss(apply_fn, variables)
        if class_wise:
            # Gradient of the batch loss with respect to the K class patterns.
            grad_fn = noise_grad_fn(loss_fn, lambda d: jnp.clip(x + d[y], 0.0, 1.0), y)
            delta = descend(state.delta, grad_fn, lambda d: project_pattern(threat, d), noise_key)
        else:
            grad_fn = noise_grad_fn(loss_fn, lambda d: x + d, y)
            start = threat.project(state.delta[index], x)
            new = descend(start, grad_fn, lambda d: threat.project(d, x), noise_key)
            delta = state.delta.at[index].set(new)

        # 3. Running accuracy of the model on the perturbed data; stop check at the pass's end.
        logits = apply_fn(variables, perturbed(delta, x, y, index), train=False)[0]
        correct = state.correct + jnp.sum(losses.accuracy(logits, y))
        loss_sum = state.loss_sum + jnp.sum(losses.cross_entropy(logits, y))
        seen = state.seen + y.shape[0]
        last = i == steps_per_epoch - 1
        accuracy = jnp.where(last, correct / seen, state.accuracy)
        mean_loss = jnp.where(last, loss_sum / seen, state.loss)
        metrics = {
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "loss": jnp.mean(losses.cross_entropy(logits, y)),
        }
        zero = jnp.zeros((), jnp.float32)
        if stop_accuracy is None:
            done = jnp.zeros((), bool)
        else:
            done = jnp.logical_and(last, accuracy >= stop_accuracy)
        state = MinMinState(
            delta=delta,
            model=model_state,
            step=state.step + 1,
            correct=jnp.where(last, zero, correct),
            loss_sum=jnp.where(last, zero, loss_sum),
            seen=jnp.where(last, zero, seen),
            accuracy=accuracy,
            loss=mean_loss,
            done=done,
            num_examples=state.num_examples,
        )
        return state, metrics

    def update(state, batch, key):
        def finished(state, batch, key):
            del batch, key
            metrics = {"accuracy": state.accuracy, "loss": state.loss}
            return state.replace(step=state.step + 1), metrics

        return jax.lax.cond(state.done, finished, active, state, batch, key)

    def apply(state, batch):
        x, y, index = batch["image"], batch["label"], batch["index"]
        return dict(batch, image=perturbed(state.delta, x, y, index))

    return Poison(init=init, update=update, apply=apply, num_epochs=num_epochs)
