"""A score model (`ScoreModel`: U-Net, parameters, schedule), its ε-prediction loss, a jitted
training step on the mesh, and `train_score_model`, resumable from orbax checkpoints.

The loss is DDPM's simplified objective (Ho et al. 2020, Eq. 14; score_sde's discrete VP loss
with ``reduce_mean``): t ~ U{0 .. T-1}, ε ~ N(0, I), x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε with
x_0 in [-1, 1], and the mean of (ε_θ(x_t, t) - ε)². Training follows score_sde's recipe (Adam
2e-4 with a linear warmup, gradients clipped to norm 1, an exponential moving average of the
parameters, random horizontal flips); the EMA parameters are the ones returned and sampled with.

References:
  Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models." NeurIPS 2020.
  Song et al. ICLR 2021 (yang-song/score_sde: ``losses.py``, ``run_lib.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison import checkpointing, data, sharding
from jaxpoison.diffusion import schedule as schedule_lib
from jaxpoison.diffusion import unet
from jaxpoison.progress import progress_bar, say
from jaxpoison.workdir import ARTIFACT_VERSION, array_digest, keyed_dir


@dataclasses.dataclass(frozen=True)
class ScoreModel:
    """A trained (or loaded) score model.

    Attributes:
      module: the `unet.UNet`.
      params: its parameters (the EMA parameters after training).
      schedule: the `schedule_lib.Schedule` it was trained with.
      spec: ``{'model': U-Net fields, 'schedule': schedule fields, 'image_shape': [H, W, C]}``,
        what `unet.make` and `schedule_lib.make` rebuild it from (saved beside the parameters).
    """

    module: Any
    params: Any
    schedule: schedule_lib.Schedule
    spec: dict


def build(spec):
    """(module, schedule) of a `ScoreModel` spec, checked."""
    module = unet.make(**dict(spec.get("model", {})))
    schedule = schedule_lib.make(**dict(spec.get("schedule", {})))
    unet.check_image_shape(module, tuple(spec["image_shape"]))
    return module, schedule


def init_params(module, key, image_shape):
    x = jnp.zeros((1, *image_shape), jnp.float32)
    return module.init(key, x, jnp.zeros((1,), jnp.float32))["params"]


def param_shapes(module, image_shape):
    """``{'a/b/c': shape}`` of the U-Net's parameters for images of `image_shape`."""
    shapes = jax.eval_shape(lambda: init_params(module, jax.random.key(0), tuple(image_shape)))
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
    }


def loss_fn(params, images, key, *, apply_fn, schedule, train=True):
    """DDPM's ε-prediction MSE on float images [B, H, W, C] in [0, 1] (a scalar)."""
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    b = images.shape[0]
    t = jax.random.randint(t_key, (b,), 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, images.shape, images.dtype)
    x_t = schedule_lib.q_sample(schedule, 2.0 * images - 1.0, t, noise)
    eps = apply_fn(
        {"params": params}, x_t, t.astype(jnp.float32), train=train, rngs={"dropout": dropout_key}
    )
    return jnp.mean((eps - noise) ** 2)


@flax.struct.dataclass
class ScoreTrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def make_optimizer(*, learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0):
    """score_sde's optimizer: gradients clipped to `grad_clip`, Adam at a rate that rises
    linearly over `warmup_steps`."""
    lr = learning_rate
    if warmup_steps:
        lr = lambda step: learning_rate * jnp.minimum(1.0, (step + 1) / warmup_steps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), optax.adam(lr))


def train_step(state, images, key, *, apply_fn, schedule, tx, ema_decay, flip=True):
    """One step of the ε loss on a batch of float images; returns (state, {'train/loss'})."""
    flip_key, loss_key = jax.random.split(key)
    images = sharding.batch(data.augment(flip_key, images, flip=flip))
    loss, grads = jax.value_and_grad(loss_fn)(
        state.params, images, loss_key, apply_fn=apply_fn, schedule=schedule
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema_params, params)
    new = ScoreTrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
    return new, {"train/loss": loss}


def _optimizer(recipe):
    return make_optimizer(
        learning_rate=recipe["learning_rate"],
        warmup_steps=recipe["warmup_steps"],
        grad_clip=recipe["grad_clip"],
    )


@functools.lru_cache(maxsize=8)
def _compiled_step(spec_json, recipe_json, n):
    """The jitted ``(state, images [N, ...], key) -> (state, metrics)`` of one model, recipe and
    dataset size, built once per process (a resumed or repeated training compiles nothing)."""
    spec, recipe = json.loads(spec_json), json.loads(recipe_json)
    module, sched = build(spec)
    tx = _optimizer(recipe)
    batch_size = recipe["batch_size"]
    steps_per_epoch = n // batch_size

    def step_fn(state, x_all, key):
        step_key = jax.random.fold_in(jax.random.fold_in(key, 2), state.step)
        epoch, i = jnp.divmod(state.step, steps_per_epoch)
        idx = data.epoch_batches(
            jax.random.fold_in(jax.random.fold_in(key, 1), epoch), n, batch_size
        )
        idx = idx[i]
        return train_step(
            state,
            x_all[idx],
            step_key,
            apply_fn=module.apply,
            schedule=sched,
            tx=tx,
            ema_decay=recipe["ema_decay"],
            flip=recipe["flip"],
        )

    return jax.jit(step_fn, donate_argnums=0)


