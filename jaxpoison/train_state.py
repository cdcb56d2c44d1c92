"""The pure training step every trainer shares: victims, error-minimizing crafting, L2C.

* `TrainState`: one model's step, params, non-trainable state (BatchNorm statistics) and
  optimizer state; a flax struct, so orbax saves it and `vmap` / `lax.map` add a seed axis.
* `make_optimizer`: SGD (or Adam) with coupled weight decay and an lr schedule.
* `init_state`: a fresh `TrainState` of a flax module.
* `train_step`: ``(state, batch, key) -> (state, metrics)`` for any objective
  (`jaxpoison.objectives`), with the schedule position in the batch when asked.
* `over_seeds`: a function of one seed mapped over a leading seed axis.

Nothing here jits: `training.Trainer` jits a whole multi-seed step once; the poisons that train
a model inside their own update (error-minimizing noise, L2C's unrolled victim) call
`train_step` inside their compiled programs.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxpoison import data, models


@flax.struct.dataclass
class TrainState:
    """One victim's state (a leading seed axis when several are trained at once)."""

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any


def make_optimizer(
    *,
    learning_rate,
    momentum=0.9,
    weight_decay=5e-4,
    schedule="piecewise",
    nesterov=False,
    epochs,
    steps_per_epoch,
    milestones=(0.5, 0.75),
    decay_factor=0.1,
    name="sgd",
    eps_root=0.0,
    warmup_epochs=0.0,
):
    """SGD with momentum (or Adam) and PyTorch-style coupled weight decay, with an lr schedule.

    Schedules: ``constant``; ``piecewise`` (multiply by `decay_factor` at the given fractions of
    training); ``cosine`` (to zero at the end). With `warmup_epochs` > 0 the rate first rises
    linearly from 0 over that many epochs (fractions allowed), then follows the schedule over
    the remaining steps. `name` is ``sgd`` or ``adam`` (`momentum` and
    `nesterov` apply to SGD only). `eps_root` (Adam only) is added under Adam's square root;
    differentiating *through* Adam steps (L2C's inner loop) needs it > 0, or the derivative of
    √v at v = 0 makes the meta-gradient NaN.
    """
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if not 0 <= warmup < max(1, epochs * steps_per_epoch):
        raise ValueError(
            f"warmup_epochs={warmup_epochs} must be >= 0 and shorter than training "
            f"({epochs} epochs)."
        )
    total = max(1, epochs * steps_per_epoch - warmup)
    if schedule == "constant":
        lr = learning_rate
    elif schedule == "piecewise":
        lr = optax.piecewise_constant_schedule(
            learning_rate, {int(m * total): decay_factor for m in milestones}
        )
    elif schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, total)
    else:
        raise ValueError(f"Unknown schedule {schedule!r}; use constant, piecewise or cosine.")
    if warmup:
        rise = optax.linear_schedule(0.0, learning_rate, warmup)
        after = lr if callable(lr) else optax.constant_schedule(lr)
        lr = optax.join_schedules([rise, after], [warmup])
    if name == "sgd":
        base = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    elif name == "adam":
        base = optax.adam(lr, eps_root=eps_root)
    else:
        raise ValueError(f"Unknown optimizer {name!r}; use sgd or adam.")
    return optax.chain(optax.add_decayed_weights(weight_decay), base)


def over_seeds(fn, strategy="auto"):
    """Maps `fn` over a leading seed axis of all its arguments, inside one compiled program.

    ``vmap`` batches the seeds into every op; ``map`` runs them one after another in a compiled
    loop (`lax.map`). On CPU, XLA turns vmapped convolutions (one kernel per seed) into grouped
    convolutions that run 2-3x slower per seed than a loop (measured: CIFAR CNN, batch 128, 4
    seeds: vmap 3.4 s, map 1.1 s per step), so ``auto`` picks ``map`` on CPU, ``vmap`` elsewhere.
    """
    if strategy == "auto":
        strategy = "map" if jax.default_backend() == "cpu" else "vmap"
    if strategy == "vmap":
        return jax.vmap(fn)
    if strategy == "map":
        return lambda *args: jax.lax.map(lambda a: fn(*a), args)
    raise ValueError(f"Unknown seed strategy {strategy!r}; use auto, vmap or map.")


