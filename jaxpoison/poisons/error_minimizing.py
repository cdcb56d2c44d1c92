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

References:
  Huang, Ma, Erfani, Bailey, Wang. "Unlearnable Examples: Making Personal Data Unexploitable."
  ICLR 2021.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison import attacks, losses, models, objectives, train_state
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
    model = dict(model or {"name": "resnet18", "width": 1.0})
    opt_kwargs = dict(learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant")
    opt_kwargs.update(optimizer or {})
    step_size = threat.epsilon / 10 if step_size is None else step_size
    module = models.make(model["name"], num_classes=num_classes, width=model.get("width", 1.0))
    apply_fn = models.make_apply_fn(module)
    objective = objectives.make("erm")
    tx = train_state.make_optimizer(epochs=1, steps_per_epoch=1, **opt_kwargs)

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

    def active(state, batch, key):
        x, y, index = batch["image"], batch["label"], batch["index"]
        # The engine visits ceil(N / B) batches per pass (the last one wraps around).
        steps_per_epoch = -(-state.num_examples // x.shape[0])
        i = state.step % steps_per_epoch
        train_every = max(1, steps_per_epoch // max(1, train_steps))
        do_train = jnp.logical_and(i % train_every == 0, i // train_every < train_steps)

        # 1. A training step of the crafting model on the perturbed batch.
        poisoned = dict(batch, image=perturbed(state.delta, x, y, index))
        model_state = jax.lax.cond(
            do_train,
            lambda m: train_state.train_step(
                m, poisoned, key, apply_fn=apply_fn, objective=objective, tx=tx
            )[0],
            lambda m: m,
            state.model,
        )

        # 2. PGD descent on δ against the updated model, from the current δ.
        variables = variables_of(model_state)

        loss_fn = attacks.model_loss(apply_fn, variables)
        if class_wise:
            # Gradient of the batch loss with respect to the K class patterns.
            grad_fn = jax.grad(lambda d: jnp.sum(loss_fn(jnp.clip(x + d[y], 0.0, 1.0), y)))

            def step(d, _):
                d = d - step_size * threat.step_direction(grad_fn(d))
                return project_pattern(threat, d), None

            delta = jax.lax.scan(step, state.delta, length=num_steps)[0]
        else:
            new = attacks.pgd(
                loss_fn,
                x,
                y,
                key=key,
                threat=threat,
                num_steps=num_steps,
                step_size=step_size,
                maximize=False,
                init=state.delta[index],
            )
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
        state = MinMinState(
            delta=delta,
            model=model_state,
            step=state.step + 1,
            correct=jnp.where(last, zero, correct),
            loss_sum=jnp.where(last, zero, loss_sum),
            seen=jnp.where(last, zero, seen),
            accuracy=accuracy,
            loss=mean_loss,
            done=jnp.logical_and(last, accuracy >= stop_accuracy),
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
