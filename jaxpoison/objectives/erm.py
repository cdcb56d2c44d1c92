"""Standard training: empirical risk minimisation with cross-entropy."""

import jax.numpy as jnp

from jaxpoison import losses


def make():
    """Returns the ERM objective: mean cross-entropy of the model in training mode.

    A batch mixed by `transforms.mixup` / `cutmix` carries ``batch['mix'] = {'label', 'weight'}``
    (partner label y_j, weight λ of the own label): its loss is then λ CE(f(x), y) + (1 - λ)
    CE(f(x), y_j) and its accuracy weighted the same way (APBench's ``loss_mix`` / ``acc_mix``).
    """

    def objective(variables, batch, key, *, apply_fn):
        del key
        logits, model_state = apply_fn(variables, batch["image"], train=True)
        loss = losses.cross_entropy(logits, batch["label"])
        acc = losses.accuracy(logits, batch["label"])
        if "mix" in batch:
            w, other = batch["mix"]["weight"], batch["mix"]["label"]
            loss = w * loss + (1.0 - w) * losses.cross_entropy(logits, other)
            acc = w * acc + (1.0 - w) * losses.accuracy(logits, other)
        loss, acc = jnp.mean(loss), jnp.mean(acc)
        return loss, {"model_state": model_state, "metrics": {"loss": loss, "accuracy": acc}}

    return objective
