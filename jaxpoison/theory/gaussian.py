r"""The mixture-Gaussian model of Tao et al. (2021), its delusive distributions and their
classifiers, in closed form and by Monte Carlo.

The clean distribution D: y uniform in {-1, +1}, x ~ N(y μ, σ² I) with μ = (1, η, ..., η) in
R^{d+1}: one *robust* feature of mean 1 and d *non-robust* features of mean η (small, but many).
A delusive adversary with ℓ∞ budget 2η moves every non-robust feature of every training example
by ±2η y, giving two poisoned training distributions:

- D̂1 (``shift="flip"``): μ1 = (1, -η, ..., -η): the non-robust features now point the wrong way;
- D̂2 (``shift="amplify"``): μ2 = (1, 3η, ..., 3η): the non-robust features are exaggerated.

For N(±m, σ² I) with equal priors the Bayes-optimal classifier is linear, ``sign(m · x)``, and the
optimal linear ℓ∞-robust classifier at radius ε is ``sign(s · x)`` with s the soft-thresholding of
m at ε (``s_i = sign(m_i) max(|m_i| - ε, 0)``): for any w,
``w·m - ε||w||_1 <= |w|·s <= ||w||_2 ||s||_2`` (Cauchy-Schwarz), with equality at w = s.
A linear classifier ``sign(w · x + b)`` has natural accuracy on D

.. math::
    \tfrac12 \Phi\big((w^\top\mu + b)/(\sigma\|w\|_2)\big)
    + \tfrac12 \Phi\big((w^\top\mu - b)/(\sigma\|w\|_2)\big).

The five models of the paper's Figure 2: standard training on D, D̂1, D̂2 (Bayes-optimal for
each) and adversarial training (ε = 2η) on D̂1, D̂2 (optimal linear robust). Theorem 2 orders
the standard ones, R(f_D) < R(f_D̂2) < R(f_D̂1); Theorem 3 says adversarial training on either
poisoned distribution has lower natural risk on D than standard training on it.

Everything here is numpy float64 (closed forms) or jax (sampling); no scipy.

References:
  Tao, Feng, Yi, Huang & Chen 2021, "Better Safe Than Sorry: Preventing Delusive Adversaries
  with Adversarial Training", NeurIPS (Section 4, Theorems 2-3, Figure 2).
  Tsipras et al. 2019, "Robustness May Be at Odds with Accuracy", ICLR (the robust/non-robust
  feature model).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Mean of the non-robust features, in units of η, for each training distribution.
SHIFTS = {"clean": 1.0, "flip": -1.0, "amplify": 3.0}

# The five models of Figure 2: (label, training distribution, adversarially trained?).
MODELS = (
    ("ST on D", "clean", False),
    ("ST on D1 (flip)", "flip", False),
    ("ST on D2 (amplify)", "amplify", False),
    ("AT on D1 (flip)", "flip", True),
    ("AT on D2 (amplify)", "amplify", True),
)

_phi = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2.0)), otypes=[np.float64])


def normal_cdf(z):
    """Standard normal CDF Φ, float64."""
    return _phi(np.asarray(z, np.float64))


def mean(d, eta, shift="clean"):
    """μ of the clean (``"clean"``) or a delusive (``"flip"``, ``"amplify"``) distribution."""
    if shift not in SHIFTS:
        raise ValueError(f"shift={shift!r}; use one of {sorted(SHIFTS)}.")
    return np.concatenate([[1.0], np.full(int(d), SHIFTS[shift] * eta)])


def sample(key, num, mu, sigma):
    """``num`` draws of (x, y): y uniform in {-1, +1}, x ~ N(y mu, sigma² I); float32 x."""
    ykey, xkey = jax.random.split(key)
    y = jnp.where(jax.random.bernoulli(ykey, 0.5, (num,)), 1, -1)
    mu = jnp.asarray(mu, jnp.float32)
    x = y[:, None] * mu + sigma * jax.random.normal(xkey, (num, mu.shape[0]))
    return x, y


def bayes_classifier(mu):
    """Weights of the Bayes-optimal classifier ``sign(mu · x)`` for N(±mu, σ² I)."""
    return np.asarray(mu, np.float64)


def robust_linear_classifier(mu, epsilon):
    """The optimal linear ℓ∞-robust classifier at radius `epsilon`: mu soft-thresholded."""
    mu = np.asarray(mu, np.float64)
    return np.sign(mu) * np.maximum(np.abs(mu) - epsilon, 0.0)


def natural_risk(w, mu, sigma, b=0.0):
    """Closed-form error of ``sign(w · x + b)`` on N(y mu, σ² I), y uniform in {-1, +1}.

    Computed as Φ of negative margins (``erfc``), so risks down to ~1e-300 keep their precision
    where ``1 - accuracy`` would round to 0.
    """
    w = np.asarray(w, np.float64)
    scale = sigma * np.linalg.norm(w)
    m = float(w @ np.asarray(mu, np.float64))
    return float(0.5 * (normal_cdf(-(m + b) / scale) + normal_cdf(-(m - b) / scale)))


def natural_accuracy(w, mu, sigma, b=0.0):
    """Closed-form accuracy of ``sign(w · x + b)`` on N(y mu, σ² I): ``1 - natural_risk``."""
    return 1.0 - natural_risk(w, mu, sigma, b)


def robust_accuracy(w, mu, sigma, epsilon):
    """Closed-form ℓ∞ robust accuracy of ``sign(w · x)`` at radius `epsilon`."""
    w = np.asarray(w, np.float64)
    m = float(w @ np.asarray(mu, np.float64)) - epsilon * np.abs(w).sum()
    return float(normal_cdf(m / (sigma * np.linalg.norm(w))))


def classifier(d, eta, shift, *, adversarial, epsilon=None):
    """Weights of one of the five models: Bayes-optimal, or optimal linear robust at ε (2η)."""
    mu = mean(d, eta, shift)
    if adversarial:
        return robust_linear_classifier(mu, 2 * eta if epsilon is None else epsilon)
    return bayes_classifier(mu)


def structured_classifier(eta, shift, *, adversarial, epsilon=None):
    """``(a, c)`` with the model's weights ``w = (a, c, ..., c)`` (every model has this form)."""
    m = SHIFTS[shift] * eta
    if not adversarial:
        return 1.0, m
    eps = 2 * eta if epsilon is None else epsilon
    return max(1.0 - eps, 0.0), math.copysign(max(abs(m) - eps, 0.0), m)


