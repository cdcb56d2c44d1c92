"""Diffusion purification (DiffPure, AVATAR): noise each image to timestep t* with the forward
process, then run the reverse process back to t = 0 with the score model.

For an image x in [0, 1], x_0 = 2x - 1 and, with t_end = round(t_star T) forward steps,

    x_{t_end - 1} = sqrt(ᾱ) x_0 + sqrt(1 - ᾱ) ε,   ᾱ = ᾱ_{t_end - 1}

(AVATAR's ``a[t - 1]``), then `num_steps` reverse steps over the timesteps
τ_k = floor(linspace(t_end - 1, 0, num_steps)) (every step when ``num_steps = t_end``), from τ_k
to τ_{k+1} (ᾱ = 1 after the last), with x̂_0 = clip((x - sqrt(1 - ᾱ_τ) ε_θ) / sqrt(ᾱ_τ), -1, 1):

* ``ddpm``: ancestral sampling from the posterior q(x_prev | x_τ, x̂_0) of the (strided) chain,
  β' = 1 - ᾱ_τ / ᾱ_prev, variance β' (1 - ᾱ_prev) / (1 - ᾱ_τ), no noise on the last step; the
  discrete counterpart of the reverse VP-SDE that DiffPure and AVATAR integrate.
* ``ddim``: the deterministic DDIM step (η = 0), x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev) ε̂.

The result, (x + 1) / 2 clipped to [0, 1], replaces the image. Every example draws its noise from
``fold_in(key, index)`` (its position in `images`), so the output does not depend on the batch
size or the device count. ``t_star = 0`` returns the images unchanged.

References:
  Nie et al. "Diffusion Models for Adversarial Purification." ICML 2022 (DiffPure).
  Dolatabadi, Erfani, Leckie. "The Devil's Advocate: Shattering the Illusion of Unexploitable
  Data using Diffusion Models." SaTML 2024 (AVATAR; hmdolatabadi/AVATAR: CIFAR-10 at t* = 100
  of 1,000 steps).
  Ho et al. NeurIPS 2020 (ancestral sampling); Song, Meng, Ermon. "Denoising Diffusion Implicit
  Models." ICLR 2021 (DDIM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison import sharding

SAMPLERS = ("ddpm", "ddim")


def reverse_timesteps(t_end, num_steps):
    """(τ, τ_prev): the `num_steps` timesteps the reverse process visits from ``t_end - 1`` down
    to 0 (strictly decreasing) and the one each steps to (-1: the clean image)."""
    num_steps = min(num_steps, t_end)
    if num_steps == 1:
        tau = np.asarray([t_end - 1])
    else:
        tau = np.floor(np.linspace(t_end - 1, 0, num_steps) + 1e-9).astype(np.int32)
    prev = np.append(tau[1:], -1).astype(np.int32)
    return tau.astype(np.int32), prev


def check(*, t_star, num_steps, sampler, batch_size, num_timesteps=None):
    """Raises ValueError on a bad purification setting (one line naming it and the fix)."""
    if isinstance(t_star, bool) or not isinstance(t_star, (int, float)) or not 0 <= t_star <= 1:
        raise ValueError(
            f"t_star={t_star!r} must be a fraction of the diffusion in [0, 1] (AVATAR on "
            "CIFAR-10: 0.1, i.e. 100 of 1,000 steps)."
        )
    if num_steps is not None and (
        isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1
    ):
        raise ValueError(
            f"num_steps={num_steps!r} must be a positive integer (reverse steps), or None for "
            "every step from t_star to 0."
        )
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; use one of {SAMPLERS}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")


def purify(
    params,
    images,
    key,
    *,
    module,
    schedule,
    t_star=0.1,
    num_steps=None,
    sampler="ddpm",
    batch_size=256,
):
    """Purified images: diffused to `t_star` and denoised back by the score model.

    A pure function; jit it with the keyword arguments static except `schedule`, e.g.
    ``jax.jit(functools.partial(purify, module=m, schedule=s, t_star=0.1, num_steps=20))``.

    Args:
      params: the U-Net's parameters.
      images: float [N, H, W, C] in [0, 1].
      key: PRNG key; example i uses ``fold_in(key, i)``.
      module: the `unet.UNet`.
      schedule: the `schedule.Schedule` it was trained with.
      t_star: the fraction of the T timesteps to diffuse to (AVATAR: 0.1); 0 is the identity.
      num_steps: reverse steps (None: all ``round(t_star T)`` of them).
      sampler: ``'ddpm'`` (ancestral, stochastic) or ``'ddim'`` (deterministic given x_t*).
      batch_size: images per model call (memory), not a change in the result.

    Returns:
      Float images [N, H, W, C] in [0, 1].
    """
    check(t_star=t_star, num_steps=num_steps, sampler=sampler, batch_size=batch_size)
    t_end = int(round(t_star * schedule.num_timesteps))
    if t_end == 0:
        return images
    tau, prev = reverse_timesteps(t_end, num_steps or t_end)
    abar = schedule.alphas_cumprod
    abar_prev = jnp.where(prev >= 0, abar[jnp.maximum(prev, 0)], 1.0)
    abar_tau = abar[tau]
    last = np.arange(len(tau)) == len(tau) - 1

    def noise(keys, step, shape):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape))(keys)

    def one_batch(inputs):
        x, index = inputs
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(index)
        shape = x.shape[1:]
        x0 = 2.0 * x - 1.0
        a = abar[t_end - 1]
        x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise(keys, 0, shape)

        def step(x_t, inputs):
            k, t, a_t, a_p, is_last = inputs
            eps = module.apply(
                {"params": params}, sharding.batch(x_t), jnp.full((x_t.shape[0],), t, jnp.float32)
            )
            x0_hat = jnp.clip((x_t - jnp.sqrt(1.0 - a_t) * eps) / jnp.sqrt(a_t), -1.0, 1.0)
            if sampler == "ddim":
                eps_hat = (x_t - jnp.sqrt(a_t) * x0_hat) / jnp.sqrt(1.0 - a_t)
                return jnp.sqrt(a_p) * x0_hat + jnp.sqrt(1.0 - a_p) * eps_hat, None
            beta = 1.0 - a_t / a_p
            mean = (jnp.sqrt(a_p) * beta / (1.0 - a_t)) * x0_hat + (
                jnp.sqrt(1.0 - beta) * (1.0 - a_p) / (1.0 - a_t)
            ) * x_t
            std = jnp.sqrt(beta * (1.0 - a_p) / (1.0 - a_t))
            z = noise(keys, k + 1, shape)
            return mean + jnp.where(is_last, 0.0, std) * z, None

        steps = (jnp.arange(len(tau)), jnp.asarray(tau), abar_tau, abar_prev, jnp.asarray(last))
        x_final, _ = jax.lax.scan(step, x_t, steps)
        return jnp.clip((x_final + 1.0) / 2.0, 0.0, 1.0)

    n = images.shape[0]
    chunk = min(batch_size, n)
    pad = -n % chunk
    xb = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
    xb = xb.reshape(-1, chunk, *images.shape[1:])
    index = jnp.arange(n + pad, dtype=jnp.int32).reshape(-1, chunk)
    return jax.lax.map(one_batch, (xb, index)).reshape(-1, *images.shape[1:])[:n]


__all__ = ["SAMPLERS", "check", "purify", "reverse_timesteps"]
