"""Training objectives (= defenses). All share one signature:

    objective(variables, batch, key, *, apply_fn) -> (loss, aux)

`variables` is ``{'params': ..., **model_state}``, `batch` a dict with 'image' and 'label'
(the trainer adds 'index', and 'progress', the fraction of training done, and 'epoch'), `loss` a
scalar (the mean over the batch) and ``aux = {'model_state': ..., 'metrics': {...}}``
(objectives with an inner attack also put the example they trained on in ``aux['adversarial']``).
A factory ``make(**hyperparameters)`` returns the objective; the trainer takes the gradient of
`loss` with respect to ``variables['params']`` and never needs to know which objective it runs.

Every defense (`ADVERSARIAL`) takes the defender's own ball, which may differ from the
attacker's: either ``threat=`` (an `LpBall`, the object the poisons take) or its fields ``norm``,
``epsilon``, ``mask`` (as configs give them; `specs.objective` fills them from ``config.threat``
where a spec does not set its own), and ``num_steps``, ``step_size`` for the inner search. There
is no default radius: without ``threat`` or ``epsilon`` the factory raises a ValueError. Inner
attacks run the model in eval mode (BatchNorm running statistics); see `objectives.inner`.
Schedules over training read ``batch['progress']`` (`inner.progress_of`; a batch without it
counts as the start of training): FAT's ``tau_schedule`` ("dynamic" τ) and GAIRAT's ``begin``
(equal-weight burn-in) and ``lam_schedule``. Without them the objectives ignore the progress.

==================  =====================================================================
``erm``             standard training (cross-entropy)
``rand_noise``      cross-entropy under uniform random noise in the ball
``pgd_at``          Madry et al. 2018, PGD adversarial training
``trades``          Zhang et al. 2019, CE + β KL(p(x) || p(x_adv))
``thrm``            Tao et al. 2022, CE + λ KL(p(x) || p(x_hyp)), x_hyp hypocritical
``mart``            Wang et al. 2020, misclassification-aware boosted CE + weighted KL
``fat``             Zhang et al. 2020, friendly AT on early-stopped PGD (τ)
``gairat``          Zhang et al. 2021, geometry-aware instance-reweighted AT
``ueraser``         Qin et al. 2023, max CE over K UEraser-augmented copies (no ball)
``gaussian_noise``  Cohen et al. 2019, CE under N(0, σ²) noise (randomized smoothing; no ball)
``ibp``             Gowal et al. 2018, κ CE + (1 − κ) CE of IBP worst-case logits, ramped ε, κ
==================  =====================================================================

Add your own with `register`.
"""

from jaxpoison import _registry
from jaxpoison.objectives import (
    erm,
    fat,
    gairat,
    gaussian_noise,
    ibp,
    mart,
    pgd_at,
    rand_noise,
    thrm,
    trades,
    ueraser,
)

OBJECTIVES = {
    "erm": erm.make,
    "rand_noise": rand_noise.make,
    "pgd_at": pgd_at.make,
    "trades": trades.make,
    "thrm": thrm.make,
    "mart": mart.make,
    "fat": fat.make,
    "gairat": gairat.make,
    "ueraser": ueraser.make,
    "gaussian_noise": gaussian_noise.make,
    "ibp": ibp.make,
}

# The built-in objectives that take the defender's ball (``threat=``, or ``norm`` / ``epsilon`` /
# ``mask``) and need a radius.
ADVERSARIAL = frozenset(OBJECTIVES) - {"erm", "ueraser", "gaussian_noise"}


def register(name, factory, *, overwrite=False):
    """Adds an objective (a defense) to `OBJECTIVES`, so `make` and ``victim.objective`` know it.

    Args:
      name: the name configs use (``config.victim.objective.name``).
      factory: ``factory(**hyperparameters) -> objective`` with
        ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)`` as described above.
      overwrite: replace an objective already registered under `name`.

    Example::

      def make_smooth(*, smoothing=0.1):
          def objective(variables, batch, key, *, apply_fn):
              ...

          return objective

      objectives.register("smooth", make_smooth)
    """
    _registry.add(OBJECTIVES, name, factory, kind="objective", overwrite=overwrite)


def make(name, /, **kwargs):
    """Builds the objective `name` of `OBJECTIVES` with its hyperparameters.

    Raises:
      ValueError: `name` is not registered, or `kwargs` hold a keyword its factory does not take
        (the message lists those it does) or lack one it needs.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; use one of {sorted(OBJECTIVES)}.")
    _registry.check_arguments("objective", name, OBJECTIVES[name], kwargs)
    return OBJECTIVES[name](**kwargs)


__all__ = ["ADVERSARIAL", "OBJECTIVES", "make", "register"]
