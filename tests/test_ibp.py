"""Interval bound propagation: bounds contain every point of the ball (random and PGD points),
are exact on a linear net and collapse at ε = 0; the evaluator's certified accuracy is at most
PGD's robust accuracy; IBP training certifies more than standard training; clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import ibp, losses, models, objectives, threat
from jaxpoison.attacks import pgd
from jaxpoison.evaluation import risk
from jaxpoison.models.layers import Conv, max_pool
from jaxpoison.train_state import TrainState

pytestmark = pytest.mark.usefixtures("fast_compiles")

K, EPS = 3, 0.05


class SmallCNN(nn.Module):
    """Conv (through `jaxpoison.ops`) + BatchNorm + ReLU + max-pool, conv + average pool, dense."""

    @nn.compact
    def __call__(self, x, train=False):
        x = Conv(4, (3, 3), padding="SAME")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = max_pool(nn.relu(x), (2, 2), (2, 2))
        x = nn.avg_pool(nn.relu(Conv(4, (3, 3), padding="VALID")(x)), (2, 2))
        return nn.Dense(K)(jnp.mean(x, axis=(1, 2)))


class Sorted(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(K)(jnp.sort(x.reshape(x.shape[0], -1), axis=-1))


def _setup(module, shape, seed):
    variables = models.init(module, jax.random.key(seed), shape)
    if "batch_stats" in variables:  # running statistics away from (0, 1), so BatchNorm matters
        stats = variables["batch_stats"]
        keys = iter(jax.random.split(jax.random.key(seed + 1), 8))
        variables["batch_stats"] = jax.tree.map(
            lambda a: a + jax.random.uniform(next(keys), a.shape, minval=0.1, maxval=0.5), stats
        )
    apply_fn = models.make_apply_fn(module)
    x = jax.random.uniform(jax.random.key(seed + 2), (8, *shape))
    return apply_fn, variables, x, jnp.arange(8) % K


@pytest.fixture(
    scope="module",
    params=[
        (models.MLP(num_classes=K, hidden=(16, 16)), (6, 6, 1)),
        (SmallCNN(), (8, 8, 3)),
    ],
    ids=["mlp_1ch", "cnn_bn_pool_3ch"],
)
def net(request):
    module, shape = request.param
    apply_fn, variables, x, y = _setup(module, shape, 0)
    logits_fn = lambda images: apply_fn(variables, images, train=False)[0]  # noqa: E731

    @jax.jit
    def bounds_and_margins(x, y, eps):
        spec = ibp.margin_spec(y, K)
        return (
            ibp.bounds(logits_fn, x, eps),
            ibp.margin_bounds(logits_fn, x, spec, eps),
            ibp.margin_bounds(logits_fn, x, spec, eps, elide=False),
        )

    return logits_fn, bounds_and_margins, x, y


def _margins(logits, y):
    return jnp.take_along_axis(logits, y[:, None], axis=1) - logits


def test_bounds_contain_random_and_pgd_points(net):
    logits_fn, bounds_and_margins, x, y = net
    box, margins, plain = bounds_and_margins(x, y, EPS)
    tm = threat.make(epsilon=EPS)
    signs = jax.vmap(lambda k: jnp.sign(jax.random.normal(k, x.shape)))(
        jax.random.split(jax.random.key(1), 8)
    )
    corners = jax.vmap(lambda d: tm.project(EPS * d, x))(signs)
    # PGD pushing each logit up and down, and each margin z_y - z_j down: points near the bounds.
    eye = jnp.eye(K)
    directions = jnp.concatenate([eye, -eye])[:, None].repeat(len(x), 1)
    directions = jnp.concatenate([directions, eye[:, None] - eye[y][None]])  # [3K, B, K]

    @jax.jit
    def attack(c):
        loss_fn = lambda z, t: jnp.sum(logits_fn(z) * c, -1)  # noqa: E731
        return pgd(loss_fn, x, y, key=jax.random.key(2), threat=tm, num_steps=10, step_size=EPS / 4)

    deltas = jnp.concatenate([corners, jax.lax.map(attack, directions)])
    assert float(jnp.max(jnp.abs(deltas))) <= EPS + 1e-6
    z = jax.jit(jax.vmap(lambda d: logits_fn(x + d)))(deltas)
    tol = 1e-4
    assert bool(jnp.all(box.lower - tol <= z)) and bool(jnp.all(z <= box.upper + tol))
    m = jax.vmap(_margins, in_axes=(0, None))(z, y)
    assert bool(jnp.all(margins.lower - tol <= m)) and bool(jnp.all(m <= margins.upper + tol))
    # PGD comes close to the elided margin bounds somewhere (they are not vacuous).
    gap = jnp.where(jax.nn.one_hot(y, K, dtype=bool), jnp.inf, m.min(0) - margins.lower)
    assert float(jnp.min(gap)) < 0.5 * float(jnp.mean(margins.upper - margins.lower))
    # Eliding the last layer is at least as tight as bounding the logits first, and tighter here.
    assert bool(jnp.all(margins.lower >= plain.lower - tol))
    assert float(jnp.mean(margins.lower - plain.lower)) > 1e-3
    # Without elision the margin's lower bound is l_y - u_j (j != y; row y is the zero spec).
    own = jax.nn.one_hot(y, K, dtype=bool)
    naive = jnp.where(own, 0.0, jnp.take_along_axis(box.lower, y[:, None], 1) - box.upper)
    np.testing.assert_allclose(plain.lower, naive, atol=1e-5)
    assert float(jnp.min(box.upper - box.lower)) > 0


def test_bounds_collapse_to_the_logits_at_radius_zero(net):
    logits_fn, bounds_and_margins, x, y = net
    box, margins, _ = bounds_and_margins(x, y, 0.0)
    z = logits_fn(x)
    np.testing.assert_allclose(box.lower, z, atol=1e-5)
    np.testing.assert_allclose(box.upper, z, atol=1e-5)
    np.testing.assert_allclose(margins.lower, _margins(z, y), atol=1e-5)


def test_linear_net_bounds_equal_the_exact_bounds():
    """z = x W + b over a box: the extremes are at its vertices, sum_i min/max(W_ik l_i, W_ik u_i);
    the margins z_y - z_j likewise with the columns w_y - w_j (elision: exact, not just sound)."""
    module = nn.Dense(K)
    shape = (5,)
    params = module.init(jax.random.key(3), jnp.zeros((1, *shape)))["params"]
    w, b = params["kernel"], params["bias"]
    x = jnp.array([[0.0, 0.02, 0.5, 0.99, 1.0], [0.3, 0.7, 0.1, 0.9, 0.5]])  # some at the box edge
    y = jnp.array([0, 2])
    eps = 0.1
    logits_fn = lambda images: module.apply({"params": params}, images)  # noqa: E731
    lo, hi = jnp.clip(x - eps, 0, 1), jnp.clip(x + eps, 0, 1)

    def exact(cols, offset):  # [B, D] box, [D, J] columns
        a, c = lo[:, :, None] * cols, hi[:, :, None] * cols
        return jnp.minimum(a, c).sum(1) + offset, jnp.maximum(a, c).sum(1) + offset

    box = ibp.bounds(logits_fn, x, eps)
    want_lo, want_hi = exact(w[None], b)
    np.testing.assert_allclose(box.lower, want_lo, atol=1e-6)
    np.testing.assert_allclose(box.upper, want_hi, atol=1e-6)
    diff = w[:, y].T[:, :, None] - w[None]  # [B, D, K]: w_y - w_j
    m_lo, m_hi = jax.vmap(
        lambda d, l_, h_, o: (
            jnp.minimum(l_[:, None] * d, h_[:, None] * d).sum(0) + o,
            jnp.maximum(l_[:, None] * d, h_[:, None] * d).sum(0) + o,
        )
    )(diff, lo, hi, b[y][:, None] - b[None])
    margins = ibp.margin_bounds(logits_fn, x, ibp.margin_spec(y, K), eps)
    np.testing.assert_allclose(margins.lower, m_lo, atol=1e-6)
    np.testing.assert_allclose(margins.upper, m_hi, atol=1e-6)


def _separable(n, seed):
    """Two classes of 4x4 one-channel images around 0.3 and 0.7: ℓ∞ distance 0.4 minus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = np.clip(0.3 + 0.4 * y[:, None, None, None] + rng.normal(0, 0.03, (n, 4, 4, 1)), 0, 1)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.int32)


