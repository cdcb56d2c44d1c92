"""Minimal perturbations and CLEVER: DeepFool and CW-ℓ2 against the exact distance to an affine
classifier's boundary, CLEVER's Lipschitz estimate against the true constant, and the three
evaluators (`cw_l2`, `deepfool`, `clever`) from config specs on a small trained model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from scipy import stats

from jaxpoison import losses, models, specs, threat
from jaxpoison.attacks import carlini_wagner_l2, deepfool
from jaxpoison.evaluation import EVALUATORS, risk
from jaxpoison.evaluation.clever import clever_scores, fit_reverse_weibull, gradient_maxima
from jaxpoison.train_state import TrainState

pytestmark = pytest.mark.usefixtures("fast_compiles")

N = 12


def affine(num_classes, shape, seed):
    """A random affine classifier, images near the middle of the box (boundaries inside it),
    and the exact ℓ2 and ℓ∞ distances of each image to the nearest boundary."""
    rng = np.random.default_rng(seed)
    dim = int(np.prod(shape))
    w = jnp.asarray(rng.normal(0, 1, (dim, num_classes)), jnp.float32)
    b = jnp.asarray(rng.normal(0, 0.1, num_classes), jnp.float32)
    x = jnp.asarray(rng.uniform(0.35, 0.65, (N, *shape)), jnp.float32)
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w + b  # noqa: E731
    z = np.asarray(logits_fn(x), np.float64)
    y = z.argmax(1)
    wn = np.asarray(w, np.float64)
    d2 = np.full(N, np.inf)
    dinf = np.full(N, np.inf)
    for i in range(N):
        for k in range(num_classes):
            if k != y[i]:
                diff = wn[:, k] - wn[:, y[i]]
                gap = z[i, y[i]] - z[i, k]
                d2[i] = min(d2[i], gap / np.linalg.norm(diff))
                dinf[i] = min(dinf[i], gap / np.abs(diff).sum())
    return logits_fn, x, jnp.asarray(y, jnp.int32), w, {"l2": d2, "linf": dinf}


def assert_adversarial(logits_fn, adv, x, y):
    assert float(jnp.min(adv)) >= 0.0 and float(jnp.max(adv)) <= 1.0
    assert bool(jnp.all(jnp.argmax(logits_fn(adv), -1) != y))


@pytest.mark.parametrize(
    "num_classes, shape, norm", [(2, (4, 4, 3), "l2"), (4, (5, 5, 1), "l2"), (4, (4, 4, 3), "linf")]
)
def test_deepfool_lands_just_past_the_nearest_boundary_of_an_affine_model(num_classes, shape, norm):
    logits_fn, x, y, _, dist = affine(num_classes, shape, seed=num_classes)
    res = jax.jit(lambda x, y: deepfool(logits_fn, x, y, norm=norm))(x, y)
    assert bool(jnp.all(res.found)) and bool(jnp.all(res.steps == 1))
    assert_adversarial(logits_fn, res.adv, x, y)
    # One step of (|f| / ||w||_q + 1e-4), times 1 + overshoot: the closed form |w.x + b| / ||w||.
    expected = 1.02 * (dist[norm] + 1e-4)
    np.testing.assert_allclose(res.norm, expected, rtol=1e-4)
    measured = threat.make(norm=norm, epsilon=1.0).norm_of(res.adv - x)
    np.testing.assert_allclose(measured, res.norm, rtol=1e-5)


def test_cw_finds_the_exact_distance_and_never_much_more_than_deepfool():
    logits_fn, x, y, _, dist = affine(4, (4, 4, 3), seed=7)
    # Adam's first steps move every pixel by about learning_rate / 2, so the default 0.01 would
    # overshoot this model's smallest distances (0.001) for a long while; 0.002 resolves them.
    run = jax.jit(
        lambda x, y, c, steps: carlini_wagner_l2(
            logits_fn, x, y, num_steps=300, search_steps=steps, initial_const=c, learning_rate=2e-3
        ),
        static_argnums=3,
    )
    res = run(x, y, 0.01, 6)
    assert bool(jnp.all(res.found))
    assert_adversarial(logits_fn, res.adv, x, y)
    measured = jnp.linalg.norm((res.adv - x).reshape(N, -1), axis=1)
    np.testing.assert_allclose(res.norm, measured, rtol=1e-5)
    # Never inside the exact distance (the point is misclassified), within 5 % of it.
    ratio = np.asarray(res.norm) / dist["l2"]
    assert np.all(ratio >= 1 - 1e-4) and np.all(ratio <= 1.05) and np.median(ratio) <= 1.01
    fool = jax.jit(lambda x, y: deepfool(logits_fn, x, y))(x, y)
    assert np.all(res.norm <= fool.norm * 1.01)
    # With c far too small for one search step the distance term wins: nothing is found beyond
    # the reach of Adam's first steps, and x and an infinite norm are returned there.
    none = run(x, y, 1e-6, 1)
    far = dist["l2"] > 0.01
    assert far.sum() >= N - 2 and not bool(jnp.any(none.found[far]))
    np.testing.assert_array_equal(none.adv[~none.found], x[~none.found])
    assert bool(jnp.all(jnp.isinf(none.norm[~none.found])))


def test_reverse_weibull_fit_recovers_the_location():
    sample = stats.weibull_max(3.0, loc=2.0, scale=0.5).rvs(200, random_state=0)
    loc, shape, scale, p = fit_reverse_weibull(sample)
    assert loc >= sample.max() and abs(loc / 2.0 - 1.0) < 0.05
    assert p > 0.05 and 1.5 < shape < 6.0
    # Equal maxima (an affine margin): the largest sample, with no fit.
    assert fit_reverse_weibull(np.full(10, 1.5))[:2] == (1.5, pytest.approx(np.nan, nan_ok=True))


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_clever_lipschitz_estimate_of_an_affine_model_is_the_true_constant(norm):
    logits_fn, x, y, w, dist = affine(3, (4, 4, 1), seed=3)
    tm = threat.make(norm=norm, epsilon=0.2)
    maxima, margins, pred = jax.jit(
        lambda x: gradient_maxima(
            logits_fn, x, key=jax.random.key(0), threat=tm, num_batches=8, num_samples=16
        )
    )(x)
    assert maxima.shape == (N, 8, 3)
    np.testing.assert_array_equal(pred, y)
    scores, lipschitz = clever_scores(maxima, margins, pred, radius=tm.epsilon)
    wn = np.asarray(w, np.float64)
    for i in range(N):
        for j in range(3):
            if j == int(y[i]):
                continue
            diff = wn[:, y[i]] - wn[:, j]
            true = np.linalg.norm(diff) if norm == "l2" else np.abs(diff).sum()
            np.testing.assert_allclose(lipschitz[i, j], true, rtol=1e-4)
    # CLEVER-u of an affine model: the exact distance to the nearest boundary, capped at R.
    np.testing.assert_allclose(scores.min(1), np.minimum(dist[norm], tm.epsilon), rtol=1e-4)


def test_clever_on_a_tanh_network_stays_below_its_lipschitz_bound():
    """∇(z_c - z_j) = W1 diag(tanh') (v_c - v_j), so ||W1||_op ||v_c - v_j|| bounds it."""
    rng = np.random.default_rng(1)
    w1 = jnp.asarray(rng.normal(0, 0.5, (16, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(0, 1, (8, 3)), jnp.float32)
    logits_fn = lambda z: jnp.tanh(z.reshape(z.shape[0], -1) @ w1 - 2.0) @ v  # noqa: E731
    x = jnp.asarray(rng.uniform(0.2, 0.8, (4, 4, 4, 1)), jnp.float32)
    tm = threat.make(norm="l2", epsilon=1.0)
    maxima, margins, pred = jax.jit(
        lambda x: gradient_maxima(
            logits_fn, x, key=jax.random.key(1), threat=tm, num_batches=30, num_samples=32
        )
    )(x)
    _, lipschitz = clever_scores(maxima, margins, pred, radius=tm.epsilon)
    op = np.linalg.norm(np.asarray(w1), 2)
    for i, c in enumerate(np.asarray(pred)):
        for j in range(3):
            if j != c:
                bound = op * np.linalg.norm(np.asarray(v[:, c] - v[:, j]))
                assert maxima[i, :, j].max() <= lipschitz[i, j] <= bound * 1.05


@pytest.fixture(scope="module")
def trained():
    """A linear 4-class model fitted to class means on 4x4x3 images, as a 2-seed TrainState."""

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(4)(x.reshape(x.shape[0], -1))

    rng = np.random.default_rng(0)
    means = rng.uniform(0.4, 0.6, (4, 4, 4, 3))
    y = jnp.asarray(rng.integers(0, 4, 24), jnp.int32)
    x = jnp.asarray(np.clip(means[y] + rng.normal(0, 0.03, (24, 4, 4, 3)), 0, 1), jnp.float32)
    module = Linear()
    apply_fn = models.make_apply_fn(module)
    params = models.init(module, jax.random.key(0), (4, 4, 3))["params"]
    opt = optax.adam(0.05)

    def step(carry, _):
        p, s = carry
        loss = lambda q: losses.cross_entropy(apply_fn({"params": q}, x, train=False)[0], y).mean()  # noqa: E731
        u, s = opt.update(jax.grad(loss)(p), s)
        return (optax.apply_updates(p, u), s), None

    params = jax.lax.scan(step, (params, opt.init(params)), length=60)[0][0]
    other = jax.tree.map(lambda a: a * 0.5, params)  # a second "seed": same boundaries, z / 2
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
    state = TrainState(jnp.zeros((2,), jnp.int32), stacked, {}, ())
    return apply_fn, state, x, y


def test_evaluators_from_config_specs(trained):
    apply_fn, state, x, y = trained
    config = ml_collections.ConfigDict({"threat": {"norm": "l2", "epsilon": 0.1}})
    evals = {
        "cw": dict(
            name="cw_l2", num_steps=200, search_steps=5, initial_const=0.01, learning_rate=2e-3
        ),
        "df": dict(name="deepfool", num_steps=10),
        "clever": dict(name="clever", num_batches=4, num_samples=8, skip=2),
    }
    out = {}
    for label, spec in evals.items():
        spec = specs.evaluator(config, spec)  # fills norm and epsilon from config.threat
        assert spec["epsilon"] == 0.1 and spec["norm"] == "l2"
        name = spec.pop("name")
        ev = risk.make(name, apply_fn=apply_fn, num_classes=4, batch_size=16, **spec)
        out[label] = jax.device_get(ev(state, x, y, key=jax.random.key(2)))
    logits = apply_fn({"params": jax.tree.map(lambda a: a[0], state.params)}, x, train=False)[0]
    correct = np.asarray(jnp.argmax(logits, -1) == y)
    assert correct.mean() > 0.8, "the model must be accurate for the comparison to bite"
    df, cw, cl = out["df"], out["cw"], out["clever"]
    for m in (df, cw):
        np.testing.assert_allclose(m["acc/D"], [correct.mean()] * 2, atol=1e-6)
        np.testing.assert_array_equal(m["found"], [1.0, 1.0])
        # Halving the logits moves no boundary: both seeds have the same norms.
        np.testing.assert_allclose(m["norm/median"][0], m["norm/median"][1], rtol=2e-2)
        assert m["acc/robust"][0] <= m["acc/D"][0]
    assert cw["norm/median"][0] <= df["norm/median"][0] * 1.01
    assert df["norm/median"][0] <= cw["norm/median"][0] * 1.05
    # acc/robust from DeepFool's own norms, recomputed here.
    variables = {"params": jax.tree.map(lambda a: a[0], state.params)}
    fool = deepfool(lambda z: apply_fn(variables, z, train=False)[0], x, y, num_steps=10)
    robust = np.mean(correct & ~(np.asarray(fool.norm) <= 0.1))
    np.testing.assert_allclose(df["acc/robust"][0], robust, atol=1e-6)
    # CLEVER-u of a linear model is its exact distance capped at 0.1 (DeepFool's / 1.02).
    sub = correct[::2]
    expect = np.minimum(np.asarray(fool.norm)[::2][sub] / 1.02 - 1e-4, 0.1)
    np.testing.assert_allclose(cl["clever_u/mean"][0], expect.mean(), rtol=1e-3)
    assert cl["n"][0] == len(sub) and np.all(cl["clever_t/least/mean"] >= cl["clever_u/mean"])


def test_refusals():
    kw = dict(apply_fn=None, num_classes=4)
    assert {"cw_l2", "deepfool", "clever"} <= set(EVALUATORS)
    with pytest.raises(ValueError, match="^cw_l2 measures l2 norms.*norm='l2'"):
        risk.make("cw_l2", epsilon=8 / 255, **kw)
    with pytest.raises(ValueError, match="^clever needs a radius"):
        risk.make("clever", **kw)
    with pytest.raises(ValueError, match="num_batches=2 is too few"):
        risk.make("clever", epsilon=0.5, num_batches=2, **kw)
    with pytest.raises(ValueError, match="num_candidates=1 must be >= 2"):
        risk.make("deepfool", epsilon=0.5, num_candidates=1, **kw)
    with pytest.raises(ValueError, match="^cw_l2: search_steps=0 must be a whole number >= 1"):
        risk.make("cw_l2", norm="l2", epsilon=0.5, search_steps=0, **kw)
    with pytest.raises(ValueError, match="^cw_l2: learning_rate=0.0 .* must be > 0"):
        risk.make("cw_l2", norm="l2", epsilon=0.5, learning_rate=0.0, **kw)
    with pytest.raises(ValueError, match="^deepfool: overshoot=-0.1 must be >= 0"):
        risk.make("deepfool", epsilon=0.5, overshoot=-0.1, **kw)
    risk.make("deepfool", norm="linf", epsilon=8 / 255, **kw)
