"""Randomized smoothing (`jaxpoison.evaluation.smoothing`) and the ``gaussian_noise`` objective.

Checked against the closed form of a linear binary classifier f(x) = [w·x + b > 0]: under
N(0, σ² I) noise, P(f(x + ε) = 1) = Φ((w·x + b) / (σ ||w||)), so the exact smoothed radius
σ Φ⁻¹(p_A) is the distance |w·x + b| / ||w|| to the hyperplane. The Monte-Carlo certificate must
lie below it and close to it; the vote frequencies must match Φ; the Clopper–Pearson bound must
have binomial tail α; PREDICT abstains on the hyperplane; the evaluator's certified accuracies
count the points whose distance exceeds each radius.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxpoison import losses, objectives
from jaxpoison.evaluation import risk, smoothing

pytestmark = pytest.mark.usefixtures("fast_compiles")

SHAPE = (4, 4, 1)
SIGMA = 0.5
W = np.random.default_rng(0).normal(size=16).astype(np.float32)
B = 0.3


def linear_apply(variables, x, *, train):
    """Logits [0, w·x + b] of the linear binary classifier (its variables are ignored)."""
    del variables, train
    score = x.reshape(x.shape[0], -1) @ W + B
    return jnp.stack([jnp.zeros_like(score), score], axis=-1), {}


def at_signed_distance(distances):
    """Images whose signed distance to the hyperplane w·x + b = 0 is `distances` (class 1 > 0)."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(len(distances), 16)).astype(np.float32)
    unit = W / np.linalg.norm(W)
    on_plane = base - ((base @ W + B) / np.linalg.norm(W))[:, None] * unit
    points = on_plane + np.asarray(distances, np.float32)[:, None] * unit
    return points.reshape(-1, *SHAPE)


def test_counts_follow_phi_and_sum_to_n():
    distances = np.array([-1.0, 0.0, 0.3, 1.2])
    x = at_signed_distance(distances)
    kw = dict(sigma=SIGMA, num=3000, num_classes=2, batch_size=256)  # 3000 = 11 full batches + 184
    counts = np.asarray(smoothing.noise_counts(linear_apply, {}, x, key=jax.random.key(0), **kw))
    np.testing.assert_array_equal(counts.sum(-1), 3000)
    p1 = stats.norm.cdf(distances / SIGMA)
    np.testing.assert_allclose(counts[:, 1] / 3000, p1, atol=4 * np.sqrt(0.25 / 3000))
    again = smoothing.noise_counts(linear_apply, {}, x, key=jax.random.key(0), **kw)
    np.testing.assert_array_equal(again, counts)


def test_clopper_pearson_lower_bound_has_binomial_tail_alpha():
    n, alpha = 1000, 0.001
    n_a = np.array([0, 1, 500, 990, 1000])
    lower = smoothing.lower_confidence_bound(n_a, n, alpha)
    assert lower[0] == 0 and np.all(np.diff(lower) > 0) and np.all(lower < n_a / n + 1e-12)
    # The exact bound p solves P(Bin(n, p) >= n_a) = α.
    np.testing.assert_allclose(stats.binom.sf(n_a[1:] - 1, n, lower[1:]), alpha, rtol=1e-6)


def test_certified_radius_is_below_and_close_to_the_distance_to_the_hyperplane():
    distances = np.array([0.1, 0.4, 0.75, 1.0, -0.5, -1.2])
    x = at_signed_distance(distances)
    classes, radius = smoothing.certify(
        linear_apply,
        {},
        x,
        key=jax.random.key(2),
        sigma=SIGMA,
        num_classes=2,
        n0=100,
        n=20_000,
        alpha=0.001,
        batch_size=2000,
    )
    np.testing.assert_array_equal(classes, (distances > 0).astype(int))
    exact = np.abs(distances)
    assert np.all(radius <= exact), (radius, exact)
    # Close: the bound's slack (3.1 sd of the vote share at α = 0.001) plus the draw's own
    # deviation (under 4 sd), taken through σ Φ⁻¹.
    p_a = stats.norm.cdf(exact / SIGMA)
    floor = SIGMA * stats.norm.ppf(p_a - 7 * np.sqrt(p_a * (1 - p_a) / 20_000))
    assert np.all(radius >= floor), (radius, floor)
    assert np.all(exact - floor < 0.2 * SIGMA)  # and that floor is tight
    # On the hyperplane p_A = 1/2: the lower bound falls below 1/2 and CERTIFY abstains.
    on_plane = at_signed_distance([0.0])
    classes, radius = smoothing.certify(
        linear_apply, {}, on_plane, key=jax.random.key(3), sigma=SIGMA, num_classes=2
    )
    assert classes[0] == smoothing.ABSTAIN and radius[0] == 0.0


