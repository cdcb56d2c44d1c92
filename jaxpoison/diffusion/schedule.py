"""Variance-preserving noise schedules: q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I).

Timesteps are integers t = 0 .. T-1 (DDPM's 1 .. T shifted by one, as score_sde and the
reference DDPM code index them): ᾱ_t = prod_{s <= t} (1 - β_s), so x_0 itself is "before"
step 0. The score model is conditioned on t as a number (score_sde's discrete VP models take
``t * (N - 1)``, the same integer).

* ``linear``: β_t linear from ``beta_start`` 1e-4 to ``beta_end`` 0.02 over T = 1,000 steps
  (Ho et al. 2020; score_sde's discrete VP SDE with β_min 0.1, β_max 20 gives the same values).
* ``cosine``: ᾱ(t) = cos²(((t/T) + s) / (1 + s) · π/2) / ᾱ(0), s = 0.008, β clipped at 0.999
  (Nichol & Dhariwal 2021).

References:
  Ho, Jain, Abbeel. "Denoising Diffusion Probabilistic Models." NeurIPS 2020.
  Nichol, Dhariwal. "Improved Denoising Diffusion Probabilistic Models." ICML 2021.
  Song et al. "Score-Based Generative Modeling through Stochastic Differential Equations."
  ICLR 2021 (yang-song/score_sde: ``sde_lib.VPSDE``).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "cosine")


@flax.struct.dataclass
class Schedule:
    """β_t and ᾱ_t for t = 0 .. T-1 (float32 arrays [T])."""

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_timesteps(self):
        return self.betas.shape[0]

    def marginal(self, t):
        """(mean scale sqrt(ᾱ_t), std sqrt(1 - ᾱ_t)) of q(x_t | x_0) at integer timesteps `t`."""
        abar = self.alphas_cumprod[t]
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def make(name="linear", *, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, cosine_s=0.008):
    """The `Schedule` called `name` (one of `SCHEDULES`) over `num_timesteps` steps.

    Raises:
      ValueError: an unknown name, a non-positive step count, or β outside (0, 1).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is unknown; use one of {SCHEDULES}.")
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(
            f"schedule: num_timesteps={num_timesteps!r} must be an integer >= 2 (DDPM: 1000)."
        )
    if name == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"schedule: beta_start={beta_start}, beta_end={beta_end} must satisfy "
                "0 < beta_start <= beta_end < 1 (DDPM: 1e-4, 0.02)."
            )
        betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    else:
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        f = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        abar = f / f[0]
        betas = np.clip(1.0 - abar[1:] / abar[:-1], 0.0, 0.999)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(
        betas=jnp.asarray(betas, jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
    )


def q_sample(schedule, x0, t, noise):
    """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, with `t` an integer per example ([B])."""
    mean, std = schedule.marginal(t)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return mean.reshape(shape) * x0 + std.reshape(shape) * noise


__all__ = ["SCHEDULES", "Schedule", "make", "q_sample"]
