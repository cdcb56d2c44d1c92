r"""IBP training (Gowal et al. 2018): clean cross-entropy mixed with the cross-entropy of the
worst-case logits that interval bounds give over the ℓ∞ ball, on ramped ε and κ schedules."""

import jax.numpy as jnp

from jaxpoison import ibp, losses
from jaxpoison.objectives import inner


def schedule(progress, *, warmup, ramp):
    """The ramp's position in [0, 1]: 0 until `warmup`, then linear over `ramp`, then 1.

    Args:
      progress: traced float32 scalar, the fraction of training done.
      warmup: fraction of training before the ramp starts.
      ramp: fraction of training the ramp lasts (0: a step at `warmup`).
    """
    if ramp == 0:
        return (progress >= warmup).astype(jnp.float32)
    return jnp.clip((progress - warmup) / ramp, 0.0, 1.0)


def make(
    *,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    kappa_end=0.5,
    warmup=0.05,
    ramp=0.3,
    elide=True,
):
    r"""Returns the IBP training objective.

    .. math::
        \kappa_t\, \mathrm{CE}(f(x), y) + (1 - \kappa_t)\, \mathrm{CE}(\hat z(x, \varepsilon_t), y)

    where :math:`\hat z_j = -\underline{(z_y - z_j)}` are the worst-case logits of
    `ibp.worst_case_logits` (an upper bound of the cross-entropy anywhere in the ball). With
    t the fraction of training done (``batch['progress']``), ε_t rises linearly from 0 to ε and
    κ_t falls from 1 to `kappa_end` over ``[warmup, warmup + ramp]``: plain training first, then
    the ball grows (Gowal et al.: 2k warm-up and 10k ramp steps of 60k on MNIST, κ 1 → 0.5;
    CROWN-IBP ramps over about half of training).

    The clean term runs the model in training mode (BatchNorm batch statistics, whose updated
    running statistics are returned); the bounds are those of the model in eval mode, i.e. of
    the network the `ibp` evaluator certifies, with its running statistics as constants (auto_LiRPA
    bounds BatchNorm with the clean batch's statistics instead; the two coincide for models
    without BatchNorm). The gradient flows through the bounds into every parameter.

    Args:
      threat: the defender's ℓ∞ ball, an `LpBall`; or pass its fields `norm`, `epsilon`, `mask`
        (a config does: `specs.objective` fills them from ``config.threat``). No default radius.
      norm: ``"linf"`` (when None); the only norm IBP bounds.
      epsilon: the training radius ε (the reference trains at 1.1 times the test radius:
        0.33 for MNIST at 0.3).
      mask: optional pixel mask of the ball, without `threat`.
      kappa_end: the clean term's weight after the ramp, in [0, 1] (0.5 in Gowal et al.; 0 in
        CROWN-IBP).
      warmup: fraction of training with ε_t = 0 and κ_t = 1 before the ramp, in [0, 1].
      ramp: fraction of training over which ε_t and κ_t move linearly, with
        ``warmup + ramp <= 1``.
      elide: fold the last affine layer into the margins (tighter bounds; Gowal et al.).

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; the metrics hold the
      clean ``loss`` and ``accuracy``, the verified loss ``ibp_loss``, the fraction
      ``certified`` at the current radius, and the schedule's ``epsilon`` and ``kappa``.

    References:
      Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
      Verifiably Robust Models" (Sec. 4: loss and schedules;
      github.com/deepmind/interval-bound-propagation).
      Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural
      Networks", ICLR (CROWN-IBP's schedules; github.com/KaidiXu/auto_LiRPA).
    """
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="ibp")
    if tm.norm != "linf":
        raise ValueError(
            f"ibp: interval bounds are for the linf ball, got norm={tm.norm!r}; train with "
            "norm='linf', or use pgd_at / trades for l2."
        )
    for name, value in (("kappa_end", kappa_end), ("warmup", warmup), ("ramp", ramp)):
        if not 0 <= value <= 1:
            raise ValueError(f"ibp: {name}={value} must lie in [0, 1] (a fraction of training).")
    if warmup + ramp > 1:
        raise ValueError(
            f"ibp: warmup + ramp = {warmup} + {ramp} > 1: the ramp would not end within "
            "training; shorten one of them."
        )

    def objective(variables, batch, key, *, apply_fn):
        del key
        x, y = batch["image"], batch["label"]
        t = schedule(inner.progress_of(batch, name="ibp"), warmup=warmup, ramp=ramp)
        eps = tm.epsilon * t
        kappa = 1.0 - t * (1.0 - kappa_end)
        logits, model_state = apply_fn(variables, x, train=True)
        worst = ibp.worst_case_logits(
            lambda images: apply_fn(variables, images, train=False)[0],
            x,
            y,
            eps,
            num_classes=logits.shape[-1],
            mask=tm.mask,
            elide=elide,
        )
        clean_loss = jnp.mean(losses.cross_entropy(logits, y))
        ibp_loss = jnp.mean(losses.cross_entropy(worst, y))
        loss = kappa * clean_loss + (1.0 - kappa) * ibp_loss
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "ibp_loss": ibp_loss,
            "certified": jnp.mean(ibp.certified(worst, y).astype(jnp.float32)),
            "epsilon": eps,
            "kappa": kappa,
        }
        return loss, {"model_state": model_state, "metrics": metrics}

    return objective
