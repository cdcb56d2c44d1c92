"""GAIRAT (Zhang et al. 2021): adversarial training with geometry-aware instance weights."""

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner

WEIGHT_FNS = ("tanh", "sigmoid", "discrete")


def gair_weights(kappa, num_steps, *, lam=-1.0, weight_fn="tanh"):
    """Instance weights from the geometry value kappa, normalised to mean 1 over the batch.

    kappa in [0, K] is the number of PGD steps at which an example was still classified
    correctly: a small kappa means the example lies close to the decision boundary (it is
    attackable), and it gets a large weight. With h = max(1, K // 2):

    - ``tanh``: ``(1 + tanh(lam + 5 (h - kappa) / h)) / 2``;
    - ``sigmoid``: ``sigmoid(lam + 5 (h - kappa) / h)``;
    - ``discrete``: ``(K + 1 - kappa) / (K + 1)``.

    ``lam = +inf`` gives equal weights (plain PGD-AT) with ``tanh`` or ``sigmoid``.

    Args:
      kappa: int [B] geometry values.
      num_steps: K, the PGD steps kappa was counted over.
      lam: λ, the weight function's offset (-1 in the paper's CIFAR-10 runs).
      weight_fn: one of `WEIGHT_FNS`.

    Returns:
      float32 [B] weights with mean 1.

    References:
      Zhang et al. 2021, "Geometry-aware Instance-reweighted Adversarial Training", ICLR.
    """
    kappa = kappa.astype(jnp.float32)
    half = max(1, num_steps // 2)
    if weight_fn == "tanh":
        w = (jnp.tanh(lam + 5.0 * (half - kappa) / half) + 1.0) / 2.0
    elif weight_fn == "sigmoid":
        w = jax.nn.sigmoid(lam + 5.0 * (half - kappa) / half)
    elif weight_fn == "discrete":
        w = (num_steps + 1.0 - kappa) / (num_steps + 1.0)
    else:
        raise ValueError(f"weight_fn={weight_fn!r}; use one of {WEIGHT_FNS}.")
    return w * w.shape[0] / jnp.sum(w)


def make(
    *,
    lam=-1.0,
    weight_fn="tanh",
    norm="linf",
    epsilon=8 / 255,
    num_steps=10,
    step_size=2 / 255,
    mask=None,
):
    """Returns the GAIRAT objective ``mean(w(kappa) * CE(f(x + delta*), y))``.

    PGD (uniform start, on the model in eval mode) runs all K steps and counts for each example
    the steps at which it was still classified correctly (kappa); `gair_weights` turns kappa
    into weights that favour examples near the decision boundary. The weights are constants of
    the outer loss, which is taken in training mode.

    The reference trains with equal weights for the first part of training ("begin_epoch") and
    schedules λ; the objective signature has no epoch, so λ is fixed here (``lam=inf`` is the
    equal-weight phase).

    Args:
      lam: λ of the weight function.
      weight_fn: ``"tanh"`` (the paper's default), ``"sigmoid"`` or ``"discrete"``.
      norm: ``"linf"`` or ``"l2"``: the defender's norm.
      epsilon: the defender's radius.
      num_steps: PGD steps K.
      step_size: PGD step length.
      mask: optional pixel mask of the ball.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds ``x + delta*`` and ``aux['weights']`` the instance weights.

    References:
      Zhang et al. 2021, "Geometry-aware Instance-reweighted Adversarial Training", ICLR
      (github.com/zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training).
    """
    if weight_fn not in WEIGHT_FNS:
        raise ValueError(f"weight_fn={weight_fn!r}; use one of {WEIGHT_FNS}.")
    tm = inner.defender_threat(norm=norm, epsilon=epsilon, mask=mask)

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        delta, stats = inner.pgd_with_stats(
            inner.eval_logits_fn(apply_fn, variables),
            losses.cross_entropy,
            x,
            y,
            delta=tm.random_init(key, x),
            threat=tm,
            num_steps=num_steps,
            step_size=step_size,
        )
        weights = jax.lax.stop_gradient(
            gair_weights(stats["kappa"], num_steps, lam=lam, weight_fn=weight_fn)
        )
        x_adv = jax.lax.stop_gradient(x + delta)
        logits, model_state = apply_fn(variables, x_adv, train=True)
        loss = jnp.mean(weights * losses.cross_entropy(logits, y))
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "mean_kappa": jnp.mean(stats["kappa"].astype(jnp.float32)),
        }
        metrics |= inner.perturbation_metrics(tm, delta)
        aux = {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}
        return loss, aux | {"weights": weights}

    return objective
