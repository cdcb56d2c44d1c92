"""The Gaussian-theory experiment: Figure 2 of Tao et al. (2021) in closed form, checked by Monte
Carlo and by linear classifiers trained with the library's ``erm`` and ``pgd_at`` objectives.

The trainer of ``config.trainer = 'gaussian_theory'`` (``configs/gaussian_theory.py``). The
workdir looks like every other run's: ``config.json`` first, ``log.txt``, ``figure2.png``, and
``results.json`` last (atomically); a run that finds a complete ``results.json`` does nothing.

Config fields (``config.theory``): ``sigma``, ``eta``, ``epsilon`` (None: 2η), ``dims`` (the
closed-form curve), ``mc_dims`` and ``mc_samples`` (Monte Carlo on the sufficient statistics of
the five classifiers), ``full_mc_max_dim`` (at these d and below also full (d+1)-dimensional draws),
``trained_dims``, ``train_samples``, ``train_steps``, ``learning_rate`` (linear classifiers).
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from jaxpoison import plots
from jaxpoison.progress import say
from jaxpoison.theory import gaussian, linear
from jaxpoison.workdir import close_run, open_run, results_header


def check_theorems(dims, *, eta, sigma, epsilon=None):
    """Theorem 2's ordering and Theorem 3's improvement at every d of `dims` (closed form).

    Returns:
      ``{'theorem2': bool, 'theorem3_flip': bool, 'theorem3_amplify': bool}``: whether
      R(f_D) < R(f_D̂2) < R(f_D̂1), R(AT on D̂1) < R(ST on D̂1) and R(AT on D̂2) < R(ST on D̂2)
      hold strictly at every d.
    """
    r = gaussian.figure2(dims, eta=eta, sigma=sigma, epsilon=epsilon, metric="risk")
    st_d, st1, st2 = r["ST on D"], r["ST on D1 (flip)"], r["ST on D2 (amplify)"]
    return {
        "theorem2": bool(np.all(st_d < st2) and np.all(st2 < st1)),
        "theorem3_flip": bool(np.all(r["AT on D1 (flip)"] < st1)),
        "theorem3_amplify": bool(np.all(r["AT on D2 (amplify)"] < st2)),
    }


def monte_carlo(key, dims, *, eta, sigma, epsilon, num_samples, full_max_dim=0):
    """Monte-Carlo natural accuracy of the five closed-form classifiers at each d of `dims`.

    Returns:
      ``{label: [{'d', 'closed_form', 'structured': [acc, se], 'full': [acc, se] or None}]}``.
    """
    out = {label: [] for label, _, _ in gaussian.MODELS}
    for i, d in enumerate(dims):
        clean = gaussian.mean(d, eta)
        for j, (label, shift, adversarial) in enumerate(gaussian.MODELS):
            w = gaussian.classifier(d, eta, shift, adversarial=adversarial, epsilon=epsilon)
            k = jax.random.fold_in(jax.random.fold_in(key, i), j)
            row = {
                "d": int(d),
                "closed_form": gaussian.natural_accuracy(w, clean, sigma),
                "structured": gaussian.monte_carlo_accuracy_structured(
                    k, w, d, eta, sigma, num_samples
                ),
                "full": None,
            }
            if d <= full_max_dim:
                row["full"] = gaussian.monte_carlo_accuracy(
                    jax.random.fold_in(k, 1), w, clean, sigma, num_samples
                )
            out[label].append(row)
    return out


def trained(key, dims, *, eta, sigma, epsilon, num_samples, num_steps, learning_rate):
    """Linear classifiers trained by ``erm`` (ST) or ``pgd_at`` (AT) on samples of the training
    distribution of each of the five models; their exact natural accuracy on D (closed form of
    the learned weights) beside the optimum's.

    Returns:
      ``{label: [{'d', 'natural_accuracy', 'optimum', 'cosine_to_optimum', 'final_loss'}]}``.
    """
    out = {label: [] for label, _, _ in gaussian.MODELS}
    for i, d in enumerate(dims):
        clean = gaussian.mean(d, eta)
        data = {
            shift: gaussian.sample(
                jax.random.fold_in(key, 10 * i + j),
                num_samples,
                gaussian.mean(d, eta, shift),
                sigma,
            )
            for j, shift in enumerate(gaussian.SHIFTS)
        }
        scale = max(linear.box_scale(x, epsilon) for x, _ in data.values())
        fitters = {
            name: linear.make_fitter(
                linear.make_objective(name, epsilon=epsilon, scale=scale),
                scale=scale,
                num_steps=num_steps,
                learning_rate=learning_rate,
            )
            for name in ("erm", "pgd_at")
        }
        for j, (label, shift, adversarial) in enumerate(gaussian.MODELS):
            x, y = data[shift]
            w, b, history = fitters["pgd_at" if adversarial else "erm"](
                x, y, jax.random.fold_in(key, 1000 + 10 * i + j)
            )
            optimum = gaussian.classifier(d, eta, shift, adversarial=adversarial, epsilon=epsilon)
            out[label].append(
                {
                    "d": int(d),
                    "objective": "pgd_at" if adversarial else "erm",
                    "natural_accuracy": gaussian.natural_accuracy(w, clean, sigma, b),
                    "optimum": gaussian.natural_accuracy(optimum, clean, sigma),
                    "cosine_to_optimum": linear.cosine(w, optimum),
                    "final_loss": float(history[-1]),
                }
            )
            row = out[label][-1]
            say(
                f"trained {label} d={d}: natural accuracy {row['natural_accuracy']:.4f} "
                f"(optimum {row['optimum']:.4f})"
            )
    return out


def plot(results, path, *, title=""):
    """Figure 2: natural accuracy on D vs d, closed form (lines), Monte Carlo (o), trained (x)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    dims = np.asarray(results["closed_form"]["dims"])
    for label, _, adversarial in gaussian.MODELS:
        curve = np.asarray(results["closed_form"]["accuracy"][label]) * 100
        (line,) = ax.plot(dims, curve, "--" if adversarial else "-", label=label)
        mc = results["monte_carlo"][label]
        if mc:
            ax.errorbar(
                [r["d"] for r in mc],
                [100 * r["structured"][0] for r in mc],
                yerr=[300 * r["structured"][1] for r in mc],
                fmt="o",
                ms=3,
                color=line.get_color(),
            )
        tr = results["trained"][label]
        if tr:
            ax.plot(
                [r["d"] for r in tr],
                [100 * r["natural_accuracy"] for r in tr],
                "x",
                ms=7,
                color=line.get_color(),
            )
    ax.set_xscale("log")
    ax.set_xlabel("d (number of non-robust features)")
    ax.set_ylabel("natural accuracy on D (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        title + "\nlines: closed form (dashed: AT, ε = 2η); o: Monte Carlo (±3 s.e.); x: trained",
        fontsize=9,
    )
    plots.save_figure(fig, path)


