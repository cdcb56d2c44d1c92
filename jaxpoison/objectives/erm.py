"""Standard training: empirical risk minimisation with cross-entropy."""

import jax.numpy as jnp

from jaxpoison import losses


def make():
    """Returns the ERM objective: mean cross-entropy of the model in training mode."""

    def objective(variables, batch, key, *, apply_fn):
        del key
        logits, model_state = apply_fn(variables, batch["image"], train=True)
        loss = jnp.mean(losses.cross_entropy(logits, batch["label"]))
        acc = jnp.mean(losses.accuracy(logits, batch["label"]))
        return loss, {"model_state": model_state, "metrics": {"loss": loss, "accuracy": acc}}

    return objective
