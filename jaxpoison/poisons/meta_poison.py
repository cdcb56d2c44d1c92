r"""MetaPoison-style availability poison: per-example δ through unrolled training of an ensemble.

Every training example i carries its own perturbation δ_i (a table δ[N, H, W, C], as
error-minimizing noise). The crafting victims are an ensemble of M models kept at staggered
stages of training: victim m starts pretrained for m·S steps on clean data (S =
``stagger_steps``), every `update` trains each one step further, and a victim that reaches M·S
steps restarts from a fresh initialisation, so the ensemble always spans the first M·S steps of
training (MetaPoison's "staggered" surrogate models). One `update` on a crafting batch B:

1. For every victim θ^m, unroll K steps of its real optimizer on the poisoned batch
   x_B + δ_B (`jaxpoison.bilevel.unroll`, the same batch K times as the reference's ``nadapt``)
   and score the look-ahead victim on the clean batch,

       J^m(δ_B) = - CE(f_{θ^m_K(δ_B)}(x_B), y_B)          (availability: do badly on clean data)

   where MetaPoison's targeted version minimises the adversarial loss of target images instead.
2. δ_B ← Π_ε(δ_B - α · sign(mean_m ∇_{δ_B} J^m)): a signed step on the ensemble's mean
   hypergradient, projected into the threat ball and the [0, 1] box.
3. Every victim takes one real step on the batch (clean images with ``trajectory='clean'``, the
   reference's default; poisoned with ``'poison'``) and ages by one step.

The hypergradient is exact through the K unrolled steps (the K steps differentiated as one
scan, with `remat`), with respect to the batch's rows of δ only.

With ``class_wise=True`` δ is one pattern per class (a table δ[K, H, W, C], as class-wise
error-minimizing noise), x_B + δ_{y_B} clipped to the [0, 1] box: the same objective J, its
hypergradient summed over the batch's examples of each class, and every update steps the
patterns of the classes in the batch (projected into the ball).

Differences from the reference (TensorFlow, clean-label targeted): the objective is the
untargeted availability one above; δ takes signed steps of ``step_size`` instead of Adam steps
with a decaying crafting rate; no ReColor perturbation; the staggered pretraining runs inside
`init` (masked steps, one compiled loop) instead of loading pretrained weight sets.

Example::

    poison = meta_poison(threat=LpBall(8 / 255), num_classes=10, image_shape=(32, 32, 3),
                         model=dict(name='cnn_cifar', width=0.5), num_models=4)
    state, history = poisons.craft(poison, x, y, key=jax.random.key(0), batch_size=128)

References:
  Huang, Geiping, Fowl, Taylor & Goldstein, "MetaPoison: Practical General-purpose Clean-label
  Data Poisoning", NeurIPS 2020 (unrolled K-step look-ahead, staggered ensembles, Algorithm 1).
  Fowl, Goldblum, Chiang, Geiping, Czaja & Goldstein, "Adversarial Examples Make Strong
  Poisons", NeurIPS 2021 (availability poisons as per-example ε-bounded δ).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxpoison import bilevel, losses, models, objectives
from jaxpoison.poisons.base import Poison, SampleWiseState, perturb, project_pattern
from jaxpoison.poisons.l2c import make_victim
from jaxpoison.train_state import TrainState, make_optimizer, over_seeds, train_step

TRAJECTORIES = ("clean", "poison")


@flax.struct.dataclass
class EnsembleState:
    """The crafting victims: M stacked `TrainState`s, their ages in steps, the update count."""

    victims: Any
    ages: jax.Array  # [M] int32
    step: jax.Array


def meta_poison(
    *,
    threat,
    num_classes,
    image_shape,
    model=None,
    optimizer=None,
    unroll_steps=2,
    num_models=4,
    stagger_steps=20,
    pretrain_batch_size=128,
    step_size=None,
    trajectory="clean",
    remat=True,
    num_epochs=10,
    class_wise=False,
):
    """MetaPoison-style per-example (or per-class) δ as a `Poison` (see the module docstring).

    Args:
      threat: an `LpBall`.
      num_classes: K.
      image_shape: (H, W, C).
      model: the crafting victims' ``dict(name=..., width=...)`` of `jaxpoison.models` (default
        ``cnn_mnist`` for 1-channel images, else ``cnn_cifar``, at width 0.5) or a flax module.
      optimizer: `train_state.make_optimizer` keywords of the victims' steps, real and unrolled
        (constant schedule; defaults: SGD, learning_rate 0.1, momentum 0.9, weight_decay 0 as
        the reference's ``lrnrate`` 0.1).
      unroll_steps: K, unrolled look-ahead steps per victim (the reference's ``nadapt``, 2).
      num_models: M, victims in the ensemble (the reference runs 24, one per epoch).
      stagger_steps: S, training steps between successive victims' stages (the reference
        staggers by one epoch); the oldest victim restarts after M·S steps.
      pretrain_batch_size: batch of the clean steps that stagger the victims in `init`.
      step_size: α of the signed δ step (None: ε/5, as P1's).
      trajectory: ``'clean'`` or ``'poison'``: the batch the victims' real steps train on.
      remat: `jax.checkpoint` the unrolled steps (`bilevel.unroll`).
      num_epochs: passes of the crafting engine over the training set.
      class_wise: one δ per class, added to every example of the class, instead of one per
        example: the state's ``delta`` is then [K, H, W, C] and every update steps the patterns
        of the batch's classes with the hypergradient summed over their examples (the same
        availability objective; see the module docstring).

    Returns:
      A `Poison` with a `SampleWiseState` (``delta`` [K, H, W, C] with `class_wise`, ``extra``
      an `EnsembleState`); `update` returns metrics ``meta/objective`` (mean J over the
      ensemble), ``victim/poisoned_loss`` (the unrolled steps' mean loss) and
      ``victim/clean_accuracy`` (of the look-ahead victims).
    """
    num_steps, members, stagger = int(unroll_steps), int(num_models), int(stagger_steps)
    if num_steps < 1:
        raise ValueError(f"unroll_steps={unroll_steps} must be >= 1 (look-ahead steps).")
    if members < 1:
        raise ValueError(f"num_models={num_models} must be >= 1 (victims in the ensemble).")
    if stagger < 1:
        raise ValueError(f"stagger_steps={stagger_steps} must be >= 1 (steps between victims).")
    if int(pretrain_batch_size) < 1:
        raise ValueError(f"pretrain_batch_size={pretrain_batch_size} must be >= 1.")
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory={trajectory!r}; use one of {TRAJECTORIES}.")
    if not isinstance(class_wise, bool):
        raise ValueError(f"class_wise={class_wise!r} must be True or False.")
    alpha = threat.epsilon / 5 if step_size is None else float(step_size)
    if not alpha > 0:
        raise ValueError(f"step_size={step_size} must be > 0 (or None for epsilon / 5).")
    default = {"name": "cnn_mnist" if image_shape[-1] == 1 else "cnn_cifar", "width": 0.5}
    module = make_victim(model or default, num_classes=num_classes)
    apply_fn = models.make_apply_fn(module)
    objective = objectives.make("erm")
    opt_kwargs = dict(learning_rate=0.1, momentum=0.9, weight_decay=0.0)
    opt_kwargs.update(optimizer or {})
    if opt_kwargs.get("name") == "adam":
        opt_kwargs.setdefault("eps_root", 1e-8)  # a finite derivative of Adam's √v at v = 0
    tx = make_optimizer(schedule="constant", epochs=1, steps_per_epoch=1, **opt_kwargs)
    lifetime = members * stagger

    def victim_init(key, dtype):
        variables = models.init(module, key, image_shape)
        params = jax.tree.map(lambda p: p.astype(dtype), variables.pop("params"))
        return TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params))

    def inner_step(state, batch, key):
        return train_step(state, batch, key, apply_fn=apply_fn, objective=objective, tx=tx)

    def poisoned(table, batch):
        # The table is in the ball already (projected after every step); projecting it here
        # too would differentiate the ℓ2 norm at δ = 0, whose gradient is NaN. A class pattern
        # can leave the [0, 1] box on some images: clipped, as `apply` does.
        if class_wise:
            return dict(batch, image=jnp.clip(batch["image"] + table[batch["label"]], 0.0, 1.0))
        return bilevel.perturb(table, batch)

    def noisy_step(table, state, batch, key):
        state, metrics = inner_step(state, poisoned(table, batch), key)
        return state, metrics["loss"]

    def fresh_victims(key, dtype):
        return jax.vmap(lambda k: victim_init(k, dtype))(jax.random.split(key, members))

    def init(key, dataset):
        x = dataset["image"]
        victims = fresh_victims(jax.random.fold_in(key, 0), x.dtype)
        ages = jnp.arange(members, dtype=jnp.int32) * stagger
        if members > 1:
            # Victim m trains its first m·S clean steps: one loop of (M-1)·S masked steps.
            clean = {"image": x, "label": dataset["label"]}
            size = min(int(pretrain_batch_size), x.shape[0])
            length = (members - 1) * stagger
            stream = bilevel.batches(
                clean, num_steps=length, batch_size=size, key=jax.random.fold_in(key, 1)
            )
            keys = jax.random.split(jax.random.fold_in(key, 2), length)

            def pretrain(victims, inputs):
                t, batch, k = inputs
                stepped = over_seeds(lambda v: inner_step(v, batch, k)[0])(victims)
                keep = t < ages
                pick = lambda a, b: jnp.where(keep.reshape(-1, *[1] * (a.ndim - 1)), a, b)
                return jax.tree.map(pick, stepped, victims), None

            xs = (jnp.arange(length), stream, keys)
            victims, _ = jax.lax.scan(pretrain, victims, xs)
        extra = EnsembleState(victims, ages, jnp.zeros((), jnp.int32))
        shape = (num_classes, *x.shape[1:]) if class_wise else x.shape
        return SampleWiseState(delta=jnp.zeros(shape, x.dtype), extra=extra)

    def update(state, batch, key):
        x, y = batch["image"], batch["label"]
        size = y.shape[0]
        # The outer variables: the K class patterns, or the batch's rows of the δ table (a table
        # of the batch alone, indexed 0..B-1).
        table = state.delta if class_wise else state.delta[batch["index"]]
        local = {"image": x, "label": y, "index": jnp.arange(size)}
        stream = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_steps, *a.shape)), local)
        ensemble = state.extra

        def member(victim, member_key):
            unroll_keys = jax.random.split(jax.random.fold_in(member_key, 0), num_steps)

            def objective_of(table):
                final, inner_loss = bilevel.unroll(
                    noisy_step, table, victim, stream, unroll_keys, remat=remat
                )
                variables = {"params": final.params, **final.model_state}
                # Training mode, as L2C's look-ahead: BatchNorm uses the clean batch's statistics.
                logits = apply_fn(variables, x, train=True)[0]
                j = -jnp.mean(losses.cross_entropy(logits, y))
                return j, (inner_loss, jnp.mean(losses.accuracy(logits, y)))

            (j, (inner_loss, accuracy)), grads = jax.value_and_grad(objective_of, has_aux=True)(
                table
            )
            real = local if trajectory == "clean" else poisoned(table, local)
            victim, _ = inner_step(victim, real, jax.random.fold_in(member_key, 1))
            return victim, grads, j, jnp.mean(inner_loss), accuracy

        member_keys = jax.random.split(jax.random.fold_in(key, 0), members)
        victims, grads, js, inner_loss, accuracy = over_seeds(member)(ensemble.victims, member_keys)
        # Classes absent from the batch have a zero gradient: their patterns stay put.
        table = table - alpha * jnp.sign(jnp.mean(grads, axis=0))
        if class_wise:
            delta = project_pattern(threat, table)
        else:
            delta = state.delta.at[batch["index"]].set(threat.project(table, x))
        # Age the victims; the oldest restarts from a fresh initialisation.
        ages = ensemble.ages + 1
        restart = ages >= lifetime
        fresh = fresh_victims(jax.random.fold_in(key, 1), x.dtype)
        pick = lambda a, b: jnp.where(restart.reshape(-1, *[1] * (a.ndim - 1)), a, b)
        victims = jax.tree.map(pick, fresh, victims)
        ages = jnp.where(restart, 0, ages)
        extra = EnsembleState(victims, ages, ensemble.step + 1)
        metrics = {
            "meta/objective": jnp.mean(js),
            "victim/poisoned_loss": jnp.mean(inner_loss),
            "victim/clean_accuracy": jnp.mean(accuracy),
        }
        return SampleWiseState(delta=delta, extra=extra), metrics

    def apply(state, batch):
        delta = state.delta[batch["label"] if class_wise else batch["index"]]
        return dict(batch, image=perturb(threat, batch["image"], delta))

    return Poison(init=init, update=update, apply=apply, num_epochs=int(num_epochs))


__all__ = ["EnsembleState", "TRAJECTORIES", "meta_poison"]
