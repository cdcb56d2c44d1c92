"""Tests of the mixture-Gaussian theory: closed forms against Monte Carlo, Theorems 2 and 3 of
Tao et al. (2021) across a sweep, optimality of the closed-form classifiers, and linear
classifiers trained with the library's ``erm`` / ``pgd_at`` objectives against the optimum."""

import jax
import ml_collections
import numpy as np
import pytest

from jaxpoison import trainers
from jaxpoison.theory import gaussian, linear
from jaxpoison.trainers import gaussian_theory


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def test_closed_form_matches_full_monte_carlo():
    """All five models, d = 20, η = 0.2 (visible effects): full (d+1)-dimensional draws."""
    d, eta, sigma, n = 20, 0.2, 1.0, 24_000
    clean = gaussian.mean(d, eta)
    accs = []
    for i, (_, shift, adversarial) in enumerate(gaussian.MODELS):
        w = gaussian.classifier(d, eta, shift, adversarial=adversarial)
        acc, se = gaussian.monte_carlo_accuracy(jax.random.key(i), w, clean, sigma, n)
        expected = gaussian.natural_accuracy(w, clean, sigma)
        assert abs(acc - expected) < 3 * se, (shift, adversarial, acc, expected, se)
        accs.append(expected)
    assert max(accs) - min(accs) > 0.2  # the check is not vacuous
    # An affine classifier with a bias, too.
    w = gaussian.bayes_classifier(clean)
    acc, se = gaussian.monte_carlo_accuracy(jax.random.key(9), w, clean, sigma, n, b=1.5)
    assert abs(acc - gaussian.natural_accuracy(w, clean, sigma, b=1.5)) < 3 * se


@pytest.mark.parametrize("d", [30, 10_000, 100_000])
def test_closed_form_matches_structured_monte_carlo(d):
    eta, sigma, n = 0.01, 1.0, 200_000
    clean = gaussian.mean(d, eta)
    for i, (_, shift, adversarial) in enumerate(gaussian.MODELS):
        w = gaussian.classifier(d, eta, shift, adversarial=adversarial)
        acc, se = gaussian.monte_carlo_accuracy_structured(
            jax.random.key(100 + i), w, d, eta, sigma, n
        )
        assert abs(acc - gaussian.natural_accuracy(w, clean, sigma)) < 3 * se


def test_structured_and_full_monte_carlo_agree():
    d, eta, sigma, n = 50, 0.1, 1.0, 24_000
    w = gaussian.classifier(d, eta, "flip", adversarial=False)
    full, se_full = gaussian.monte_carlo_accuracy(
        jax.random.key(1), w, gaussian.mean(d, eta), sigma, n
    )
    red, se_red = gaussian.monte_carlo_accuracy_structured(jax.random.key(2), w, d, eta, sigma, n)
    assert abs(full - red) < 3 * np.hypot(se_full, se_red)


@pytest.mark.parametrize("eta,max_log_d", [(0.01, 5), (0.05, 5), (0.1, 5), (0.3, 4)])
def test_theorems_2_and_3_across_the_sweep(eta, max_log_d):
    dims = sorted({int(d) for d in np.logspace(0, max_log_d, 60)})
    r = gaussian.figure2(dims, eta=eta, metric="risk")
    assert all(np.all(v > 0) for v in r.values())  # risks are resolved, not rounded to 0
    # Theorem 2: R(f_D) < R(f_D2) < R(f_D1).
    assert np.all(r["ST on D"] < r["ST on D2 (amplify)"])
    assert np.all(r["ST on D2 (amplify)"] < r["ST on D1 (flip)"])
    # Theorem 3: adversarial training on either delusive distribution beats standard training.
    assert np.all(r["AT on D1 (flip)"] < r["ST on D1 (flip)"])
    assert np.all(r["AT on D2 (amplify)"] < r["ST on D2 (amplify)"])
    assert gaussian_theory.check_theorems(dims, eta=eta, sigma=1.0) == {
        "theorem2": True,
        "theorem3_flip": True,
        "theorem3_amplify": True,
    }
    # Standard training on D1 falls below chance once d η² > 1; AT on D1 stays at Φ(1/σ).
    assert dims[-1] * eta**2 > 1 and r["ST on D1 (flip)"][-1] > 0.5
    np.testing.assert_allclose(r["AT on D1 (flip)"], gaussian.normal_cdf(-1.0), rtol=1e-12)


