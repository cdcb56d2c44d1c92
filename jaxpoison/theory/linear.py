"""Linear classifiers trained on mixture-Gaussian samples with the library's own objectives.

The library's threat models keep ``x + delta`` in the image box [0, 1], so the Gaussian samples
are mapped into it affinely, ``u = 1/2 + x / scale`` with `scale` larger than twice the largest
``|x| + ε``: no sample (or perturbed sample) touches the box, and an ℓ∞ radius ε on x is the
radius ``ε / scale`` on u. The model maps u back (``x = (u - 1/2) scale``) before its dense
layer, so its parameters live in the original coordinates and train at their natural scale.
A two-logit softmax cross-entropy on labels (y + 1) / 2 is logistic regression on the logit
difference, whose population minimiser on N(±μ, σ² I) points along μ (ERM) and, for the
adversarial logistic loss, along the soft-thresholded μ (it maximises the same robust margin
ratio as the 0-1 robust risk).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison import models, objectives


class Linear(nn.Module):
    """Two logits, affine in ``x = (u - 1/2) * scale``; `train` is accepted and ignored."""

    scale: float = 1.0
    num_classes: int = 2

    @nn.compact
    def __call__(self, u, train=False):
        del train
        return nn.Dense(self.num_classes)((u - 0.5) * self.scale)


def box_scale(x, epsilon=0.0):
    """A scale that maps every ``x ± epsilon`` strictly inside (0, 1) via 1/2 + x / scale."""
    return float(2.2 * (np.max(np.abs(np.asarray(x))) + epsilon))


def make_objective(name, *, epsilon, scale, num_steps=1):
    """`objectives.make(name)` with the ℓ∞ radius `epsilon` of x expressed on u = 1/2 + x/scale.

    For a linear model the input gradient's sign is the same everywhere, so one step of length
    2.5 ε from any start inside the ball lands on the exact worst case: `num_steps` = 1 suffices
    and PGD starts at zero (a random start would change nothing but cost random numbers).
    """
    if name == "erm":
        return objectives.make("erm")
    eps = epsilon / scale
    kwargs = dict(epsilon=eps, num_steps=num_steps, step_size=2.5 * eps)
    if name == "pgd_at":
        kwargs["random_start"] = False
    return objectives.make(name, **kwargs)


def make_fitter(objective, *, scale, num_steps=500, learning_rate=0.05):
    """A jitted ``fit(x, y, key) -> (w, b)``: full-batch Adam on `objective`, then the affine
    classifier ``sign(w · x + b)`` in the original coordinates (float64 numpy).

    Args:
      objective: an objective of `jaxpoison.objectives`.
      scale: the box scale of the data (see `box_scale`).
      num_steps: Adam steps.
      learning_rate: Adam learning rate.
    """
    module = Linear(scale=scale)
    apply_fn = models.make_apply_fn(module)
    tx = optax.adam(learning_rate)

    @jax.jit
    def fit(x, y, key):
        u = 0.5 + x / scale
        batch = {"image": u, "label": ((y + 1) // 2).astype(jnp.int32), "index": jnp.arange(len(y))}
        init_key, key = jax.random.split(key)
        params = module.init(init_key, u[:1])["params"]

        def step(carry, i):
            params, opt_state = carry
            loss_fn = lambda p: objective(
                {"params": p}, batch, jax.random.fold_in(key, i), apply_fn=apply_fn
            )[0]
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, _), history = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(num_steps))
        kernel, bias = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
        return kernel[:, 1] - kernel[:, 0], bias[1] - bias[0], history

    def run(x, y, key):
        w, b, history = fit(x, y, key)
        return np.asarray(w, np.float64), float(b), np.asarray(history)

    return run


def cosine(a, b):
    """Cosine similarity of two weight vectors."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


__all__ = ["Linear", "box_scale", "cosine", "make_fitter", "make_objective"]
