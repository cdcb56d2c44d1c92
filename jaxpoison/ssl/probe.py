"""Linear probes: multinomial logistic regression on the frozen features of a trained model.

`extract` computes a model's penultimate features over a dataset (eval mode, batched under
`lax.map`); `fit` trains ``softmax(W^T standardize(f) + b)`` on them by full-batch Adam on the mean
cross-entropy plus ``weight_decay / 2 * ||W||^2``, inside one `lax.scan`. The problem is convex,
so a few hundred full-batch steps reach its optimum closely; nothing here is stochastic.
Standardization uses the training features' mean and standard deviation (features that never
vary, e.g. dead ReLUs, are left unscaled).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxpoison import losses


@flax.struct.dataclass
class LinearProbe:
    """``logits = ((features - mean) / scale) @ weights + bias``."""

    weights: jax.Array  # [D, K]
    bias: jax.Array  # [K]
    mean: jax.Array  # [D]
    scale: jax.Array  # [D]


def extract(features_fn, variables, x, *, batch_size):
    """``features_fn(variables, x)`` over a whole dataset in batches: [N, ...] -> [N, D].

    The last batch is zero-padded and the padding dropped, so any N works with one compiled
    batch shape.
    """
    n = x.shape[0]
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    xb = xb.reshape(num_batches, batch_size, *x.shape[1:])
    feats = jax.lax.map(lambda b: features_fn(variables, b), xb)
    return feats.reshape(num_batches * batch_size, -1)[:n]


def logits(probe, features):
    """The probe's logits [N, K] on features [N, D]."""
    return ((features - probe.mean) / probe.scale) @ probe.weights + probe.bias


def accuracy(probe, features, labels):
    """Fraction of `labels` the probe predicts (argmax of its logits)."""
    return jnp.mean(losses.accuracy(logits(probe, features), labels))


def fit(features, labels, *, num_classes, num_steps=500, learning_rate=0.05, weight_decay=5e-4):
    """Fits a multinomial logistic regression on frozen features.

    Args:
      features: [N, D] float features of the training examples.
      labels: [N] int labels in [0, num_classes).
      num_classes: K.
      num_steps: full-batch Adam steps.
      learning_rate: Adam's step size (the features are standardized, so one value fits all
        models).
      weight_decay: L2 penalty on the weights (not the bias).

    Returns:
      ``(probe, loss_history [num_steps])``: the fitted `LinearProbe` and the penalised training
      loss before each step.
    """
    features = features.astype(jnp.float32)
    mean = jnp.mean(features, axis=0)
    std = jnp.std(features, axis=0)
    scale = jnp.where(std > 1e-6, std, 1.0)
    dim = features.shape[1]
    params = {"weights": jnp.zeros((dim, num_classes)), "bias": jnp.zeros((num_classes,))}
    tx = optax.adam(learning_rate)

    def loss_fn(p):
        probe = LinearProbe(p["weights"], p["bias"], mean, scale)
        ce = jnp.mean(losses.cross_entropy(logits(probe, features), labels))
        return ce + 0.5 * weight_decay * jnp.sum(jnp.square(p["weights"]))

    def step(carry, _):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    (params, _), history = jax.lax.scan(step, (params, tx.init(params)), length=num_steps)
    return LinearProbe(params["weights"], params["bias"], mean, scale), history


__all__ = ["LinearProbe", "accuracy", "extract", "fit", "logits"]
