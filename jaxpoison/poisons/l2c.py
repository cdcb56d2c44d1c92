r"""Learning to Confuse (L2C): a noise generator trained through the victim's training.

A generator g_ξ maps each training image to a bounded perturbation. One *trial* (one call of
`update`) takes a victim f_θ at θ_0 (a fresh initialisation, or with ``victim_reset_every``
> 1 the victim where the last trial left it) and trains it for T steps of its real optimizer
(SGD or momentum, optax state included) on poisoned batches x_t + g_ξ(x_t):

    θ_{t+1} = θ_t + optax_update(∇_θ L(f_θt(x_t + g_ξ(x_t)), y_t), opt_state_t)

The generator's objective is the victim's loss on *clean* data after training:

    untargeted:       min_ξ J(ξ) = - L(f_{θ_T(ξ)}(x), y)        (confuse the victim)
    label-specific:   min_ξ J(ξ) =   L(f_{θ_T(ξ)}(x), η(y))     (e.g. η(y) = y + 1 mod K)

``method`` picks how ∇_ξ J is computed, on the same networks, data and trial length:

* ``'exact'``: the inner loop is a `jax.lax.scan` (`jaxpoison.bilevel.unroll`, with ξ as the
  outer variable) and `jax.grad` differentiates through it, the exact hypergradient
  (reverse-over-reverse). With ``remat=True`` the scan body is wrapped
  in `jax.checkpoint` and the scan is split into segments of ``checkpoint_segment`` steps (each
  segment checkpointed too), so the backward pass keeps about T/S + S parameter carries instead
  of T steps of activations. ``truncation=K`` differentiates only the last K of the T steps
  (the first T - K run under `stop_gradient`). One generator step per trial.
* ``'algorithm1'`` (the paper's Algorithm 1): train the victim on g_ξ0 for T steps recording
  the trajectory θ_0..θ_{T-1} (T optimizer states kept in memory), then for each recorded θ_t
  take the one-step pseudo-update θ'_t = θ_t + update(∇_θ L(f_θt(x_t + g_ξ(x_t)), y_t)) and
  step ξ along -∇_ξ J evaluated at θ'_t on the clean x_t. T generator steps per trial.
* ``'algorithm2'`` (the paper's memory-efficient Algorithm 2, its released code): one loop;
  at each step the same pseudo-update drives a generator step, then the victim takes its real
  step on the noise of a frozen copy ξ0 of the generator (the copy is refreshed at the end of
  the trial). Nothing is recorded. The victim's trajectory depends only on ξ0 in both
  algorithms, so Algorithms 1 and 2 compute the same updates (a test checks it); they differ
  in memory, O(T) states for Algorithm 1 and O(1) for Algorithm 2.

``refresh_every=R'`` (Algorithms 1 and 2) keeps ξ0 for R' trials instead of one: with R' =
``victim_reset_every`` the victim trains on one fixed poison from its first step to its
restart while the generator learns beside it: a trial of the paper's Algorithm 2 is a
victim's whole training, and the released code refreshes its frozen copy ``atkmodel`` and
restarts its classifier once per generator epoch.

A generator with BatchNorm (``generator=dict(..., normalization='batch')``, the released
code's) is run as the released code runs it: in training mode (each batch's own statistics,
differentiated through) wherever ξ is differentiated or trained, its running averages
(``L2CState.stats``) updated by each such pass in order; in evaluation mode (the running
averages) for the frozen copy ξ0 whose noise the victim trains on in Algorithms 1 and 2, and in
`apply`. The exact method's victim trains on the differentiated, training-mode noise.

Each `update` receives one batch of the crafting engine and splits it into T inner batches
(``inner_batch_size`` = batch // T unless given, then sampled from the batch); the exact
method's outer loss uses ``outer_batch_size`` clean examples of the same batch. Keys: the
victim's init, the inner split, the outer sample and the per-step keys are all folded from
the update's key, the per-step keys being scan inputs.

Example::

    poison = l2c(threat=LpBall(0.3), num_classes=10, image_shape=(28, 28, 1),
                 victim=dict(name='cnn_mnist', width=0.5), unroll_steps=10)
    state = poison.init(key, {'image': x, 'label': y})
    state, metrics = jax.jit(poison.update)(state, batch, key)
    poisoned = poison.apply(state, batch)['image']

References:
  Feng, Cai & Zhou, "Learning to Confuse: Generating Training Time Adversarial Data with
  Auto-Encoder", NeurIPS 2019 (Algorithms 1 and 2, the RF/SVM victims on MNIST).
  Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
  Learning", ICML 2015 (exact hypergradients through unrolled SGD with momentum).
  Griewank & Walther, "Algorithm 799: Revolve", ACM TOMS 2000 (checkpointed reverse sweeps).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.errors
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison import bilevel, losses, models, objectives
from jaxpoison.models import generators
from jaxpoison.poisons.base import Poison
from jaxpoison.train_state import TrainState, make_optimizer, train_step

METHODS = ("exact", "algorithm1", "algorithm2")


@flax.struct.dataclass
class L2CState:
    """The crafting state: generator parameters ξ, the generator optimizer's state, the victim
    at the end of the last trial (where the next trial starts unless it restarts), with
    ``refresh_every`` > 1 the frozen copy ξ0 whose noise the victim trains on (else None), and
    for a BatchNorm generator its running averages ``stats`` (and ``frozen_stats``, ξ0's, with
    ``refresh_every`` > 1); None otherwise, so other generators save the same leaves as before."""

    step: jax.Array
    params: Any
    opt_state: Any
    victim: Any
    frozen: Any = None
    stats: Any = None
    frozen_stats: Any = None


def _generate(module, threat, params, x, stats, train, keeps_stats):
    """g_ξ(x) projected into `threat`, and the running averages after this pass. Only a
    generator that `keeps_stats` (a ``batch_stats`` collection) is called with `train`: a user's
    own module may take the images alone. In training mode it normalises by the batch's
    statistics and returns `stats` updated (None stays None); in evaluation mode it uses them."""
    if not keeps_stats:
        return threat.project(module.apply({"params": params}, x), x), None
    variables = {"params": params} | ({} if stats is None else {"batch_stats": stats})
    if not train:
        return threat.project(module.apply(variables, x, train=False), x), stats
    delta, updated = module.apply(variables, x, train=True, mutable=["batch_stats"])
    return threat.project(delta, x), None if stats is None else updated["batch_stats"]


def make_generator(generator, *, threat):
    """A generator module from a name, a ``dict(name=..., **fields)`` spec, or a module."""
    if isinstance(generator, nn.Module):
        return generator
    spec = {"name": generator} if isinstance(generator, str) else dict(generator)
    return generators.make(spec.pop("name"), epsilon=threat.epsilon, norm=threat.norm, **spec)


def make_victim(victim, *, num_classes):
    """A victim module from a ``dict(name=..., width=..., **fields)`` spec or a module.

    Fields added to another model later, at their defaults, that the named model does not take
    are left out (`models.keyed_fields`): l2c_mnist's victim holds cnn_mnist's normalization and
    pool, and ``--config.poisons.l2c.victim.name=mlp`` builds an MLP.
    """
    if isinstance(victim, nn.Module):
        return victim
    spec = {"name": victim} if isinstance(victim, str) else dict(victim)
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    name = spec.pop("name")
    spec = models.keyed_fields(models.MODELS.get(name), spec)
    return models.make(name, num_classes=num_classes, **spec)


def make_target(target, num_classes):
    """η(y) of the label-specific attack: 'next' (y + 1 mod K), 'previous', or a callable."""
    if callable(target):
        return target
    if target == "next":
        return lambda y: (y + 1) % num_classes
    if target == "previous":
        return lambda y: (y - 1) % num_classes
    raise ValueError(f"target must be 'next', 'previous' or a callable, not {target!r}.")


@dataclasses.dataclass(frozen=True)
class MetaProblem:
    """The pieces of one L2C trial as pure functions (built by `meta_problem`).

    Attributes:
      generate: ``(gen_params, x, stats=None, *, train=True) -> (delta, stats)``, g_ξ(x) inside
        the threat model (x + delta in [0, 1]) and the generator's BatchNorm running averages:
        ``train=True`` normalises by the batch's statistics and returns `stats` updated by this
        pass; ``train=False`` uses `stats` and returns them unchanged. None for a generator
        without BatchNorm (then `train` changes nothing).
      delta_fn: ``(gen_params, x) -> delta``, `generate` in training mode.
      victim_init: ``key -> TrainState`` of a fresh victim (params in the data's dtype).
      inner_step: ``(state, batch, key) -> (state, metrics)``, one real optimizer step on
        `batch` (already poisoned).
      outer_objective: ``(state, batch) -> J`` on a clean batch (to be minimised).
      split: ``(batch, key) -> (inner [T, b, ...], outer [b_out, ...])`` batches of a trial.
      meta_objective: ``(gen_params, victim0, inner, outer, keys[T]) -> (J, aux)`` through the
        scanned inner loop (the exact method; `jaxpoison.bilevel.unroll` of the noisy inner
        step).
    """

    generate: Callable
    delta_fn: Callable
    victim_init: Callable
    inner_step: Callable
    outer_objective: Callable
    split: Callable
    meta_objective: Callable
    gen_module: Any
    victim_module: Any
    unroll_steps: int


def meta_problem(
    *,
    threat,
    num_classes,
    image_shape,
    generator="autoencoder",
    victim=None,
    inner_optimizer=None,
    inner_objective=None,
    unroll_steps=10,
    truncation=None,
    remat=True,
    checkpoint_segment=None,
    label_specific=False,
    target="next",
    inner_batch_size=None,
    outer_batch_size=None,
):
    """Builds the `MetaProblem` of one L2C trial (arguments as in `l2c`)."""
    num_steps = int(unroll_steps)
    if num_steps < 1:
        raise ValueError(f"unroll_steps={unroll_steps} must be >= 1.")
    truncation = num_steps if truncation is None else int(truncation)
    if not 1 <= truncation <= num_steps:
        raise ValueError(f"truncation={truncation} must be in 1..unroll_steps={num_steps}.")
    segment = None if checkpoint_segment is None else int(checkpoint_segment)
    if segment is not None and segment < 1:
        raise ValueError(f"checkpoint_segment={checkpoint_segment} must be >= 1 (or None).")
    gen_module = make_generator(generator, threat=threat)
    victim_module = make_victim(victim or {"name": "cnn_mnist"}, num_classes=num_classes)
    apply_fn = models.make_apply_fn(victim_module)
    obj_spec = dict(inner_objective or {"name": "erm"})
    obj_name = obj_spec.pop("name")
    if obj_name in objectives.ADVERSARIAL and not {"threat", "epsilon"} & set(obj_spec):
        obj_spec["threat"] = threat  # a defending victim defends the poison's own ball
    objective = objectives.make(obj_name, **obj_spec)
    opt_kwargs = dict(learning_rate=0.01, momentum=0.9, weight_decay=0.0)
    opt_kwargs.update(inner_optimizer or {})
    if opt_kwargs.get("name") == "adam":
        # The meta-gradient goes through Adam's √v, whose derivative is infinite at v = 0.
        opt_kwargs.setdefault("eps_root", 1e-8)
    tx = make_optimizer(schedule="constant", epochs=1, steps_per_epoch=num_steps, **opt_kwargs)
    eta = make_target(target, num_classes)

    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    keeps_stats = "batch_stats" in jax.eval_shape(gen_module.init, jax.random.key(0), images)

    def generate(gen_params, x, stats=None, *, train=True):
        return _generate(gen_module, threat, gen_params, x, stats, train, keeps_stats)

    def delta_fn(gen_params, x):
        return generate(gen_params, x)[0]

    def victim_init(key, dtype=jnp.float32):
        variables = models.init(victim_module, key, image_shape)
        params = jax.tree.map(lambda p: p.astype(dtype), variables.pop("params"))
        return TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params))

    def inner_step(state, batch, key):
        return train_step(state, batch, key, apply_fn=apply_fn, objective=objective, tx=tx)

    def outer_objective(state, batch):
        # Training mode, as the paper's code evaluates its look-ahead model: BatchNorm victims use
        # the clean batch's statistics (their running averages after T steps are meaningless).
        variables = {"params": state.params, **state.model_state}
        logits = apply_fn(variables, batch["image"], train=True)[0]
        if label_specific:
            return jnp.mean(losses.cross_entropy(logits, eta(batch["label"])))
        return -jnp.mean(losses.cross_entropy(logits, batch["label"]))

    def split(batch, key):
        size = batch["label"].shape[0]
        b = size // num_steps if inner_batch_size is None else int(inner_batch_size)
        if b < 1 or b > size:
            raise ValueError(
                f"A batch of {size} examples cannot feed {num_steps} inner steps of "
                f"{b} examples; raise the crafting batch_size to a multiple of unroll_steps."
            )
        inner_key, outer_key = jax.random.split(key)
        if inner_batch_size is None:
            idx = jax.random.permutation(inner_key, size)[: num_steps * b].reshape(num_steps, b)
        else:
            keys = jax.random.split(inner_key, num_steps)
            idx = jax.vmap(lambda k: jax.random.choice(k, size, (b,), replace=False))(keys)
        ob = b if outer_batch_size is None else min(int(outer_batch_size), size)
        oidx = jax.random.choice(outer_key, size, (ob,), replace=False)
        take = lambda i: {"image": batch["image"][i], "label": batch["label"][i]}
        return take(idx), take(oidx)

    def poisoned(gen_params, b):
        return dict(b, image=b["image"] + delta_fn(gen_params, b["image"]))

    def noisy_step(gen_params, state, b, k):
        state, metrics = inner_step(state, poisoned(gen_params, b), k)
        return state, metrics["loss"]

    def meta_objective(gen_params, victim0, inner, outer, keys):
        state, inner_loss = bilevel.unroll(
            noisy_step,
            gen_params,
            victim0,
            inner,
            keys,
            truncation=truncation,
            remat=remat,
            segment=segment,
        )
        return outer_objective(state, outer), {"state": state, "inner_loss": inner_loss}

    return MetaProblem(
        generate=generate,
        delta_fn=delta_fn,
        victim_init=victim_init,
        inner_step=inner_step,
        outer_objective=outer_objective,
        split=split,
        meta_objective=meta_objective,
        gen_module=gen_module,
        victim_module=victim_module,
        unroll_steps=num_steps,
    )


def _make_meta_optimizer(spec):
    spec = dict(spec or {"name": "adam", "learning_rate": 1e-3})
    name = spec.pop("name")
    clip = spec.pop("max_grad_norm", None)
    if not hasattr(optax, name):
        raise ValueError(f"meta_optimizer name {name!r} is not an optax optimizer.")
    tx = getattr(optax, name)(**spec)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _global_norm(tree):
    return optax.tree.norm(tree)


def l2c(
    *,
    threat,
    num_classes,
    image_shape,
    generator="autoencoder",
    victim=None,
    inner_optimizer=None,
    inner_objective=None,
    unroll_steps=10,
    truncation=None,
    remat=True,
    checkpoint_segment=None,
    method="exact",
    label_specific=False,
    target="next",
    inner_batch_size=None,
    outer_batch_size=None,
    meta_optimizer=None,
    victim_reset_every=1,
    refresh_every=1,
    num_epochs=1,
):
    """Learning to Confuse as a `Poison` whose state is the generator (see the module docstring).

    Args:
      threat: an `LpBall`; the generator's output is ``ε·tanh`` (ℓ∞) or scaled to the ℓ2 ball,
        then projected into the threat model (mask, [0, 1] box).
      num_classes: K.
      image_shape: (H, W, C).
      generator: ``'autoencoder'`` / ``'unet'``, a ``dict(name=..., width=..., ...)`` spec of
        `jaxpoison.models.generators` (``normalization='batch'``: the released code's
        BatchNorm, see the module docstring), or a flax module called as ``(x)``; one that
        keeps running averages in a ``batch_stats`` collection is called as ``(x, train)``.
      victim: the crafting victim: ``dict(name=..., width=..., ...)`` of `jaxpoison.models`
        (default ``cnn_mnist``) or a flax module; restarted from a fresh init every trial.
      inner_optimizer: keyword arguments of `train_state.make_optimizer` for the victim's inner
        steps (constant schedule; defaults: learning_rate 0.01, momentum 0.9, weight_decay 0;
        ``name='adam'`` gets ``eps_root=1e-8`` unless given, so the meta-gradient is finite).
      inner_objective: the victim's training objective spec (default ``{'name': 'erm'}``); an
        adversarial one without its own radius defends the poison's ball (`threat`).
      unroll_steps: T, inner steps per trial.
      truncation: K <= T; only the last K steps are differentiated (exact method). None = T.
      remat: `jax.checkpoint` the scanned inner step (exact method).
      checkpoint_segment: steps per checkpointed segment with `remat` (None: round(sqrt(K));
        1: checkpoint every step only).
      method: ``'exact'``, ``'algorithm1'`` or ``'algorithm2'``.
      label_specific: minimise the loss toward η(y) instead of maximising the loss on y.
      target: η: ``'next'`` (y + 1 mod K), ``'previous'``, or a callable.
      inner_batch_size: examples per inner step (None: crafting batch // T, a partition).
      outer_batch_size: clean examples of the outer loss (None: the inner batch size).
      meta_optimizer: ``dict(name=<optax optimizer>, max_grad_norm=None, **kwargs)`` for ξ
        (default Adam, learning rate 1e-3).
      victim_reset_every: R; a trial starts from a fresh victim when the trial number is a
        multiple of R and otherwise continues the victim where the last trial left it (trained
        on the generator's noise of its time). R = 1 (default) restarts every trial, as
        Algorithm 1; R = trials per epoch is the released code's schedule (one victim per
        epoch). With R > 1 the generator meets victims at every stage of training, not only
        their first T steps; each trial's meta-gradient is still exact through its own T steps
        and stops at the trial's start.
      refresh_every: R', Algorithms 1 and 2 only; the victim's real steps use the noise of a
        frozen copy ξ0 of the generator taken every R' trials (at trials 0, R', 2R', ...).
        R' = 1 (default) refreshes it every trial of T steps; R' = ``victim_reset_every``
        trains each victim on one fixed poison, as the paper's Algorithm 2 (whose trial is a
        victim's whole training) and its released code do.
      num_epochs: passes of the crafting engine over the training set.

    Returns:
      A `Poison`; ``update(state, batch, key)`` runs one trial and returns metrics
      ``meta/objective``, ``meta/grad_norm``, ``victim/poisoned_loss``, ``victim/clean_loss``,
      ``victim/clean_accuracy`` (of the victim after T steps, on the outer clean batch).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use one of {METHODS}.")
    problem = meta_problem(
        threat=threat,
        num_classes=num_classes,
        image_shape=image_shape,
        generator=generator,
        victim=victim,
        inner_optimizer=inner_optimizer,
        inner_objective=inner_objective,
        unroll_steps=unroll_steps,
        truncation=truncation,
        remat=remat,
        checkpoint_segment=checkpoint_segment,
        label_specific=label_specific,
        target=target,
        inner_batch_size=inner_batch_size,
        outer_batch_size=outer_batch_size,
    )
    meta_tx = _make_meta_optimizer(meta_optimizer)
    num_steps = problem.unroll_steps
    reset_every = int(victim_reset_every)
    if reset_every < 1:
        raise ValueError(f"victim_reset_every={victim_reset_every} must be >= 1 (trials).")
    refresh = int(refresh_every)
    if refresh < 1:
        raise ValueError(f"refresh_every={refresh_every} must be >= 1 (trials).")
    if refresh > 1 and method == "exact":
        raise ValueError(
            f"refresh_every={refresh_every} needs a frozen generator copy, which only "
            "method='algorithm1' or 'algorithm2' has; use one of them or refresh_every=1."
        )

    def init(key, dataset):
        dtype = dataset["image"].dtype
        variables = generators.init_variables(problem.gen_module, key, image_shape, dtype)
        params, stats = variables["params"], variables.get("batch_stats")
        victim = problem.victim_init(jax.random.fold_in(key, 1), dtype)
        frozen, frozen_stats = (params, stats) if refresh > 1 else (None, None)
        return L2CState(
            jnp.zeros((), jnp.int32),
            params,
            meta_tx.init(params),
            victim,
            frozen,
            stats,
            frozen_stats,
        )

    def victim_metrics(state, outer):
        logits = problem.victim_module.apply(
            {"params": state.params, **state.model_state}, outer["image"], train=False
        )
        return {
            "victim/clean_loss": jnp.mean(losses.cross_entropy(logits, outer["label"])),
            "victim/clean_accuracy": jnp.mean(losses.accuracy(logits, outer["label"])),
        }

    def generator_step(params, opt_state, grads):
        updates, opt_state = meta_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def lookahead_objective(gen_params, stats, vstate, clean, key):
        """J after the one-step pseudo-update θ' of Algorithms 1 and 2, on the clean batch, and
        the generator's running averages updated by its pass over the batch."""
        delta, stats = problem.generate(gen_params, clean["image"], stats)
        new_state, _ = problem.inner_step(vstate, dict(clean, image=clean["image"] + delta), key)
        return problem.outer_objective(new_state, clean), stats

    lookahead_grad = jax.value_and_grad(lookahead_objective, has_aux=True)

    def running_stats(gen_params, stats, images):
        """The running averages after training-mode passes of ξ over the T inner batches, in
        order: the passes of the exact method's unroll, replayed outside the differentiated
        program."""
        if stats is None:
            return None
        body = lambda s, x: (problem.generate(gen_params, x, s)[1], None)
        return jax.lax.scan(body, stats, images)[0]

    def update(state, batch, key):
        dtype = batch["image"].dtype
        fresh = problem.victim_init(jax.random.fold_in(key, 0), dtype)
        if reset_every == 1:
            victim0 = fresh
        else:
            restart = state.step % reset_every == 0
            victim0 = jax.tree.map(lambda a, b: jnp.where(restart, a, b), fresh, state.victim)
        inner, outer = problem.split(batch, jax.random.fold_in(key, 1))
        keys = jax.random.split(jax.random.fold_in(key, 2), num_steps)
        params, opt_state, stats = state.params, state.opt_state, state.stats

        if method == "exact":
            (objective, aux), grads = jax.value_and_grad(problem.meta_objective, has_aux=True)(
                params, victim0, inner, outer, keys
            )
            stats = running_stats(params, stats, inner["image"])
            params, opt_state = generator_step(params, opt_state, grads)
            final, inner_loss, grad_norm = aux["state"], aux["inner_loss"], _global_norm(grads)
        else:
            frozen, frozen_stats = params, stats
            if refresh > 1:
                take = state.step % refresh == 0
                pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(take, a, b), new, old)
                frozen = pick(params, state.frozen)
                frozen_stats = pick(stats, state.frozen_stats)
            frozen, frozen_stats = jax.lax.stop_gradient((frozen, frozen_stats))

            def real_step(vstate, b, k):
                noise = problem.generate(frozen, b["image"], frozen_stats, train=False)[0]
                return problem.inner_step(vstate, dict(b, image=b["image"] + noise), k)

            def meta_step(params, opt_state, stats, vstate, b, k):
                (j, stats), grads = lookahead_grad(params, stats, vstate, b, k)
                params, opt_state = generator_step(params, opt_state, grads)
                return params, opt_state, stats, j, _global_norm(grads)

            if method == "algorithm1":

                def record(vstate, inputs):
                    b, k = inputs
                    new, metrics = real_step(vstate, b, k)
                    return new, (vstate, metrics["loss"])

                final, (trajectory, inner_loss) = jax.lax.scan(record, victim0, (inner, keys))

                def replay(carry, inputs):
                    vstate, b, k = inputs
                    params, opt_state, stats, j, g = meta_step(*carry, vstate, b, k)
                    return (params, opt_state, stats), (j, g)

                (params, opt_state, stats), (js, gs) = jax.lax.scan(
                    replay, (params, opt_state, stats), (trajectory, inner, keys)
                )
            else:

                def single_loop(carry, inputs):
                    params, opt_state, stats, vstate = carry
                    b, k = inputs
                    params, opt_state, stats, j, g = meta_step(
                        params, opt_state, stats, vstate, b, k
                    )
                    vstate, metrics = real_step(vstate, b, k)
                    return (params, opt_state, stats, vstate), (j, g, metrics["loss"])

                (params, opt_state, stats, final), (js, gs, inner_loss) = jax.lax.scan(
                    single_loop, (params, opt_state, stats, victim0), (inner, keys)
                )
            objective, grad_norm = jnp.mean(js), jnp.mean(gs)

        metrics = {
            "meta/objective": objective,
            "meta/grad_norm": grad_norm,
            "victim/poisoned_loss": jnp.mean(inner_loss),
            **victim_metrics(final, outer),
        }
        final = jax.lax.stop_gradient(final)
        kept, kept_stats = (frozen, frozen_stats) if refresh > 1 else (None, None)
        new_state = L2CState(state.step + 1, params, opt_state, final, kept, stats, kept_stats)
        return new_state, metrics

    def apply(state, batch):
        x = batch["image"]
        noise = problem.generate(state.params, x, state.stats, train=False)[0]
        return dict(batch, image=x + noise)

    # `update` never sees num_epochs (constant rates, resets counted in trials): extendable.
    return Poison(
        init=init, update=update, apply=apply, num_epochs=int(num_epochs), extendable=True
    )


def perturbations(state, images, *, generator, threat, batch_size=1000):
    """g_ξ(x) for a whole array of images, in jitted batches (numpy float32 [N, H, W, C]).

    The noise `apply` adds: a BatchNorm generator normalises by its running averages.

    Args:
      state: an `L2CState` (or anything with ``.params`` and optionally ``.stats``) of a
        crafted L2C poison.
      images: float images in [0, 1].
      generator: the generator spec the poison was crafted with.
      threat: the poison's `LpBall`.
      batch_size: images per jitted call.
    """
    module = make_generator(generator, threat=threat)
    stats = getattr(state, "stats", None)  # a crafted BatchNorm generator always has them
    fn = jax.jit(
        lambda p, s, x: _generate(module, threat, p, x, s, False, keeps_stats=s is not None)[0]
    )
    images = np.asarray(images, np.float32)
    parts = [
        np.asarray(fn(state.params, stats, images[i : i + batch_size]))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts)


def noise_accuracy(apply_fn, variables, noise, labels, *, batch_size=1000, batch_statistics=False):
    """The paper's diagnostic: accuracy of a classifier f on the perturbations g(x) alone.

    A victim trained on L2C data that labels the bare noise correctly has learned the noise as
    a shortcut; a clean model doing so means the noise carries class-like features.

    A BatchNorm classifier can be read two ways. By default (evaluation mode) its running
    averages normalise the noise, statistics of the images it was trained on.
    ``batch_statistics=True`` runs it in training mode instead: each batch of `batch_size`
    noise images is normalised by its own statistics (the running averages returned are
    dropped), as the released DeepConfuse test script reads its victims (it never calls
    ``.eval()``). The released generator's noise gives the paper's 95% that way and 44-66% in
    evaluation mode (docs/l2c.md). The batches follow the given order, so shuffle noise sorted
    by label first. A model with dropout needs the default: training mode would draw dropout
    masks, for which this reading has no key (it says so in one line).

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)``.
      variables: the classifier's variables.
      noise: perturbations [N, H, W, C] (e.g. from `perturbations`), fed as images.
      labels: int labels [N].
      batch_size: images per jitted call (and per batch of statistics).
      batch_statistics: read BatchNorm layers with each batch's statistics.

    Returns:
      The accuracy as a Python float.

    Raises:
      ValueError: with ``batch_statistics=True``, when the classifier's training mode needs a
        PRNG key (dropout): the message names the fix.
    """
    fn = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x, train=batch_statistics)[0], -1))
    noise, labels = np.asarray(noise), np.asarray(labels)
    try:
        correct = sum(
            int(
                np.sum(
                    np.asarray(fn(variables, noise[i : i + batch_size]))
                    == labels[i : i + batch_size]
                )
            )
            for i in range(0, len(labels), batch_size)
        )
    except flax.errors.InvalidRngError as e:
        if not batch_statistics:
            raise
        raise ValueError(
            "noise_accuracy(batch_statistics=True): the classifier in training mode needs a "
            f"PRNG key this reading does not draw ({str(e).split(' (')[0]}); read a model with "
            "dropout with batch_statistics=False (its running averages), or pass an apply_fn "
            "whose training mode keeps dropout off."
        ) from e
    return correct / max(1, len(labels))


__all__ = [
    "L2CState",
    "METHODS",
    "MetaProblem",
    "l2c",
    "make_generator",
    "make_target",
    "make_victim",
    "meta_problem",
    "noise_accuracy",
    "perturbations",
]
