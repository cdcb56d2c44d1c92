"""GAIRAT (Zhang et al. 2021): adversarial training with geometry-aware instance weights."""

import math

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner

WEIGHT_FNS = ("tanh", "sigmoid", "discrete")
LAM_SCHEDULES = ("fixed", "linear", "piecewise")
# The reference's piecewise λ steps (Wide-ResNet branch, 120 epochs), as (fraction, offset to λ).
PIECEWISE_STEPS = ((90 / 120, -1.0), (110 / 120, -1.5))


def lam_schedule_fn(lam_schedule, *, lam, lam_max):
    """``progress -> λ`` (traced float32) for a `LAM_SCHEDULES` name or ``(fraction, λ)`` pairs.

    - ``fixed``: λ = `lam`.
    - ``linear``: λ = ``lam_max - progress * (lam_max - lam)``, from `lam_max` at the start of
      training to `lam` at its end (`lam_max` must be finite).
    - ``piecewise``: λ = `lam`, then ``lam - 1`` from 90/120 and ``lam - 1.5`` from 110/120
      (`PIECEWISE_STEPS`).
    - pairs: `lam` before the first fraction, then each pair's λ from its fraction on.
    """
    if isinstance(lam_schedule, str):
        if lam_schedule not in LAM_SCHEDULES:
            raise ValueError(
                f"lam_schedule={lam_schedule!r}; use one of {LAM_SCHEDULES} or (fraction, lam) "
                "pairs."
            )
        if lam_schedule == "fixed":
            return lambda progress: jnp.float32(lam)
        if lam_schedule == "linear":
            if not (math.isfinite(lam_max) and math.isfinite(lam)):
                raise ValueError(
                    f"lam_schedule='linear' needs finite lam and lam_max, got {lam}, {lam_max}."
                )
            return lambda progress: jnp.float32(lam_max) - progress * jnp.float32(lam_max - lam)
        pairs = tuple((f, lam + d) for f, d in PIECEWISE_STEPS)
    else:
        pairs = lam_schedule
    pairs = inner.check_schedule(pairs, name="gairat lam_schedule")
    return lambda progress: inner.piecewise_constant(progress, pairs, lam)


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
    begin=None,
    lam_schedule="fixed",
    lam_max=float("inf"),
    weight_fn="tanh",
    threat=None,
    norm=None,
    epsilon=None,
    num_steps=10,
    step_size=2 / 255,
    mask=None,
):
    """Returns the GAIRAT objective ``mean(w(kappa) * CE(f(x + delta*), y))``.

    PGD (uniform start, on the model in eval mode) runs all K steps and counts for each example
    the steps at which it was still classified correctly (kappa); `gair_weights` turns kappa
    into weights that favour examples near the decision boundary. The weights are constants of
    the outer loss, which is taken in training mode.

    Schedules over training (``batch['progress']``, the fraction of training done, which the
    trainer adds): before `begin` every weight is 1 (plain PGD-AT, the reference's burn-in);
    from `begin` on the weights are geometry-aware with λ given by `lam_schedule`. Both are
    traced from the progress, so the run stays one compiled program. A batch without
    ``'progress'`` counts as the start of training. The defaults (no burn-in, fixed λ) keep the
    objective as it was; the reference's GAIRAT.py (120 epochs) uses equal weights before
    ``--begin_epoch 60`` and ``--Lambda_schedule fixed``:

    - its epochs count from 1, so reweighting starts after 59 of 120 epochs, together with its
      first learning-rate decay: ``begin=59 / 120`` matches it to the epoch; ``begin=0.5``
      starts with the first decay of this library's piecewise schedule (default milestones);
    - ``linear`` is its λ = Λ_max - (e / E)(Λ_max - λ) in epoch e of E, used from `begin` on
      (here with the continuous progress for e / E; it needs a finite ``lam_max``, whose
      default there, +inf, makes its linear schedule NaN);
    - ``piecewise``: λ from `begin`, λ - 1 from epoch 90 and λ - 1.5 from epoch 110 of 120 in
      its code. There the two later steps sit behind ``elif`` after the ``epoch >= 60`` test and
      are never reached, so its 'piecewise' trains as 'fixed'; here the steps are applied (at
      90/120 and 110/120 of training). Its ResNet branch (fewer than 110 epochs) differs:
      λ from epoch 30, λ - 2 from epoch 60; pass pairs for that.

    Args:
      lam: λ of the weight function (with a schedule: its final / base value).
      begin: None (no burn-in), or the fraction of training in [0, 1] from which the
        geometry-aware weights are used; before it all weights are 1.
      lam_schedule: ``"fixed"``, ``"linear"``, ``"piecewise"`` (see `lam_schedule_fn`) or a
        sequence of ``(fraction of training, λ)`` pairs.
      lam_max: Λ_max, the start of the ``linear`` schedule.
      weight_fn: ``"tanh"`` (the paper's default), ``"sigmoid"`` or ``"discrete"``.
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      num_steps: PGD steps K.
      step_size: PGD step length.
      mask: optional pixel mask of the ball, without `threat`.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds ``x + delta*``, ``aux['weights']`` the instance weights and ``aux['kappa']`` the
      geometry values. With a `begin`, the metric ``reweighted`` is 1 on steps that used the
      geometry-aware weights and 0 on burn-in steps.

    References:
      Zhang et al. 2021, "Geometry-aware Instance-reweighted Adversarial Training", ICLR
      (github.com/zjfheart/Geometry-aware-Instance-reweighted-Adversarial-Training).
    """
    if weight_fn not in WEIGHT_FNS:
        raise ValueError(f"weight_fn={weight_fn!r}; use one of {WEIGHT_FNS}.")
    if begin is not None and not 0.0 <= begin <= 1.0:
        raise ValueError(f"gairat: begin={begin!r} must be a fraction of training in [0, 1].")
    scheduled = begin is not None or not (isinstance(lam_schedule, str) and lam_schedule == "fixed")
    lam_fn = lam_schedule_fn(lam_schedule, lam=lam, lam_max=lam_max)
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="gairat")

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
        metrics = {}
        # Only a schedule reads the progress (a batch without it would log a warning).
        progress = inner.progress_of(batch, name="gairat") if scheduled else jnp.float32(0)
        weights = gair_weights(stats["kappa"], num_steps, lam=lam_fn(progress), weight_fn=weight_fn)
        if begin is not None:
            active = progress >= jnp.float32(begin)
            weights = jnp.where(active, weights, 1.0)
            metrics["reweighted"] = active.astype(jnp.float32)
        weights = jax.lax.stop_gradient(weights)
        x_adv = jax.lax.stop_gradient(x + delta)
        logits, model_state = apply_fn(variables, x_adv, train=True)
        loss = jnp.mean(weights * losses.cross_entropy(logits, y))
        metrics |= {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "mean_kappa": jnp.mean(stats["kappa"].astype(jnp.float32)),
        }
        metrics |= inner.perturbation_metrics(tm, delta)
        aux = {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}
        return loss, aux | {"weights": weights, "kappa": stats["kappa"]}

    return objective
