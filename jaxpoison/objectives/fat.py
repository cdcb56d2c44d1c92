"""Friendly adversarial training (Zhang et al. 2020): train on early-stopped PGD examples."""

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner

# Named τ schedules: (fraction of training, τ from there on). "dynamic" is FAT.py's dynamic τ
# for its 120 epochs: τ = 0 in epochs 1-50, 1 in epochs 51-90, 2 in epochs 91-120.
TAU_SCHEDULES = {"dynamic": ((0.0, 0), (50 / 120, 1), (90 / 120, 2))}


def tau_schedule_pairs(tau_schedule):
    """The ``(fraction, τ)`` pairs of a `TAU_SCHEDULES` name or of explicit pairs, validated."""
    if isinstance(tau_schedule, str):
        if tau_schedule not in TAU_SCHEDULES:
            raise ValueError(
                f"tau_schedule={tau_schedule!r}; use one of {sorted(TAU_SCHEDULES)} "
                "or (fraction, tau) pairs."
            )
        tau_schedule = TAU_SCHEDULES[tau_schedule]
    pairs = inner.check_schedule(tau_schedule, name="fat tau_schedule")
    if not all(t >= 0 and t.is_integer() for _, t in pairs):
        raise ValueError(f"fat tau_schedule: tau must be a non-negative integer, got {pairs}.")
    return pairs


def make(
    *,
    tau=0,
    tau_schedule=None,
    omega=0.001,
    threat=None,
    norm=None,
    epsilon=None,
    num_steps=10,
    step_size=2 / 255,
    random_start=True,
    mask=None,
):
    """Returns the FAT objective: cross-entropy at the *friendly* adversarial example.

    Early-stopped PGD (Algorithm 1 of the paper) checks every example before each step; once an
    example has been found misclassified ``tau + 1`` times it stops where it is, so the model
    learns from adversarial examples that are misclassified with minimal loss instead of the
    most adversarial ones. The per-example stop is a mask inside one `lax.scan`
    (`inner.pgd_with_stats`): no example moves after it stops, and the program has one static
    shape. The search runs on the model in eval mode from a uniform point of the ball, adding
    ``omega * N(0, I)`` to every step as the reference code does; the loss is taken in training
    mode.

    τ schedule: the reference raises τ as training goes on ("dynamic tau", on by default in its
    FAT.py): with 120 epochs, τ = 0 in epochs 1-50, 1 in epochs 51-90 and 2 in epochs 91-120.
    ``tau_schedule="dynamic"`` is that schedule as fractions of training: τ = 0 before 50/120,
    1 from 50/120, 2 from 90/120 (at a 120-epoch run's epoch boundaries exactly; other lengths
    switch mid-epoch). The fraction comes from ``batch['progress']``, added by the trainer; τ is
    then a traced value, so the run stays one compiled program. Other versions of the reference
    switch elsewhere: a 30-epoch FAT.py raises τ after epochs 12 and 22, FAT_for_TRADES.py (85
    epochs) goes 0, 1, 2, 3 after epochs 30, 50 and 70. Pass such schedules as pairs, e.g.
    ``tau_schedule=((0, 0), (12 / 30, 1), (22 / 30, 2))``. Without a schedule τ is fixed (the
    default, unchanged).

    Args:
      tau: misclassified checks allowed before an example stops (0 = stop at the first); with a
        `tau_schedule`, τ before its first fraction.
      tau_schedule: None (fixed `tau`), a name of `TAU_SCHEDULES` (``"dynamic"``), or a
        sequence of ``(fraction of training, τ)`` pairs, each τ holding from its fraction on.
      omega: standard deviation of the Gaussian noise added at each step.
      threat: the defender's ball, an `LpBall` (it may differ from the attacker's); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.objective` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius.
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the defender's radius, without `threat`.
      num_steps: maximum PGD steps K.
      step_size: PGD step length.
      random_start: start uniformly in the ball (the reference's ``uniform_randominit``).
      mask: optional pixel mask of the ball, without `threat`.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; ``aux['adversarial']``
      holds the friendly examples and the metric ``mean_steps`` the average number of steps the
      examples moved (the reference's backward-propagation count); with a schedule the metric
      ``tau`` is the τ of the step. A batch without ``'progress'`` counts as the start of
      training.

    References:
      Zhang et al. 2020, "Attacks Which Do Not Kill Training Make Adversarial Learning Stronger",
      ICML (github.com/zjfheart/Friendly-Adversarial-Training).
    """
    schedule = None if tau_schedule is None else tau_schedule_pairs(tau_schedule)
    tm = inner.defender_threat(threat, norm=norm, epsilon=epsilon, mask=mask, what="fat")

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        if schedule is None:
            step_tau = tau
        else:
            progress = inner.progress_of(batch, name="fat")
            step_tau = inner.piecewise_constant(progress, schedule, tau).astype(jnp.int32)
        init_key, noise_key = jax.random.split(key)
        delta, stats = inner.pgd_with_stats(
            inner.eval_logits_fn(apply_fn, variables),
            losses.cross_entropy,
            x,
            y,
            delta=tm.random_init(init_key, x) if random_start else jnp.zeros_like(x),
            threat=tm,
            num_steps=num_steps,
            step_size=step_size,
            tau=step_tau,
            omega=omega,
            key=noise_key,
        )
        x_adv = jax.lax.stop_gradient(x + delta)
        logits, model_state = apply_fn(variables, x_adv, train=True)
        loss = jnp.mean(losses.cross_entropy(logits, y))
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "mean_steps": jnp.mean(stats["num_moves"].astype(jnp.float32)),
        }
        if schedule is not None:
            metrics["tau"] = jnp.asarray(step_tau, jnp.float32)
        metrics |= inner.perturbation_metrics(tm, delta)
        return loss, {"model_state": model_state, "metrics": metrics, "adversarial": x_adv}

    return objective
