"""Per-example losses on logits. Every function returns shape [B]; reduce where you use it."""

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels):
    """Softmax cross-entropy to integer labels, per example."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def margin(logits, labels):
    """Carlini-Wagner margin: max_{j != y} z_j - z_y (positive when misclassified)."""
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
    other = jnp.max(jnp.where(jax.nn.one_hot(labels, logits.shape[-1]) > 0, -jnp.inf, logits), 1)
    return other - true


def kl_divergence(p_logits, q_logits):
    """KL(p || q) between the softmax distributions of two logit arrays, per example."""
    log_p = jax.nn.log_softmax(p_logits)
    log_q = jax.nn.log_softmax(q_logits)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def accuracy(logits, labels):
    """1.0 where the argmax is the label, else 0.0, per example."""
    return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


LOSSES = {"cross_entropy": cross_entropy, "margin": margin}