def test_figure2_closed_form_equals_vector_formula():
    dims = [1, 7, 300]
    for metric, fn in (("accuracy", gaussian.natural_accuracy), ("risk", gaussian.natural_risk)):
        curves = gaussian.figure2(dims, eta=0.05, sigma=1.3, epsilon=0.08, metric=metric)
        for label, shift, adversarial in gaussian.MODELS:
            expected = [
                fn(
                    gaussian.classifier(d, 0.05, shift, adversarial=adversarial, epsilon=0.08),
                    gaussian.mean(d, 0.05),
                    1.3,
                )
                for d in dims
            ]
            np.testing.assert_allclose(curves[label], expected, rtol=1e-12)


def test_closed_form_classifiers_are_optimal():
    """No random direction beats mu (natural) or the soft-thresholded mu (ℓ∞-robust)."""
    rng = np.random.default_rng(0)
    d, eta, sigma, eps = 8, 0.2, 1.0, 0.4
    for shift in gaussian.SHIFTS:
        mu = gaussian.mean(d, eta, shift)
        best_nat = gaussian.natural_accuracy(gaussian.bayes_classifier(mu), mu, sigma)
        w_rob = gaussian.robust_linear_classifier(mu, eps)
        best_rob = gaussian.robust_accuracy(w_rob, mu, sigma, eps)
        for _ in range(300):
            w = mu + rng.normal(size=mu.shape) * rng.uniform(0.01, 1.0)
            assert gaussian.natural_accuracy(w, mu, sigma) <= best_nat + 1e-12
            assert gaussian.robust_accuracy(w, mu, sigma, eps) <= best_rob + 1e-12
    np.testing.assert_allclose(
        gaussian.robust_linear_classifier(gaussian.mean(3, 0.01, "flip"), 0.02), [0.98, 0, 0, 0]
    )
    with pytest.raises(ValueError, match="shift"):
        gaussian.mean(3, 0.1, "sideways")


@pytest.fixture(scope="module")
def trained_models():
    """The five models trained on samples (d = 20, η = 0.1: effects visible at small d, and no
    training distribution nearly separable, where logistic regression would chase the margin)."""
    d, eta, sigma, n = 20, 0.1, 1.0, 4000
    data = {
        shift: gaussian.sample(jax.random.key(10 + j), n, gaussian.mean(d, eta, shift), sigma)
        for j, shift in enumerate(gaussian.SHIFTS)
    }
    scale = max(linear.box_scale(x, 2 * eta) for x, _ in data.values())
    fitters = {
        name: linear.make_fitter(
            linear.make_objective(name, epsilon=2 * eta, scale=scale),
            scale=scale,
            num_steps=200,
            learning_rate=0.1,
        )
        for name in ("erm", "pgd_at")
    }
    out = {}
    for label, shift, adversarial in gaussian.MODELS:
        x, y = data[shift]
        w, b, _ = fitters["pgd_at" if adversarial else "erm"](x, y, jax.random.key(3))
        out[label] = (w, b, gaussian.classifier(d, eta, shift, adversarial=adversarial))
    return out, gaussian.mean(d, eta), sigma


def test_trained_classifiers_reach_the_closed_form(trained_models):
    models, clean, sigma = trained_models
    for label, (w, b, optimum) in models.items():
        acc = gaussian.natural_accuracy(w, clean, sigma, b)
        assert abs(acc - gaussian.natural_accuracy(optimum, clean, sigma)) < 0.02, label
        assert linear.cosine(w, optimum) > 0.98, label
    acc = {k: gaussian.natural_accuracy(w, clean, sigma, b) for k, (w, b, _) in models.items()}
    # Theorem 3 on trained models: PGD-AT on the poisoned samples recovers clean accuracy.
    assert acc["AT on D1 (flip)"] > acc["ST on D1 (flip)"] + 0.04
    assert acc["AT on D2 (amplify)"] > acc["ST on D2 (amplify)"] + 0.01
    assert acc["ST on D"] > acc["ST on D1 (flip)"] + 0.06


def test_gaussian_theory_config_runs_through_trainers(tmp_path):
    """The dispatch in `trainers.train_and_evaluate` runs the theory trainer (tiny config)."""
    config = ml_collections.ConfigDict(
        dict(
            trainer="gaussian_theory",
            name="tiny",
            seed=0,
            theory=dict(
                sigma=1.0,
                eta=0.01,
                epsilon=None,
                dims=[1, 100, 10000],
                mc_dims=[100],
                mc_samples=5000,
                full_mc_max_dim=0,
                trained_dims=[],
                train_samples=0,
                train_steps=0,
                learning_rate=0.05,
            ),
        )
    )
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    assert results["complete"] and all(results["theorems"].values())
    assert results["monte_carlo_max_standard_errors"] < 4
    assert (tmp_path / "figure2.png").is_file() and (tmp_path / "config.json").is_file()
    again = trainers.train_and_evaluate(config, tmp_path, progress=False)
    assert again["wall_time_s"] == results["wall_time_s"]  # complete: nothing re-run
