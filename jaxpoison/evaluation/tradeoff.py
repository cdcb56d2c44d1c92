r"""Sweeps over a defense's strength: the λ sweep of THRM / TRADES (natural risk against
hypocritical risk on the misclassified) and the defender-budget sweep (clean accuracy against
the adversarial-training radius ε_def, `budget_points` / `budget_plot`).

Each TRADES-like objective (``trades``, ``thrm``, any objective whose spec sets ``beta``) trades
natural accuracy for stability at its weight λ (``beta``). Tao et al. 2022 plot, for a
sweep of λ, the natural risk :math:`R_{nat}` against the hypocritical risk on the misclassified
examples :math:`R_{hyp}(\mathcal{D}^-)`, the share of mistakes a false friend can hide (the
paper's claim to check: THRM reaches a lower hypocritical risk than TRADES at equal natural risk).
Standard training (``erm``) is the λ = 0 end of every family. Adversarial training without a
weight (``pgd_at``) is a family of one point, λ = ``None``, for comparison.

The numbers come from a ``risk`` evaluator of ``config.evals`` (`jaxpoison.evaluation.risk`):
``R_nat`` and ``R_hyp/D-``, mean ± std over seeds, as `summarize.eval_summary` stores them in
``summary[run]['evals'][label]``.

References:
  Tao, Feng, Yi, Chen 2022, "With False Friends Like These, Who Can Notice Mistakes?", AAAI
  (THRM, and its λ sweep against TRADES); Zhang et al. 2019 (TRADES).
"""

from __future__ import annotations

import numpy as np

from jaxpoison import plots

X_METRIC, Y_METRIC = "R_nat", "R_hyp/D-"


def points(objectives, runs, summary, *, eval_label, train_set="clean"):
    """The sweep's points per objective family, sorted by λ.

    Args:
      objectives: ``config.objectives`` as plain dicts (label -> spec with ``name``, ``beta``).
      runs: ``results['runs']`` (each with ``objective`` and ``poison``, the training set).
      summary: ``results['summary']`` with ``evals`` (see `summarize.eval_summary`).
      eval_label: the key of the ``risk`` evaluator in ``config.evals``.
      train_set: the training set whose victims are compared (default the clean one).

    Returns:
      ``{family: [{'lambda', 'run', 'R_nat': {mean, std}, 'R_hyp/D-': {mean, std}}, ...]}``,
      with the ``erm`` runs at λ = 0 in every weighted family, and ``pgd_at`` runs as a
      family of their own with ``lambda`` None.

    Raises:
      ValueError: when a run of the sweep has no ``eval_label`` results with both metrics.
    """
    base, families = [], {}
    for name, run in runs.items():
        if run.get("poison") != train_set:
            continue
        spec = objectives.get(run.get("objective"), {})
        if spec.get("name") == "erm":
            lam = 0.0
        elif "beta" in spec:
            lam = float(spec["beta"])
        elif spec.get("name") == "pgd_at":
            lam = None
        else:
            continue
        metrics = summary[name].get("evals", {}).get(eval_label, {})
        if X_METRIC not in metrics or Y_METRIC not in metrics:
            raise ValueError(
                f"run {name!r} has no {X_METRIC} / {Y_METRIC} under evals[{eval_label!r}]; "
                f"set config.lambda_sweep.eval to the label of a 'risk' evaluator in config.evals."
            )
        point = {"lambda": lam, "run": name, X_METRIC: metrics[X_METRIC]}
        point[Y_METRIC] = metrics[Y_METRIC]
        if lam == 0.0 and spec.get("name") == "erm":
            base.append(point)
        else:
            families.setdefault(spec["name"], []).append(point)
    return {
        f: pts if pts[0]["lambda"] is None else sorted(base + pts, key=lambda p: p["lambda"])
        for f, pts in families.items()
    }


def plot(sweep, path, *, title=""):
    """Natural risk (x) vs hypocritical risk on D- (y), in %, one line per family, points
    labelled by λ (``pgd_at`` as unconnected markers), ±1 std error bars over seeds."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    for family, pts in sweep.items():
        x = np.array([p[X_METRIC]["mean"] for p in pts]) * 100
        y = np.array([p[Y_METRIC]["mean"] for p in pts]) * 100
        xerr = np.array([p[X_METRIC]["std"] for p in pts]) * 100
        yerr = np.array([p[Y_METRIC]["std"] for p in pts]) * 100
        style = dict(marker="s", ls="none") if pts[0]["lambda"] is None else dict(marker="o")
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, ms=4, capsize=2, label=family, **style)
        for p, xi, yi in zip(pts, x, y, strict=True):
            if p["lambda"] is None:
                continue
            ax.annotate(
                f"λ={p['lambda']:g}",
                (xi, yi),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("natural risk R_nat (%)")
    ax.set_ylabel("hypocritical risk on misclassified R_hyp(D-) (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    plots.save_figure(fig, path)
    return path


def budget_points(objectives, runs, summary, *, objective="pgd_at"):
    """The defender-budget sweep: clean test accuracy against the defender's radius ε_def.

    Every objective of config.objectives named `objective` (e.g. ``pgd_at`` at several
    ``epsilon``) is one point per training set; standard training (``erm``) is ε_def = 0.

    Returns:
      ``{training set: [{'epsilon', 'run', 'final_test_acc': {mean, std},
      'peak_test_acc': {mean, std}}, ...]}`` sorted by ε_def.
    """
    sweep = {}
    for name, run in runs.items():
        spec = objectives.get(run.get("objective"), {})
        if spec.get("name") == "erm":
            eps = 0.0
        elif spec.get("name") == objective:
            eps = float(spec["epsilon"])
        else:
            continue
        point = {"epsilon": eps, "run": name}
        point.update({k: summary[name][k] for k in ("final_test_acc", "peak_test_acc")})
        sweep.setdefault(run["poison"], []).append(point)
    return {k: sorted(v, key=lambda p: p["epsilon"]) for k, v in sweep.items()}


def budget_plot(sweep, path, *, attacker_epsilon=None, title=""):
    """Final clean test accuracy (%) against ε_def (in /255), one line per training set, ±1
    std error bars over seeds; a dotted line at the attacker's ε."""
    plt = plots.plt
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    for train_set, pts in sweep.items():
        x = np.array([p["epsilon"] for p in pts]) * 255
        y = np.array([p["final_test_acc"]["mean"] for p in pts]) * 100
        err = np.array([p["final_test_acc"]["std"] for p in pts]) * 100
        ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, label=train_set)
    if attacker_epsilon is not None:
        ax.axvline(attacker_epsilon * 255, ls=":", color="grey", label="attacker ε")
    ax.set_xlabel("defender's ε (/255); 0 = standard training")
    ax.set_ylabel("clean test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    plots.save_figure(fig, path)
    return path


__all__ = ["X_METRIC", "Y_METRIC", "budget_plot", "budget_points", "plot", "points"]