@pytest.fixture(scope="module")
def trained():
    """An MLP trained on `_separable` by standard training and by IBP training (same steps)."""
    module = models.MLP(num_classes=2, hidden=(32,))
    apply_fn = models.make_apply_fn(module)
    x, y = _separable(64, 0)
    variables = models.init(module, jax.random.key(0), (4, 4, 1))
    steps, opt = 60, optax.adam(0.02)

    def fit(objective):
        def step(carry, i):
            params, opt_state = carry
            batch = {"image": x, "label": y, "progress": i / steps}
            grads, aux = jax.grad(
                lambda p: objective({"params": p}, batch, jax.random.key(0), apply_fn=apply_fn),
                has_aux=True,
            )(params)
            updates, opt_state = opt.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), aux["metrics"]["loss"]

        carry = (variables["params"], opt.init(variables["params"]))
        return jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(steps)))(carry)[0][0]

    ibp_objective = objectives.make("ibp", epsilon=0.12, warmup=0.1, ramp=0.5, kappa_end=0.5)
    return apply_fn, fit(objectives.make("erm")), fit(ibp_objective), _separable(64, 1)


def _evaluate(apply_fn, params, x, y, eps):
    state = TrainState(jnp.zeros((1,), jnp.int32), jax.tree.map(lambda a: a[None], params), {}, ())
    ev = risk.make("ibp", apply_fn=apply_fn, num_classes=2, epsilon=eps, batch_size=32)
    return jax.device_get(ev(state, x, y, key=jax.random.key(0)))