def train_score_model(
    images,
    *,
    key,
    num_steps,
    model=None,
    schedule=None,
    batch_size=128,
    learning_rate=2e-4,
    warmup_steps=5000,
    grad_clip=1.0,
    ema_decay=0.9999,
    flip=True,
    ckpt_dir=None,
    checkpoint_every=1000,
    log_every=100,
    mesh=None,
    progress=True,
):
    """Trains a score model on `images` and returns ``(ScoreModel, history)``.

    Args:
      images: uint8 images or floats in [0, 1], [N, H, W, C] (labels are not used).
      key: PRNG key: the initialisation from ``fold_in(key, 0)``, epoch e's order from
        ``fold_in(fold_in(key, 1), e)``, step s's flips, timesteps and noise from
        ``fold_in(fold_in(key, 2), s)``, so a resumed run takes the same steps.
      num_steps: optimizer steps.
      model: fields of `unet.UNet` (default: score_sde's CIFAR-10 DDPM).
      schedule: fields of `schedule_lib.make` (default: linear, 1,000 steps).
      batch_size, learning_rate, warmup_steps, grad_clip, ema_decay, flip: the recipe
        (score_sde: 128, 2e-4, 5000, 1.0, 0.9999, True).
      ckpt_dir: if given, the state and history are saved every `checkpoint_every` steps under
        ``ckpt_dir/<content key>`` (of the model, schedule, recipe, the images' sha256 and the
        key) and a rerun resumes there.
      log_every: steps per entry of ``history['train/loss']`` (their mean).
      mesh: the `Mesh` the batch is split over (default: every device).

    Returns:
      The `ScoreModel` with the EMA parameters, and ``{'train/loss': [...], 'step': [...],
      'wall_time_s': seconds of this call}``.
    """
    t0 = time.time()
    x = data.as_float_images(np.asarray(images), what="train_score_model: images")
    n, image_shape = x.shape[0], tuple(x.shape[1:])
    spec = {
        "model": dict(model or {}),
        "schedule": dict(schedule or {}),
        "image_shape": list(image_shape),
    }
    module, sched = build(spec)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"train_score_model: num_steps={num_steps!r} must be a positive integer.")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"train_score_model: ema_decay={ema_decay!r} must lie in [0, 1).")
    batch_size = min(batch_size, n)
    recipe = dict(
        num_steps=num_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
        ema_decay=ema_decay,
        flip=flip,
    )
    mesh = mesh or sharding.data_mesh()
    tx = _optimizer(recipe)
    with jax.set_mesh(mesh):
        rep = sharding.replicated(mesh)
        x_dev = jax.device_put(x, rep)

        def init(k):
            params = init_params(module, k, image_shape)
            return ScoreTrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                ema_params=jax.tree.map(jnp.copy, params),
                opt_state=tx.init(params),
            )

        state = jax.jit(init, out_shardings=rep)(jax.random.fold_in(key, 0))
        history = {"train/loss": [], "step": []}
        manager = None
        if ckpt_dir:
            record = {
                "kind": "score_model",
                "version": ARTIFACT_VERSION,
                "spec": spec,
                "recipe": recipe,
                "data": array_digest(x),
                "key": key,
            }
            manager = checkpointing.Manager(keyed_dir(ckpt_dir, record), record=record)
            if manager.latest_step() is not None:
                state, history, _ = manager.restore(state)
                state = jax.device_put(state, rep)
                say(f"score model: resumed from step {int(state.step)} ({manager.directory})")
        compiled = _compiled_step(json.dumps(spec, sort_keys=True), json.dumps(recipe), n)
        start = int(state.step)
        bar = progress_bar(total=num_steps, initial=start, desc="score model", disable=not progress)
        losses = []
        for s in range(start, num_steps):
            state, metrics = compiled(state, x_dev, key)
            losses.append(metrics["train/loss"])
            bar.update(1)
            done = s + 1
            if done % log_every == 0 or done == num_steps:
                history["train/loss"].append(float(np.mean(jax.device_get(losses))))
                history["step"].append(done)
                bar.set_postfix(loss=f"{history['train/loss'][-1]:.4f}")
                losses = []
            if manager is not None and (done % checkpoint_every == 0 or done == num_steps):
                manager.save(done, state, history)
        bar.close()
        if manager is not None:
            manager.close()
    history["wall_time_s"] = time.time() - t0
    return ScoreModel(module, jax.device_get(state.ema_params), sched, spec), history


__all__ = [
    "ScoreModel",
    "ScoreTrainState",
    "build",
    "init_params",
    "loss_fn",
    "make_optimizer",
    "param_shapes",
    "train_score_model",
    "train_step",
]
