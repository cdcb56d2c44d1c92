"""Gaussian data augmentation: the training of a randomized-smoothing base classifier.

Cross-entropy at ``x + N(0, σ² I)``, a fresh draw per step and example, not clipped to [0, 1]
(as Cohen et al. train): the base classifier f then does well on noisy inputs, which the smoothed
classifier g(x) = argmax_c P(f(x + ε) = c) needs to be accurate and to certify large ℓ2 radii
(`jaxpoison.evaluation.smoothing`). σ is the noise level of both; no threat ball is involved.
"""

import jax
import jax.numpy as jnp

from jaxpoison import losses


def make(*, sigma=0.25):
    """Returns the Gaussian-noise objective: mean CE of the model (training mode) at x + σ z.

    Args:
      sigma: the noise's standard deviation per pixel (images in [0, 1]); Cohen et al. train
        CIFAR-10 base classifiers at 0.12, 0.25, 0.5 and 1.0, and certify at the same σ.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds the noisy inputs.

    References:
      Cohen, Rosenfeld, Kolter 2019, "Certified Adversarial Robustness via Randomized
      Smoothing", ICML (Sec. 3.3: training with Gaussian data augmentation;
      github.com/locuslab/smoothing, code/train.py).
    """
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma={sigma!r} must be a positive noise level, e.g. 0.25.")

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        noisy = x + sigma * jax.random.normal(key, x.shape, x.dtype)
        logits, model_state = apply_fn(variables, noisy, train=True)
        loss = jnp.mean(losses.cross_entropy(logits, y))
        metrics = {"loss": loss, "accuracy": jnp.mean(losses.accuracy(logits, y))}
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": noisy}

    return objective