def figure2(dims, *, eta=0.01, sigma=1.0, epsilon=None, metric="accuracy"):
    """Closed-form natural accuracy (or risk) on D of the five models, for each d in `dims`.

    With ``w = (a, c, ..., c)`` and μ = (1, η, ..., η): ``w·μ = a + c d η`` and
    ``||w||² = a² + d c²``, so no d-dimensional vector is built (d = 10^6 costs nothing).

    Args:
      dims: numbers d of non-robust features.
      eta: η, the non-robust features' mean.
      sigma: σ, the noise standard deviation.
      epsilon: the adversarial-training radius (default 2η, the delusive budget).
      metric: ``"accuracy"`` or ``"risk"`` (the risk keeps its precision when it is tiny).

    Returns:
      ``{label: float64 array over dims}`` with the labels of `MODELS`.
    """
    if metric not in ("accuracy", "risk"):
        raise ValueError(f"metric={metric!r}; use 'accuracy' or 'risk'.")
    d = np.asarray(dims, np.float64)
    out = {}
    for label, shift, adversarial in MODELS:
        a, c = structured_classifier(eta, shift, adversarial=adversarial, epsilon=epsilon)
        norm = np.sqrt(a * a + d * c * c)
        margin = np.where(norm > 0, (a + c * d * eta) / (sigma * np.maximum(norm, 1e-300)), 0.0)
        risk = normal_cdf(-margin)
        out[label] = risk if metric == "risk" else 1.0 - risk
    return out


@functools.partial(jax.jit, static_argnums=(4,))
def _count_correct(key, w, b, mu, num, sigma):
    x, y = sample(key, num, mu, sigma)
    return jnp.sum(jnp.sign(x @ w + b) == y)


def monte_carlo_accuracy(key, w, mu, sigma, num, *, b=0.0, chunk=8000):
    """Monte-Carlo accuracy of ``sign(w · x + b)`` on N(y mu, σ² I) from full (d+1)-dim draws.

    Draws ``ceil(num / chunk)`` chunks of ``min(num, chunk)`` examples (one compiled program).

    Returns:
      ``(accuracy, standard_error)``, the standard error ``sqrt(a (1 - a) / n)`` of the n draws.
    """
    chunk = min(chunk, num)
    w = jnp.asarray(w, jnp.float32)
    mu = jnp.asarray(mu, jnp.float32)
    keys = jax.random.split(key, -(-num // chunk))
    correct = sum(int(_count_correct(k, w, b, mu, chunk, sigma)) for k in keys)
    done = len(keys) * chunk
    acc = correct / done
    return acc, math.sqrt(max(acc * (1 - acc), 1e-12) / done)


def monte_carlo_accuracy_structured(key, w, d, eta, sigma, num):
    """Monte-Carlo accuracy on D of ``sign(a x_1 + c sum_{i>1} x_i)`` for ``w = (a, c, ..., c)``.

    All five models have this form, and ``sum_{i>1} x_i ~ N(y d η, d σ²)`` exactly, so two
    draws per example replace d + 1: this makes Monte Carlo cheap at d = 10^5.

    Returns:
      ``(accuracy, standard_error)``.
    """
    w = np.asarray(w, np.float64)
    a, c = float(w[0]), float(w[1]) if len(w) > 1 else 0.0
    if len(w) > 1 and not np.allclose(w[1:], c):
        raise ValueError("monte_carlo_accuracy_structured needs w = (a, c, ..., c).")
    ykey, k1, k2 = jax.random.split(key, 3)
    y = np.where(np.asarray(jax.random.bernoulli(ykey, 0.5, (num,))), 1.0, -1.0)
    x1 = y + sigma * np.asarray(jax.random.normal(k1, (num,)), np.float64)
    s = y * d * eta + sigma * math.sqrt(d) * np.asarray(jax.random.normal(k2, (num,)), np.float64)
    acc = float(np.mean(np.sign(a * x1 + c * s) == y))
    return acc, math.sqrt(max(acc * (1 - acc), 1e-12) / num)


__all__ = [
    "MODELS",
    "SHIFTS",
    "bayes_classifier",
    "classifier",
    "figure2",
    "mean",
    "monte_carlo_accuracy",
    "monte_carlo_accuracy_structured",
    "natural_accuracy",
    "natural_risk",
    "normal_cdf",
    "robust_accuracy",
    "robust_linear_classifier",
    "sample",
    "structured_classifier",
]