def train_and_evaluate(config, workdir, *, progress=True):
    """Runs the Gaussian-theory experiment `config` in `workdir`; returns the results dict."""
    del progress
    done = open_run(config, workdir)
    if done is not None:
        return done
    workdir = Path(workdir)
    t_start = time.time()
    th = config.theory
    sigma, eta = float(th.sigma), float(th.eta)
    epsilon = 2 * eta if th.get("epsilon") is None else float(th.epsilon)
    key = jax.random.key(config.seed)
    dims = [int(d) for d in th.dims]

    curves = gaussian.figure2(dims, eta=eta, sigma=sigma, epsilon=epsilon)
    theorems = check_theorems(dims, eta=eta, sigma=sigma, epsilon=epsilon)
    say(f"closed form over {len(dims)} values of d; theorems: {theorems}")
    mc = monte_carlo(
        jax.random.fold_in(key, 1),
        [int(d) for d in th.mc_dims],
        eta=eta,
        sigma=sigma,
        epsilon=epsilon,
        num_samples=int(th.mc_samples),
        full_max_dim=int(th.get("full_mc_max_dim", 0)),
    )
    worst = max(
        abs(r[kind][0] - r["closed_form"]) / max(r[kind][1], 1e-12)
        for rows in mc.values()
        for r in rows
        for kind in ("structured", "full")
        if r[kind] is not None
    )
    say(f"Monte Carlo: largest |MC - closed form| is {worst:.2f} standard errors")
    tr = trained(
        jax.random.fold_in(key, 2),
        [int(d) for d in th.trained_dims],
        eta=eta,
        sigma=sigma,
        epsilon=epsilon,
        num_samples=int(th.train_samples),
        num_steps=int(th.train_steps),
        learning_rate=float(th.learning_rate),
    )
    results = {
        **results_header(config, t_start=t_start),
        "closed_form": {"dims": dims, "accuracy": {k: v.tolist() for k, v in curves.items()}},
        "theorems": theorems,
        "monte_carlo": mc,
        "monte_carlo_max_standard_errors": worst,
        "trained": tr,
    }
    title = config.get("name", "") or f"σ={sigma}, η={eta}, ε={epsilon:g}"
    plot(results, workdir / "figure2.png", title=title)
    close_run(results, workdir, plots=[workdir / "figure2.png"])
    return results


__all__ = ["check_theorems", "monte_carlo", "plot", "train_and_evaluate", "trained"]
