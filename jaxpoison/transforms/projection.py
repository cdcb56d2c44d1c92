"""Orthogonal projection (Sandoval-Segura, Geiping, Goldstein, NeurIPS 2023): a linear model
trained on the poisoned images finds the directions a linearly separable shortcut lives in;
projecting them out of every training image removes the shortcut.

1. A bias-free linear classifier W [d, K] on the flattened training images, trained with
   full-pass mini-batch SGD as the reference (``epochs`` 20, learning rate 0.1 divided by 10 at
   50 % and 75 % of training, batches of 1,024 in the data's order, cross-entropy). It starts
   from W = 0 (the problem is convex; the reference starts from PyTorch's random init).
2. Q, an orthonormal basis of W's normalised columns (QR), and every training image becomes
   x - Q Qᵀ x. Values are not clipped back to [0, 1], as in the reference; test images are
   left as they are.

References:
  Sandoval-Segura, Geiping, Goldstein. "What Can We Learn from Unlearnable Datasets?"
  NeurIPS 2023 (reference code: psandovalsegura/learn-from-unlearnable).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxpoison import losses


def fit_linear(images, labels, *, num_classes, epochs=20, learning_rate=0.1, batch_size=1024):
    """The bias-free linear classifier W [d, K] of step 1 (a pure, jit-able function)."""
    n = images.shape[0]
    x = images.reshape(n, -1)
    steps = -(-n // batch_size)
    pad = steps * batch_size - n
    xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(steps, batch_size, -1)
    yb = jnp.pad(labels, (0, pad)).reshape(steps, batch_size)
    valid = (jnp.arange(steps * batch_size) < n).reshape(steps, batch_size).astype(x.dtype)
    milestones = jnp.asarray([int(epochs * 0.5), int(epochs * 0.75)])

    def loss(w, xs, ys, mask):
        ce = losses.cross_entropy(xs @ w, ys)
        return jnp.sum(ce * mask) / jnp.sum(mask)

    def epoch(w, e):
        lr = learning_rate * 0.1 ** jnp.sum(e >= milestones)

        def step(w, batch):
            return w - lr * jax.grad(loss)(w, *batch), None

        return jax.lax.scan(step, w, (xb, yb, valid))[0], None

    w0 = jnp.zeros((x.shape[1], num_classes), x.dtype)
    return jax.lax.scan(epoch, w0, jnp.arange(epochs))[0]


def project_out(images, w):
    """`images` with the span of W's columns removed: x - Q Qᵀ x, Q orthonormal (QR)."""
    q, _ = jnp.linalg.qr(w / jnp.linalg.norm(w, axis=0, keepdims=True).clip(1e-12))
    x = images.reshape(images.shape[0], -1)
    return (x - (x @ q) @ q.T).reshape(images.shape)


def orthogonal_projection(*, num_classes, epochs=20, learning_rate=0.1, batch_size=1024):
    """The dataset-stage transform: fit W on the training set, project its directions out.

    Args:
      num_classes: K (the trainer passes it).
      epochs, learning_rate, batch_size: the linear model's SGD (reference: 20, 0.1, 1024).
    """
    for field, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"orthogonal_projection: {field}={value!r} must be a positive integer."
            )
    if (
        not isinstance(learning_rate, (int, float))
        or not math.isfinite(learning_rate)
        or learning_rate <= 0
    ):
        raise ValueError(
            f"orthogonal_projection: learning_rate={learning_rate!r} must be a positive number."
        )

    def fn(key, images, labels):
        del key
        w = fit_linear(
            images,
            labels,
            num_classes=num_classes,
            epochs=epochs,
            learning_rate=learning_rate,
            batch_size=min(batch_size, images.shape[0]),
        )
        return project_out(images, w)

    return fn
