r"""Randomized smoothing: the smoothed classifier's prediction and its certified ℓ2 radius.

A base classifier f (trained with Gaussian noise, objective ``gaussian_noise``) defines the
smoothed classifier

.. math::
    g(x) = \arg\max_c P(f(x + \varepsilon) = c), \qquad \varepsilon \sim N(0, \sigma^2 I).

If the top class c_A has probability at least :math:`\underline{p_A} > 1/2`, g predicts c_A on the
whole ℓ2 ball of radius :math:`R = \sigma\, \Phi^{-1}(\underline{p_A})` around x (Cohen et al.,
Theorem 1). The probabilities are estimated by Monte Carlo, as the paper's algorithms do:

* `certify` (CERTIFY): the class with most votes among ``n0`` noisy copies is c_A; among ``n``
  fresh copies c_A gets n_A votes; :math:`\underline{p_A}` is the one-sided (1 - α)
  Clopper–Pearson lower bound of n_A / n (a beta quantile, `lower_confidence_bound`); below 1/2
  it abstains (-1, radius 0), else returns c_A and R. With probability at least 1 - α the radius
  is not too large.
* `predict` (PREDICT): the top two classes among ``n`` copies; abstains unless a two-sided
  binomial test rejects their tie at level α (then g(x) is the top one with probability at least
  1 - α).

The noisy copies are counted on the devices (`noise_counts`, one jitted program, copies in
batches of ``batch_size``); the confidence bounds and tests run on the host with scipy. The
``smoothing`` evaluator certifies every ``skip``-th test example (the paper: every 20th, 500
CIFAR-10 images) and reports the certified accuracy at each radius r: the fraction of examples
certified with the correct class and a radius of at least r (``acc/certified@r``; at r = 0 the
smoothed classifier's accuracy with abstentions counted as errors), and ``abstain``.

References:
  Cohen, Rosenfeld, Kolter 2019, "Certified Adversarial Robustness via Randomized Smoothing",
  ICML (Algorithms CERTIFY and PREDICT; github.com/locuslab/smoothing, code/core.py and
  code/analyze.py: n0 = 100, n = 100,000, α = 0.001).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jaxpoison import sharding
from jaxpoison.evaluation.risk import Evaluator, variables_of
from jaxpoison.train_state import over_seeds

ABSTAIN = -1


def noise_counts(apply_fn, variables, x, *, key, sigma, num, num_classes, batch_size=1000):
    """Votes of the base classifier on `num` Gaussian copies of each example.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)``; run in eval mode.
      variables: the model's variables.
      x: images [B, H, W, C] (any range: the noise is not clipped, as in the paper).
      key: PRNG key; example i's copies are drawn from ``fold_in(key, i)``.
      sigma: the noise's standard deviation.
      num: copies per example.
      num_classes: K.
      batch_size: copies per forward pass (the last pass counts only the copies up to `num`).

    Returns:
      int32 [B, K]: how many copies of each example f assigns to each class (rows sum to `num`).
    """
    batch_size = min(batch_size, num)
    num_batches = -(-num // batch_size)

    def one_example(inputs):
        i, image = inputs
        example_key = jax.random.fold_in(key, i)

        def body(counts, j):
            noise = jax.random.normal(
                jax.random.fold_in(example_key, j), (batch_size, *image.shape), image.dtype
            )
            noisy = sharding.batch(image[None] + sigma * noise)
            pred = jnp.argmax(apply_fn(variables, noisy, train=False)[0], -1)
            valid = j * batch_size + jnp.arange(batch_size) < num
            votes = jax.nn.one_hot(pred, num_classes, dtype=jnp.int32) * valid[:, None]
            return counts + jnp.sum(votes, axis=0), None

        counts = jnp.zeros((num_classes,), jnp.int32)
        return jax.lax.scan(body, counts, jnp.arange(num_batches))[0]

    return jax.lax.map(one_example, (jnp.arange(x.shape[0]), x))


def lower_confidence_bound(n_a, n, alpha):
    """One-sided (1 - α) Clopper–Pearson lower bound of a binomial proportion n_a / n:
    the α quantile of Beta(n_a, n - n_a + 1), 0 where n_a = 0 (statsmodels' ``proportion_confint``
    with ``method='beta'`` at 2α, as the reference calls it). Works elementwise on arrays."""
    n_a = np.asarray(n_a)
    bound = stats.beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1)
    return np.where(n_a > 0, bound, 0.0)


def certified_radius(counts_selection, counts_estimation, *, sigma, alpha):
    """CERTIFY from vote counts: (class [B], radius [B]), class -1 and radius 0 where
    :math:`\\underline{p_A} < 1/2`.

    Args:
      counts_selection: [B, K] votes on n0 copies (pick c_A).
      counts_estimation: [B, K] votes on n fresh copies (estimate p_A).
      sigma: the noise level; alpha: the failure probability.
    """
    counts_selection, counts_estimation = (
        np.asarray(counts_selection),
        np.asarray(counts_estimation),
    )
    c_a = np.argmax(counts_selection, axis=-1)
    n = counts_estimation.sum(axis=-1)
    n_a = np.take_along_axis(counts_estimation, c_a[:, None], axis=-1)[:, 0]
    p_a = lower_confidence_bound(n_a, n, alpha)
    certified = p_a >= 0.5
    radius = np.where(certified, sigma * stats.norm.ppf(np.where(certified, p_a, 0.5)), 0.0)
    return np.where(certified, c_a, ABSTAIN), radius


def predicted_class(counts, *, alpha):
    """PREDICT from vote counts [B, K]: the top class, or -1 where the two-sided binomial test of
    the top two counts (n1 vs n1 + n2, p = 1/2) does not reject at level α."""
    counts = np.asarray(counts)
    order = np.argsort(-counts, axis=-1, kind="stable")
    top, second = order[:, 0], order[:, 1]
    n1 = np.take_along_axis(counts, top[:, None], axis=-1)[:, 0]
    n2 = np.take_along_axis(counts, second[:, None], axis=-1)[:, 0]
    p_values = np.array(
        [stats.binomtest(int(a), int(a + b), 0.5).pvalue for a, b in zip(n1, n2, strict=True)]
    )
    return np.where(p_values > alpha, ABSTAIN, top)


@functools.lru_cache(maxsize=16)
def _counting(apply_fn, *, sigma, num_classes, batch_size):
    """`noise_counts` jitted once per model and setting (`num` static), for `certify`/`predict`."""

    def count(variables, x, key, num):
        return noise_counts(
            apply_fn,
            variables,
            x,
            key=key,
            sigma=sigma,
            num=num,
            num_classes=num_classes,
            batch_size=batch_size,
        )

    return jax.jit(count, static_argnames="num")


def certify(
    apply_fn,
    variables,
    x,
    *,
    key,
    sigma,
    num_classes,
    n0=100,
    n=10_000,
    alpha=0.001,
    batch_size=1000,
):
    """CERTIFY (Cohen et al., Algorithm 1 right) for a batch of examples.

    Args:
      apply_fn, variables: the base classifier (eval mode).
      x: images [B, H, W, C].
      key: PRNG key (split into the selection and the estimation draws).
      sigma: the noise level; num_classes: K.
      n0: copies that select the class; n: copies that estimate its probability (the paper:
        100 and 100,000).
      alpha: failure probability of the certificate.
      batch_size: copies per forward pass.

    Returns:
      (classes int [B], -1 = abstain; radii float [B]): each radius is, with probability at
      least 1 - α, one within which the smoothed classifier predicts the class.
    """
    count = _counting(apply_fn, sigma=sigma, num_classes=num_classes, batch_size=batch_size)
    select_key, estimate_key = jax.random.split(key)
    counts_selection = jax.device_get(count(variables, x, select_key, num=n0))
    counts_estimation = jax.device_get(count(variables, x, estimate_key, num=n))
    return certified_radius(counts_selection, counts_estimation, sigma=sigma, alpha=alpha)


def predict(
    apply_fn, variables, x, *, key, sigma, num_classes, n=10_000, alpha=0.001, batch_size=1000
):
    """PREDICT (Cohen et al., Algorithm 1 left) for a batch of examples: classes int [B], -1
    where it abstains; a returned class is g(x) with probability at least 1 - α. Arguments as
    `certify`."""
    count = _counting(apply_fn, sigma=sigma, num_classes=num_classes, batch_size=batch_size)
    return predicted_class(jax.device_get(count(variables, x, key, num=n)), alpha=alpha)


class SmoothingEvaluator(Evaluator):
    """An `Evaluator` whose jitted part counts votes; the certificates follow on the host."""

    def __init__(self, fn, finish, *, name):
        super().__init__(fn, name=name)
        self.finish = finish

    def __call__(self, states, x, y, *, key, mesh=None):
        counts = jax.device_get(super().__call__(states, x, y, key=key, mesh=mesh))
        return self.finish(counts, np.asarray(jax.device_get(y)))


def make_smoothing(
    *,
    apply_fn,
    num_classes,
    sigma=0.25,
    n0=100,
    n=10_000,
    alpha=0.001,
    radii=(0.0, 0.25, 0.5, 0.75, 1.0),
    skip=1,
    batch_size=1000,
    seed_strategy="auto",
):
    """The smoothing evaluator: certified accuracy of the smoothed classifier at `radii`, per seed.

    Args:
      apply_fn: the victim's ``apply_fn`` (the base classifier, eval mode).
      num_classes: K.
      sigma: the smoothing noise level (train the victim with ``gaussian_noise`` at the same σ).
      n0, n, alpha: CERTIFY's selection and estimation copies and failure probability (the
        paper: 100, 100,000, 0.001; n = 10,000 here keeps a CPU run short and lowers the largest
        certifiable radius to σ Φ⁻¹(0.001^(1/n)) = 3.2 σ, from 3.8 σ).
      radii: the ℓ2 radii r of ``acc/certified@r``.
      skip: certify every `skip`-th example of the dataset (the paper: 20 on CIFAR-10).
      batch_size: noisy copies per forward pass.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      An `Evaluator` returning, with a leading seed axis, ``acc/certified@r`` for each r,
      ``abstain`` (the share of certified examples where CERTIFY abstains), ``radius/mean`` (the
      mean radius of the correctly certified examples, 0 counted for the others) and ``n``.

    References:
      Cohen, Rosenfeld, Kolter 2019, "Certified Adversarial Robustness via Randomized Smoothing".
    """
    for name, value in (("n0", n0), ("n", n), ("skip", skip), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"smoothing: {name}={value!r} must be a whole number >= 1.")
    if not sigma > 0 or not 0 < alpha < 1:
        raise ValueError(
            f"smoothing: sigma={sigma!r} must be > 0 and alpha={alpha!r} in (0, 1), "
            "e.g. sigma=0.25, alpha=0.001."
        )
    radii = tuple(float(r) for r in radii)

    counts_of = _counting(apply_fn, sigma=sigma, num_classes=num_classes, batch_size=batch_size)

    def fn(states, x, y, key):
        del y
        x = x[::skip]
        seeds = jax.tree.leaves(states)[0].shape[0]

        def one_seed(state, seed_key):
            variables = variables_of(state)
            select_key, estimate_key = jax.random.split(seed_key)
            return {
                "selection": counts_of(variables, x, select_key, n0),
                "estimation": counts_of(variables, x, estimate_key, n),
            }

        return over_seeds(one_seed, seed_strategy)(states, jax.random.split(key, seeds))

    def finish(counts, y):
        y = y[::skip]
        out = {f"acc/certified@{r:g}": [] for r in radii}
        out |= {"abstain": [], "radius/mean": [], "n": []}
        for selection, estimation in zip(counts["selection"], counts["estimation"], strict=True):
            classes, radius = certified_radius(selection, estimation, sigma=sigma, alpha=alpha)
            correct = classes == y
            for r in radii:
                out[f"acc/certified@{r:g}"].append(np.mean(correct & (radius >= r)))
            out["abstain"].append(np.mean(classes == ABSTAIN))
            out["radius/mean"].append(np.mean(np.where(correct, radius, 0.0)))
            out["n"].append(float(len(y)))
        return {k: np.asarray(v, np.float64) for k, v in out.items()}

    return SmoothingEvaluator(fn, finish, name=f"smoothing_{sigma:g}")


__all__ = [
    "ABSTAIN",
    "SmoothingEvaluator",
    "certified_radius",
    "certify",
    "lower_confidence_bound",
    "make_smoothing",
    "noise_counts",
    "predict",
    "predicted_class",
]
