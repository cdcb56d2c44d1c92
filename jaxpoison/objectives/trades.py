"""TRADES (Zhang et al. 2019): natural cross-entropy plus β times the KL divergence between the
predictions at x and at the point of the ball that maximises it."""

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
    """Returns the TRADES objective.

    .. math::
        \\mathrm{CE}(f(x), y) + \\beta\\, \\mathrm{KL}(p(x) \\| p(x + \\delta^*)),\\quad
        \\delta^* = \\arg\\max_{\\delta \\in B} \\mathrm{KL}(p(x) \\| p(x + \\delta))

    The inner maximisation runs on the model in eval mode from ``init_scale * N(0, I)`` (the KL has
    zero gradient at delta = 0), with p(x) held fixed. The outer loss makes two training-mode
    passes, clean then adversarial (their BatchNorm updates chained), and the gradient flows
    through both distributions of the KL, as in the reference code.

    Args:
      beta: weight of the robustness term (1/λ in the paper; 6 for CIFAR-10).
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      num_steps: steps of the inner maximisation.
      step_size: step length of the inner maximisation.
      init_scale: standard deviation of the Gaussian start.
      mask: optional pixel mask of the ball, without `threat`.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds ``x + delta*``.

    References:
      Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy",
      ICML (github.com/yaodongyu/TRADES).
    """
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="trades")

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        logits_fn = inner.eval_logits_fn(apply_fn, variables)
        delta, _ = inner.pgd_with_stats(
            logits_fn,
            lambda logits, clean: losses.kl_divergence(clean, logits),
            x,
            y,
            target=logits_fn(x),
            delta=inner.gaussian_start(key, x, tm, init_scale),
            threat=tm,
            num_steps=num_steps,
            step_size=step_size,
        )
        logits, logits_adv, model_state, x_adv = inner.clean_and_perturbed_forward(
            apply_fn, variables, x, delta
        )
        loss, metrics = inner.kl_regularized_loss(
            logits, logits_adv, y, beta, names=("adv_accuracy", "robust_kl")
        )
        metrics |= inner.perturbation_metrics(tm, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}

    return objective
