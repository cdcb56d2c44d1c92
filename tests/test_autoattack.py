"""AutoAttack in JAX: APGD (schedule, ball, strength against PGD), DLR losses, Square, FAB-T
(exact projections, exact distances on an affine model), and the ensemble evaluator (robust
accuracy at most PGD's and at most without FAB-T, nothing flips at ε = 0)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import losses, models, threat
from jaxpoison.attacks import apgd, apgd_targeted, fab_targeted, pgd, square
from jaxpoison.attacks.apgd import apgd_run, checkpoints, dlr, dlr_targeted
from jaxpoison.attacks.fab import project_to_hyperplane
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
    flips = sum(m[f"flips/{a}"][0] for a in ("apgd-ce", "apgd-t", "fab-t", "square"))
    np.testing.assert_allclose(m["acc/D"][0] - flips, m["acc/AA"][0], atol=1e-6)
    accs = [m[f"acc/{a}"][0] for a in ("D", "apgd-ce", "apgd-t", "fab-t", "square")]
    assert accs == sorted(accs, reverse=True)
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
    rand = dict(version="rand", noise_sigma=0.1)
    assert "autoattack" in EVALUATORS
    with pytest.raises(ValueError, match="^autoattack needs a radius"):
        risk.make("autoattack", **kw)
    with pytest.raises(ValueError, match="'apgd-t'.*at least 4 classes.*attacks=\\('apgd-ce'"):
        risk.make("autoattack", epsilon=0.1, **kw)
    with pytest.raises(ValueError, match="must be distinct names among"):
        risk.make("autoattack", epsilon=0.1, attacks=("apgd-ce", "fab"), **kw)
    risk.make("autoattack", epsilon=0.1, attacks=("apgd-ce", "square"), **kw)
    with pytest.raises(ValueError, match="version='rand'.*noise_sigma=0.0; pass noise_sigma > 0"):
        risk.make("autoattack", epsilon=0.1, version="rand", **kw)
    with pytest.raises(ValueError, match="noise_sigma=0.1 makes the model random; use version="):
        risk.make("autoattack", epsilon=0.1, attacks=("apgd-ce",), noise_sigma=0.1, **kw)
    with pytest.raises(ValueError, match="only the EOT attacks.*not \\('square',\\)"):
        risk.make("autoattack", epsilon=0.1, attacks=("apgd-ce", "square"), **kw | rand)
    with pytest.raises(ValueError, match="version='plus' is unknown"):
        risk.make("autoattack", epsilon=0.1, version="plus", **kw)
    risk.make("autoattack", epsilon=0.1, **kw | rand)


def test_fab_projection_is_the_exact_box_constrained_projection():
    rng = np.random.default_rng(8)
    t = rng.uniform(0, 1, (12, 20)).astype(np.float32)
    w = rng.normal(size=(12, 20)).astype(np.float32)
    w[:, :2] = 0.0  # coordinates the hyperplane ignores stay put
    # Half the hyperplanes cut the box, half lie beyond it (then: the closest corner).
    shift = np.where(np.arange(12) < 6, 1.0, 40.0) * rng.choice([-1.0, 1.0], 12)
    b = (w * t).sum(1) + shift.astype(np.float32)
    c = (w * t).sum(1) - b
    against = -np.sign(w) * np.sign(c)[:, None]  # the direction that lowers |w.z - b|
    room = np.where(against > 0, 1 - t, t)
    feasible = np.abs(c) <= (np.abs(w) * room).sum(1)
    assert feasible.sum() == 6
    for norm in ("linf", "l2"):
        d = np.asarray(jax.jit(project_to_hyperplane, static_argnames="norm")(t, w, b, norm=norm))
        assert np.all(t + d >= -1e-6) and np.all(t + d <= 1 + 1e-6)
        np.testing.assert_array_equal(d[:, :2], 0.0)
        np.testing.assert_allclose(((w * (t + d)).sum(1) - b)[feasible], 0.0, atol=1e-4)
        corner = np.where(against > 0, 1.0, 0.0)
        np.testing.assert_allclose((t + d)[~feasible, 2:], corner[~feasible, 2:])
        # Independent solution: bisection on lambda of d_i = against_i min(lambda s_i, room_i).
        s = np.ones_like(w) if norm == "linf" else np.abs(w)
        lo, hi = np.zeros(12), np.full(12, 1e4)
        for _ in range(100):
            mid = (lo + hi) / 2
            enough = (np.abs(w) * np.minimum(mid[:, None] * s, room)).sum(1) >= np.abs(c)
            lo, hi = np.where(enough, lo, mid), np.where(enough, mid, hi)
        want = against * np.minimum(hi[:, None] * s, room) * (w != 0)
        np.testing.assert_allclose(d[feasible], want[feasible], atol=1e-5)


@pytest.mark.parametrize("norm, shape", [("linf", (5, 5, 1)), ("l2", (4, 4, 3))])
def test_fab_finds_the_exact_distance_to_an_affine_decision_boundary(norm, shape):
    """On logits Wx + c the closest misclassified point is at min_k (z_y - z_k) / ||w_y - w_k||_q
    (q the dual norm); FAB-T toward every other class must reach it within 1 %."""
    k = 4
    rng = np.random.default_rng(9)
    dim = int(np.prod(shape))
    w = jnp.asarray(rng.normal(0, 0.3, (dim, k)), jnp.float32)
    bias = jnp.asarray(rng.normal(0, 0.1, k), jnp.float32)
    x = jnp.asarray(rng.uniform(0.4, 0.6, (16, *shape)), jnp.float32)  # the box stays inactive
    logits_fn = lambda z: z.reshape(z.shape[0], -1) @ w + bias  # noqa: E731
    z = logits_fn(x)
    y = jnp.argmax(z, -1)
    gaps = jnp.take_along_axis(z, y[:, None], 1) - z
    normals = w[None] - w[:, y].T[:, :, None]  # [B, D, K]: w_k - w_y
    dual = jnp.linalg.norm(normals, ord=1 if norm == "linf" else 2, axis=1)
    exact = jnp.min(jnp.where(jnp.arange(k) == y[:, None], jnp.inf, gaps / dual), axis=1)
    # At eps = 0 no point is ever fooled, so every target class runs on every point.
    run = jax.jit(
        lambda eps: fab_targeted(
            logits_fn,
            x,
            y,
            key=jax.random.key(0),
            threat=threat.LpBall(epsilon=eps, norm=norm),
            num_steps=20,
            num_targets=k - 1,
        )
    )
    res = run(0.0)
    ratio = np.asarray(res.norm / exact)
    assert np.all(ratio >= 1 - 1e-4) and np.all(ratio <= 1.01), ratio  # measured: 1.0052
    assert not bool(jnp.any(res.fooled))
    tm = threat.make(norm=norm, epsilon=1.0 if norm == "l2" else 0.5)
    np.testing.assert_allclose(tm.norm_of(res.delta), res.norm, rtol=1e-5)
    assert bool(jnp.all(jnp.argmax(logits_fn(x + res.delta), -1) != y))
    assert float(jnp.min(x + res.delta)) >= 0.0 and float(jnp.max(x + res.delta)) <= 1.0
    # At the median distance FAB-T fools exactly the points closer than it (away from the edge).
    eps = float(jnp.median(exact))
    res = run(eps)
    clear = np.abs(np.asarray(exact) / eps - 1) > 0.05
    np.testing.assert_array_equal(np.asarray(res.fooled)[clear], np.asarray(exact <= eps)[clear])
    assert float(jnp.max(jnp.where(res.fooled, tm.norm_of(res.delta), 0.0))) <= eps
    # In the ensemble FAB-T flips the same points: those it fooled within the ball, no others.
    out = jax.jit(
        lambda: autoattack(
            logits_fn,
            x,
            y,
            key=jax.random.key(1),
            threat=threat.make(norm=norm, epsilon=eps),
            num_classes=k,
            attacks=("fab-t",),
            num_steps=20,
            num_targets=k - 1,
        )
    )()
    np.testing.assert_array_equal(out["flipped"]["fab-t"], res.fooled)
    np.testing.assert_array_equal(out["robust"], ~res.fooled)


def test_rand_version_eot_beats_single_draw_apgd_on_a_noisy_model():
    """Under Gaussian input noise (sigma) a high-frequency term w sin(omega x) with omega sigma = 3
    gives each draw's gradient a large random part whose mean is ~0 (e^(-4.5)), while it moves
    the logits little: one draw points APGD astray, the mean of 20 points it along the linear
    part. EOT must leave clearly fewer points robust (same clean draw, same starts)."""
    rng = np.random.default_rng(10)
    dim = 48
    w = jnp.asarray(rng.normal(size=(dim, K)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(dim, K)), jnp.float32)
    x = jnp.asarray(rng.uniform(0.3, 0.7, (N, 4, 4, 3)), jnp.float32)
    y = jnp.argmax((x.reshape(N, -1) - 0.5) @ w, -1)

    def logits_fn(z):
        flat = z.reshape(z.shape[0], -1)
        return (flat - 0.5) @ w + 0.03 * jnp.sin(300.0 * flat) @ v

    tm = threat.make(norm="linf", epsilon=0.015)
    run = jax.jit(
        lambda eot_iter: autoattack(
            logits_fn,
            x,
            y,
            key=jax.random.key(0),
            threat=tm,
            num_classes=K,
            version="rand",
            noise_sigma=0.01,
            eot_iter=eot_iter,
            num_steps=10,
        ),
        static_argnums=0,
    )
    one, eot = run(1), run(20)
    assert set(eot["flipped"]) == {"apgd-ce", "apgd-dlr"}
    np.testing.assert_array_equal(one["correct"], eot["correct"])
    assert float(jnp.mean(eot["correct"])) > 0.75
    robust_one, robust_eot = float(jnp.mean(one["robust"])), float(jnp.mean(eot["robust"]))
    assert robust_eot <= robust_one - 0.08, (robust_one, robust_eot)
    for out in (one, eot):
        in_ball(tm, out["delta"], x)
        assert not bool(jnp.any(out["robust"] & ~out["correct"]))
