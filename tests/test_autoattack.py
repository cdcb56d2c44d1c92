"""AutoAttack in JAX: APGD (schedule, ball, strength against PGD), DLR losses, Square, and the
ensemble evaluator (robust accuracy at most PGD's, nothing flips at ε = 0)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import losses, models, threat
from jaxpoison.attacks import apgd, apgd_targeted, pgd, square
from jaxpoison.attacks.apgd import apgd_run, checkpoints, dlr, dlr_targeted
from jaxpoison.attacks.square import margin
from jaxpoison.evaluation import EVALUATORS, risk
from jaxpoison.evaluation.autoattack import autoattack
from jaxpoison.train_state import TrainState

pytestmark = pytest.mark.usefixtures("fast_compiles")

K, N, SHAPE = 10, 48, (6, 6, 3)
RADII = {"linf": 8 / 255, "l2": 0.5}


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(K)(x.reshape(x.shape[0], -1))


def make_data(seed, shape=SHAPE):
    """Images near one random mean per class: a linear model learns them, not robustly."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.45, 0.55, (K, *shape))
    y = rng.integers(0, K, N)
    x = np.clip(means[y] + rng.normal(0, 0.02, (N, *shape)), 0, 1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


@pytest.fixture(scope="module")
def trained():
    """A linear model trained to fit `make_data(0)` (full-batch Adam), and its logits function."""
    module = Linear()
    x, y = make_data(0)
    params = models.init(module, jax.random.key(0), SHAPE)["params"]
    apply_fn = models.make_apply_fn(module)
    opt = optax.adam(0.05)

    def step(carry, _):
        p, s = carry
        loss = lambda q: losses.cross_entropy(apply_fn({"params": q}, x, train=False)[0], y).mean()  # noqa: E731
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s)
        return (optax.apply_updates(p, u), s), None

    params = jax.lax.scan(step, (params, opt.init(params)), length=100)[0][0]
    logits_fn = lambda images: apply_fn({"params": params}, images, train=False)[0]  # noqa: E731
    return apply_fn, params, logits_fn, x, y


def in_ball(tm, delta, x):
    assert float(jnp.max(tm.norm_of(delta))) <= tm.epsilon * (1 + 1e-5) + 1e-6
    assert float(jnp.min(x + delta)) >= 0.0 and float(jnp.max(x + delta)) <= 1.0


def test_dlr_losses_on_hand_made_logits():
    z = jnp.array([[3.0, 1.0, 0.0, -1.0], [3.0, 1.0, 0.0, -1.0]])
    # Untargeted: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3).
    np.testing.assert_allclose(dlr(z, jnp.array([0, 1])), [-2.0 / 3.0, 2.0 / 3.0], rtol=1e-6)
    # Targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) = -(3 - 0) / 3.5 and -(1 - (-1)) / 3.5.
    got = dlr_targeted(z, jnp.array([0, 1]), jnp.array([2, 3]))
    np.testing.assert_allclose(got, [-3.0 / 3.5, -2.0 / 3.5], rtol=1e-6)
    # Both are invariant to shifting and scaling the logits.
    np.testing.assert_allclose(dlr_targeted(2 * z + 5, jnp.array([0, 1]), jnp.array([2, 3])), got)
    np.testing.assert_allclose(margin(z, jnp.array([0, 3])), [2.0, -4.0])


def test_checkpoints_follow_the_reference_schedule():
    is_check, window = checkpoints(100)
    # Windows of 22, 19, 16, ... iterations, never under 6: p_j of Croce & Hein's Algorithm 1.
    assert np.flatnonzero(is_check).tolist() == [21, 40, 56, 69, 79, 86, 92, 98]
    assert np.asarray(window)[np.asarray(is_check)].tolist() == [22, 19, 16, 13, 10, 7, 6, 6]


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_apgd_stays_in_the_ball_and_beats_pgd(trained, norm):
    _, _, logits_fn, x, y = trained
    tm = threat.make(norm=norm, epsilon=RADII[norm] / 2)
    loss_fn = lambda z, t: losses.cross_entropy(logits_fn(z), t)  # noqa: E731

    @jax.jit
    def attacks(key):
        run = apgd_run(logits_fn, x, y, key=key, threat=tm, num_steps=20)
        d_pgd = pgd(loss_fn, x, y, key=key, threat=tm, num_steps=20, step_size=tm.epsilon / 8)
        return run, loss_fn(x + d_pgd, y)

    run, loss_pgd = attacks(jax.random.key(1))
    in_ball(tm, run.delta, x)
    # The returned point is what it claims: misclassified exactly where `fooled`.
    wrong = jnp.argmax(logits_fn(x + run.delta), -1) != y
    assert bool(jnp.all(wrong[run.fooled]))
    assert float(jnp.mean(run.loss)) >= float(jnp.mean(loss_pgd)) - 1e-4
    assert float(jnp.mean(run.loss)) > float(jnp.mean(loss_fn(x, y)))
    # Same key, same attack; another key, another start.
    np.testing.assert_array_equal(attacks(jax.random.key(1))[0].delta, run.delta)
    assert not np.array_equal(attacks(jax.random.key(2))[0].delta, run.delta)


