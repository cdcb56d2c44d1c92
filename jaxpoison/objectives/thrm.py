"""THRM (Tao et al. 2022): natural cross-entropy plus λ times the KL divergence between the
predictions at x and at its *hypocritical* example, the point of the ball that most lowers the
loss toward the true label."""

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
    init_scale=1e-2,
    mask=None,
):
    """Returns the THRM objective (TRADES-like, with a hypocritical inner problem).

    .. math::
        \\mathrm{CE}(f(x), y) + \\lambda\\, \\mathrm{KL}(p(x) \\| p(x_{hyp})),\\quad
        x_{hyp} = x + \\arg\\min_{\\delta \\in B} \\mathrm{CE}(f(x + \\delta), y)

    The hypocritical example is found by projected steepest *descent* of the cross-entropy toward
    the true label, on the model in eval mode, from ``init_scale * N(0, I)`` (as the reference
    code starts it). Penalising the divergence it creates makes the model's prediction hard to
    *improve* within the ball, i.e. not reliant on features a false friend could strengthen. The
    outer loss makes two training-mode passes (clean, then hypocritical; BatchNorm updates
    chained).

    Args:
      beta: λ, weight of the KL term (the paper sweeps it from 1 to 100).
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      num_steps: steps of the inner minimisation.
      step_size: step length of the inner minimisation.
      init_scale: standard deviation of the Gaussian start.
      mask: optional pixel mask of the ball, without `threat`.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds the hypocritical example.

    References:
      Tao et al. 2022, "With False Friends Like These, Who Can Notice Mistakes?", AAAI
      (github.com/TLMichael/False-Friends).
    """
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="thrm")

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
            maximize=False,
        )
        logits, logits_hyp, model_state, x_hyp = inner.clean_and_perturbed_forward(
            apply_fn, variables, x, delta
        )
        loss, metrics = inner.kl_regularized_loss(
            logits, logits_hyp, y, beta, names=("hyp_accuracy", "hypocritical_kl")
        )
        metrics |= inner.perturbation_metrics(tm, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x_hyp}

    return objective