def test_predict_abstains_on_the_hyperplane_and_answers_far_from_it():
    x = at_signed_distance([0.0, 1.0, -1.0])
    kw = dict(key=jax.random.key(4), sigma=SIGMA, num_classes=2, n=2000, alpha=0.001)
    np.testing.assert_array_equal(smoothing.predict(linear_apply, {}, x, **kw), [-1, 1, 0])


@flax.struct.dataclass
class SeedStates:
    """What an evaluator reads of a `TrainState`: params and model state, a leading seed axis."""

    params: jax.Array
    model_state: dict


def test_evaluator_counts_points_beyond_each_radius():
    # Distances away from the radii, so the Monte-Carlo slack cannot move a point across one;
    # the last point is labelled wrongly and never counts; skip=2 drops the points in between.
    distances = np.array([0.1, 9.0, 0.4, 9.0, 0.75, 9.0, 1.5, 9.0, -0.8])
    x = at_signed_distance(distances)
    y = (distances > 0).astype(np.int32)
    y[-1] = 1
    evaluator = risk.make(
        "smoothing",
        apply_fn=linear_apply,
        num_classes=2,
        sigma=SIGMA,
        n=5000,
        radii=(0.0, 0.25, 0.5, 1.0),
        skip=2,
        batch_size=1000,
    )
    states = SeedStates(params=np.zeros((2, 1), np.float32), model_state={})  # 2 seeds
    out = evaluator(states, x, y, key=jax.random.key(5))
    np.testing.assert_array_equal(out["n"], [5, 5])
    for r, expected in [(0.0, 4), (0.25, 3), (0.5, 2), (1.0, 1)]:
        np.testing.assert_allclose(out[f"acc/certified@{r:g}"], [expected / 5] * 2)
    np.testing.assert_array_equal(out["abstain"], [0.0, 0.0])
    assert np.all(out["radius/mean"] < (0.1 + 0.4 + 0.75 + 1.5) / 5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="n=0 must be a whole number"):
        smoothing.make_smoothing(apply_fn=linear_apply, num_classes=2, n=0)
    with pytest.raises(ValueError, match="sigma=0.0 must be > 0"):
        smoothing.make_smoothing(apply_fn=linear_apply, num_classes=2, sigma=0.0)
    with pytest.raises(ValueError, match="sigma=-1 must be a positive noise level"):
        objectives.make("gaussian_noise", sigma=-1)


def test_gaussian_noise_objective_is_cross_entropy_at_the_noisy_batch():
    rng = np.random.default_rng(6)
    batch = {
        "image": jnp.asarray(rng.random((8, *SHAPE)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 2, 8), jnp.int32),
    }
    key = jax.random.key(7)

    def apply_fn(variables, x, *, train):
        assert train
        return x.reshape(x.shape[0], -1) @ variables["params"]["w"], {}

    variables = {"params": {"w": jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)}}
    objective = objectives.make("gaussian_noise", sigma=0.3)
    loss, aux = objective(variables, batch, key, apply_fn=apply_fn)
    noisy = batch["image"] + 0.3 * jax.random.normal(key, batch["image"].shape)
    np.testing.assert_allclose(aux["adversarial"], noisy, rtol=1e-6)
    expected = jnp.mean(
        losses.cross_entropy(apply_fn(variables, noisy, train=True)[0], batch["label"])
    )
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert float(jnp.std(aux["adversarial"] - batch["image"])) == pytest.approx(0.3, rel=0.2)
    # Another key, other noise.
    other, _ = objective(variables, batch, jax.random.key(8), apply_fn=apply_fn)
    assert not np.isclose(float(other), float(loss))