def test_apgd_on_one_channel_images_and_restarts_only_on_unfooled_points():
    shape = (5, 5, 1)
    x, y = make_data(2, shape)
    w = jax.random.normal(jax.random.key(0), (int(np.prod(shape)), K))
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w  # noqa: E731
    tm = threat.make(norm="linf", epsilon=0.05)
    active = jnp.arange(N) % 2 == 0
    kw = dict(key=jax.random.key(3), threat=tm, num_steps=5)

    @jax.jit
    def attacks():
        res = apgd(logits_fn, x, y, restarts=2, active=active, **kw)
        return res, apgd_targeted(logits_fn, x, y, num_targets=3, **kw)

    res, t = attacks()
    for r in (res, t):
        in_ball(tm, r.delta, x)
        wrong = jnp.argmax(logits_fn(x + r.delta), -1) != y
        assert bool(jnp.all(wrong[r.fooled])) and bool(jnp.any(r.fooled))
    assert not bool(jnp.any(res.fooled[~active]))
    np.testing.assert_array_equal(res.delta[~active], 0.0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_square_stays_in_the_ball_and_only_lowers_the_margin(trained, norm):
    _, _, logits_fn, x, y = trained
    tm = threat.make(norm=norm, epsilon=RADII[norm] / 4)
    run = jax.jit(
        lambda q: square(logits_fn, x, y, key=jax.random.key(4), threat=tm, num_queries=q),
        static_argnums=0,
    )
    start, end = run(0), run(40)
    for r in (start, end):
        in_ball(tm, r.delta, x)
        np.testing.assert_allclose(r.margin, margin(logits_fn(x + r.delta), y), atol=1e-5)
        np.testing.assert_array_equal(r.fooled, r.margin <= 0)
    # The same start (same key), then only changes that lower the margin are kept.
    assert bool(jnp.all(end.margin <= start.margin + 1e-6))
    assert float(jnp.mean(end.margin)) < float(jnp.mean(start.margin))
    assert int(jnp.max(start.queries)) == 1 and int(jnp.max(end.queries)) <= 41


def test_autoattack_is_no_weaker_than_pgd_and_flips_nothing_at_radius_zero(trained):
    apply_fn, params, logits_fn, x, y = trained
    tm = threat.make(norm="linf", epsilon=4 / 255)
    state = TrainState(jnp.zeros((1,), jnp.int32), jax.tree.map(lambda a: a[None], params), {}, ())
    ev = risk.make(
        "autoattack",
        apply_fn=apply_fn,
        num_classes=K,
        threat=tm,
        num_steps=10,
        num_targets=2,
        num_queries=20,
        batch_size=32,
    )
    m = jax.device_get(ev(state, x, y, key=jax.random.key(5)))
    clean = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))
    np.testing.assert_allclose(m["acc/D"][0], clean, atol=1e-6)
    assert clean > 0.9, "the model must be accurate for the comparison to bite"
    loss_fn = lambda z, t: losses.cross_entropy(logits_fn(z), t)  # noqa: E731
    pgd20 = lambda k: pgd(loss_fn, x, y, key=k, threat=tm, num_steps=20, step_size=tm.epsilon / 8)  # noqa: E731
    d_pgd = jax.jit(pgd20)(jax.random.key(6))
    acc_pgd = float(jnp.mean(jnp.argmax(logits_fn(x + d_pgd), -1) == y))
    assert m["acc/AA"][0] <= acc_pgd + 1e-6
    assert m["acc/AA"][0] < clean
    flips = sum(m[f"flips/{a}"][0] for a in ("apgd-ce", "apgd-t", "square"))
    np.testing.assert_allclose(m["acc/D"][0] - flips, m["acc/AA"][0], atol=1e-6)
    assert m["acc/D"][0] >= m["acc/apgd-ce"][0] >= m["acc/apgd-t"][0] >= m["acc/square"][0]
    # At radius 0 no point moves, so exactly the clean mistakes remain.
    out = jax.jit(
        autoattack,
        static_argnums=0,
        static_argnames=("num_classes", "num_steps", "num_targets", "num_queries"),
    )(
        logits_fn,
        x,
        y,
        key=jax.random.key(7),
        threat=threat.make(epsilon=0.0),
        num_classes=K,
        num_steps=3,
        num_targets=1,
        num_queries=5,
    )
    np.testing.assert_array_equal(out["robust"], out["correct"])
    assert not any(bool(jnp.any(f)) for f in out["flipped"].values())


def test_autoattack_refusals():
    kw = dict(apply_fn=None, num_classes=3)
    assert "autoattack" in EVALUATORS
    with pytest.raises(ValueError, match="^autoattack needs a radius"):
        risk.make("autoattack", **kw)
    with pytest.raises(ValueError, match="'apgd-t'.*at least 4 classes.*attacks=\\('apgd-ce'"):
        risk.make("autoattack", epsilon=0.1, **kw)
    with pytest.raises(ValueError, match="must be distinct names among"):
        risk.make("autoattack", epsilon=0.1, attacks=("apgd-ce", "fab-t"), **kw)
    risk.make("autoattack", epsilon=0.1, attacks=("apgd-ce", "square"), **kw)