def init_state(module, key, image_shape, tx):
    """A fresh `TrainState` of `module` for images of `image_shape`, with optimizer `tx`."""
    variables = models.init(module, key, image_shape)
    params = variables.pop("params")
    return TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params))


def train_step(
    state,
    batch,
    key,
    *,
    apply_fn,
    objective,
    tx,
    crop_padding=0,
    flip=False,
    schedule=None,
    augment=None,
    private=None,
):
    """One optimisation step of one model: ``(state, batch, key) -> (state, metrics)``.

    Args:
      state: a `TrainState`.
      batch: ``{'image', 'label', 'index'}``, images float in [0, 1].
      key: PRNG key of this step (augmentation and the objective's own randomness).
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, model_state)``
        (`models.make_apply_fn`).
      objective: ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)`` with
        ``aux['model_state']`` and ``aux['metrics']`` (`jaxpoison.objectives`).
      tx: the optax optimizer whose state `state.opt_state` is.
      crop_padding, flip: random crop / horizontal flip of the batch (`data.augment`).
      schedule: ``(epochs, steps_per_epoch)`` of the whole training, or None. When given, the
        objective's batch also carries the position in the schedule, computed from
        ``state.step`` inside the compiled step (no host round trip, no retrace):
        ``progress = step / (epochs * steps_per_epoch)``, a float32 in [0, 1), and
        ``epoch = step / steps_per_epoch`` (2.5 = halfway through the third epoch). Objectives
        with schedules (FAT's τ, GAIRAT's burn-in and λ) read ``progress``.
      augment: ``augment(key, batch) -> batch`` after the crop and flip (the batch-stage
        transforms of `jaxpoison.transforms`: cutout, mixup, ...), or None.
      private: a `privacy.DPSGD` for DP-SGD (per-example gradients of the objective on one
        example each, clipped, summed and noised), or None. Models with batch statistics
        (BatchNorm) are refused by the trainer, since they couple the examples.
    """
    aug_key, obj_key = jax.random.split(key)
    batch = dict(
        batch, image=data.augment(aug_key, batch["image"], crop_padding=crop_padding, flip=flip)
    )
    if augment is not None:
        batch = augment(jax.random.fold_in(aug_key, 1), batch)
    if schedule is not None:
        epochs, steps_per_epoch = schedule
        step = state.step.astype(jnp.float32)
        batch |= {
            "progress": step / max(1, epochs * steps_per_epoch),
            "epoch": step / steps_per_epoch,
        }

    def loss_fn(params, batch, key):
        variables = {"params": params, **state.model_state}
        return objective(variables, batch, key, apply_fn=apply_fn)

    if private is None:
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, obj_key)
    else:
        scalars = ("progress", "epoch")  # the schedule position, shared by every example
        examples = {k: v for k, v in batch.items() if k not in scalars}
        shared = {k: v for k, v in batch.items() if k in scalars}

        def one(params, example, key):
            return loss_fn(params, jax.tree.map(lambda a: a[None], example) | shared, key)

        size = batch["label"].shape[0]
        keys = jax.random.split(jax.random.fold_in(obj_key, 0), size)
        grad_fn = jax.vmap(jax.grad(one, has_aux=True), in_axes=(None, 0, 0))
        per_example, aux = grad_fn(state.params, examples, keys)
        grads, dp_metrics = private.aggregate(per_example, jax.random.fold_in(obj_key, 1))
        aux = {
            "model_state": state.model_state,
            "metrics": jax.tree.map(jnp.mean, aux["metrics"]) | dp_metrics,
        }
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, aux["model_state"], opt_state), aux["metrics"]


__all__ = ["TrainState", "init_state", "make_optimizer", "over_seeds", "train_step"]
