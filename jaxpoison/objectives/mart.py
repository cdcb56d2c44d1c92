"""MART (Wang et al. 2020): misclassification-aware adversarial training."""

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner


def make(
    *,
    beta=6.0,
    threat=None,
    norm=None,
    epsilon=None,
    num_steps=10,
    step_size=2 / 255,
    init_scale=1e-3,
    mask=None,
):
    """Returns the MART objective.

    .. math::
        \\mathrm{BCE}(p(x'), y) + \\beta\\, \\mathrm{KL}(p(x) \\| p(x'))\\,(1 - p_y(x)),\\quad
        \\mathrm{BCE}(p, y) = -\\log p_y - \\log(1 - \\max_{k \\ne y} p_k)

    with x' the PGD (cross-entropy) adversarial example, found on the model in eval mode from
    ``init_scale * N(0, I)``. The KL term is weighted by how *badly* the clean example is
    classified, so misclassified examples are regularised most. The gradient flows through
    p_y(x) too, as in the reference code; its stabilising constants (1.0001 inside the log,
    1.0000001 in the weight) are kept so the numbers match.

    Args:
      beta: weight of the misclassification-aware KL term (6 in the paper).
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      num_steps: PGD steps.
      step_size: PGD step length.
      init_scale: standard deviation of the Gaussian start.
      mask: optional pixel mask of the ball, without `threat`.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds ``x'``.

    References:
      Wang et al. 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified
      Examples", ICLR (github.com/YisenWang/MART).
    """
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="mart")

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        delta, _ = inner.pgd_with_stats(
            inner.eval_logits_fn(apply_fn, variables),
            losses.cross_entropy,
            x,
            y,
            delta=inner.gaussian_start(key, x, tm, init_scale),
            threat=tm,
            num_steps=num_steps,
            step_size=step_size,
        )
        logits, logits_adv, model_state, x_adv = inner.clean_and_perturbed_forward(
            apply_fn, variables, x, delta
        )
        is_label = jax.nn.one_hot(y, logits.shape[-1]) > 0
        p_adv = jax.nn.softmax(logits_adv)
        p_wrong = jnp.max(jnp.where(is_label, -jnp.inf, p_adv), axis=-1)
        bce = losses.cross_entropy(logits_adv, y) - jnp.log(1.0001 - p_wrong + 1e-12)
        p_true = jnp.sum(jnp.where(is_label, jax.nn.softmax(logits), 0.0), axis=-1)
        kl = losses.kl_divergence(logits, logits_adv)
        robust = jnp.mean(kl * (1.0000001 - p_true))
        loss = jnp.mean(bce) + beta * robust
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "adv_accuracy": jnp.mean(losses.accuracy(logits_adv, y)),
            "boosted_ce": jnp.mean(bce),
            "weighted_kl": robust,
        }
        metrics |= inner.perturbation_metrics(tm, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}

    return objective