def test_certified_accuracy_below_pgd_below_clean(trained):
    apply_fn, erm_params, ibp_params, (x, y) = trained
    eps = 0.1
    for params in (erm_params, ibp_params):
        m = _evaluate(apply_fn, params, x, y, eps)
        logits_fn = lambda z, p=params: apply_fn({"params": p}, z, train=False)[0]  # noqa: E731
        tm = threat.make(epsilon=eps)
        loss_fn = lambda z, t, f=logits_fn: losses.cross_entropy(f(z), t)  # noqa: E731
        delta = pgd(
            loss_fn, x, y, key=jax.random.key(1), threat=tm, num_steps=20, step_size=eps / 4
        )
        acc_pgd = float(jnp.mean(jnp.argmax(logits_fn(x + delta), -1) == y))
        clean = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))
        np.testing.assert_allclose(m["acc/D"][0], clean, atol=1e-6)
        assert m["acc/IBP"][0] <= acc_pgd + 1e-6 <= clean + 2e-6
        np.testing.assert_allclose(m["err/IBP"][0], 1 - m["acc/IBP"][0], atol=1e-6)


def test_ibp_training_certifies_more_than_standard_training(trained):
    apply_fn, erm_params, ibp_params, (x, y) = trained
    erm = _evaluate(apply_fn, erm_params, x, y, 0.1)
    robust = _evaluate(apply_fn, ibp_params, x, y, 0.1)
    assert robust["acc/D"][0] > 0.9 and erm["acc/D"][0] > 0.9
    assert robust["acc/IBP"][0] > 0.9 and robust["acc/IBP"][0] > erm["acc/IBP"][0] + 0.3


def test_objective_schedules_and_batchnorm_model():
    apply_fn, variables, x, y = _setup(SmallCNN(), (8, 8, 3), 5)
    objective = objectives.make("ibp", epsilon=0.1, warmup=0.2, ramp=0.4, kappa_end=0.25)

    @jax.jit
    def run(progress):
        batch = {"image": x, "label": y, "progress": progress}
        fn = lambda p: objective(
            {**variables, "params": p}, batch, jax.random.key(0), apply_fn=apply_fn
        )  # noqa: E731
        return jax.value_and_grad(fn, has_aux=True)(variables["params"])

    for progress, eps, kappa in [(0.1, 0.0, 1.0), (0.4, 0.05, 0.625), (0.9, 0.1, 0.25)]:
        (loss, aux), grads = run(jnp.float32(progress))
        metrics = aux["metrics"]
        np.testing.assert_allclose(metrics["epsilon"], eps, atol=1e-6)
        np.testing.assert_allclose(metrics["kappa"], kappa, atol=1e-6)
        assert np.isfinite(float(loss)) and all(
            np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)
        )
        assert jax.tree.structure(aux["model_state"]) == jax.tree.structure(
            {"batch_stats": variables["batch_stats"]}
        )
    # At the end of the ramp the verified loss counts, and it bounds the clean one from above.
    assert float(metrics["ibp_loss"]) >= float(
        jnp.mean(losses.cross_entropy(apply_fn(variables, x, train=False)[0], y))
    )


def test_unsupported_primitive_and_bad_arguments_give_one_clear_error():
    apply_fn, variables, x, y = _setup(Sorted(), (4, 4, 1), 0)
    logits_fn = lambda images: apply_fn(variables, images, train=False)[0]  # noqa: E731
    with pytest.raises(ibp.UnboundedPrimitiveError, match=r"cannot bound `sort`.*test_ibp.py"):
        ibp.bounds(logits_fn, x, 0.1)
    state = TrainState(
        jnp.zeros((1,), jnp.int32), jax.tree.map(lambda a: a[None], variables["params"]), {}, ()
    )
    ev = risk.make("ibp", apply_fn=apply_fn, num_classes=K, epsilon=0.1)
    with pytest.raises(ibp.UnboundedPrimitiveError, match="cannot bound `sort`"):
        ev(state, x, y, key=jax.random.key(0))
    with pytest.raises(ValueError, match="linf ball, got norm='l2'"):
        risk.make("ibp", apply_fn=apply_fn, num_classes=K, norm="l2", epsilon=0.5)
    with pytest.raises(ValueError, match="^ibp needs a radius"):
        objectives.make("ibp")
    with pytest.raises(ValueError, match="linf ball, got norm='l2'"):
        objectives.make("ibp", norm="l2", epsilon=0.5)
    with pytest.raises(ValueError, match=r"kappa_end=1.5 must lie in \[0, 1\]"):
        objectives.make("ibp", epsilon=0.1, kappa_end=1.5)
    with pytest.raises(ValueError, match="warmup \\+ ramp = 0.6 \\+ 0.6 > 1"):
        objectives.make("ibp", epsilon=0.1, warmup=0.6, ramp=0.6)
