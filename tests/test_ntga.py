"""NTGA (`jaxpoison.poisons.ntga`) and the empirical NTK it is built on (`jaxpoison.ntk`).

Checked against independent computations: the kernel equals J Jᵀ from `jax.jacobian` (traced
over the logits, chunked or not), the kernel predictor equals an explicit ridge solve at t = ∞
and the first-order expansion at small t; one crafting step raises the target loss of the
predictor recomputed here from the kernels; the poison keeps its bound, the [0, 1] box and the
labels, draws the same poison from the same key and resumes a killed craft exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import models, ntk, poisons, threat

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 4
N = 16
MODEL = {"name": "mlp", "width": 1.0, "hidden": (16,)}


def tiny_mlp(num_outputs, shape=(4, 4, 2)):
    module = models.make("mlp", num_classes=num_outputs, hidden=(8, 8))
    params = module.init(jax.random.key(0), jnp.zeros((1, *shape)))["params"]
    return (lambda p, x: module.apply({"params": p}, x)), params


def test_empirical_ntk_equals_explicit_jacobian_product():
    apply_fn, params = tiny_mlp(3)
    x1 = jax.random.uniform(jax.random.key(1), (5, 4, 4, 2))
    x2 = jax.random.uniform(jax.random.key(2), (7, 4, 4, 2))

    def flat_jacobian(x):  # [n, K, P] from jax.jacobian of the whole batch's logits
        jac = jax.jacobian(apply_fn)(params, x)
        leaves = [leaf.reshape(x.shape[0], 3, -1) for leaf in jax.tree.leaves(jac)]
        return jnp.concatenate(leaves, axis=-1)

    j1, j2 = jax.jit(flat_jacobian)(x1), jax.jit(flat_jacobian)(x2)
    expected = np.einsum("ikp,jkp->ij", j1, j2) / 3
    kernel = jax.jit(ntk.empirical_ntk, static_argnums=0, static_argnames="chunk_size")
    np.testing.assert_allclose(kernel(apply_fn, params, x1, x2), expected, rtol=1e-5)
    # Chunks that divide neither side (padding) give the same kernel.
    chunked = kernel(apply_fn, params, x1, x2, chunk_size=3)
    np.testing.assert_allclose(chunked, expected, rtol=1e-5)


def test_kernel_regression_limits():
    regression = jax.jit(ntk.kernel_regression, static_argnames=("t", "diag_reg"))
    a = jax.random.normal(jax.random.key(0), (6, 9))
    k_train = a @ a.T
    k_test = jax.random.normal(jax.random.key(1), (3, 9)) @ a.T
    y = jax.nn.one_hot(jnp.arange(6) % 2, 2)
    reg = 1e-2 * jnp.mean(jnp.diag(k_train))
    ridge = k_test @ np.linalg.solve(k_train + reg * jnp.eye(6), y)
    np.testing.assert_allclose(regression(k_train, k_test, y, diag_reg=1e-2), ridge, rtol=1e-4)
    np.testing.assert_allclose(
        regression(k_train, k_test, y, t=1e7, diag_reg=1e-2), ridge, rtol=1e-3
    )
    # Early in the flow f(t) ≈ t / (n k) Θ_tx Y (one gradient step on the MSE from f = 0).
    early = regression(k_train, k_test, y, t=1e-3, diag_reg=1e-2)
    np.testing.assert_allclose(early, 1e-3 / y.size * k_test @ y, rtol=1e-2, atol=1e-7)


def make(shape, tm, **kwargs):
    kwargs = dict(kernel_model=MODEL, t=64.0, target_size=6, num_steps=2, chunk_size=4) | kwargs
    return poisons.make("ntga", threat=tm, num_classes=NUM_CLASSES, image_shape=shape, **kwargs)


@functools.cache
def shared(shape, norm, eps):
    """One two-pass poison per setting, shared by the tests (each compiles its steps once)."""
    return make(shape, threat.make(epsilon=eps, norm=norm), num_epochs=2)


def dataset(shape, n=N):
    x = jax.random.uniform(jax.random.key(3), (n, *shape), minval=0.05, maxval=0.95)
    return x, jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES


@jax.jit
def predictor_loss(poison_extra, x_block, y_block, index):
    """The mean target cross-entropy of the kernel predictor on targets outside the block,
    from `ntk` directly (the reference formula, not the poison's code)."""
    module = models.make("mlp", num_classes=1, hidden=MODEL["hidden"])
    variables = poison_extra["variables"]

    def f(p, x):
        return module.apply({**variables, "params": p}, x)

    keep = ~jnp.isin(poison_extra["target_index"], index)
    x_t, y_t = poison_extra["target_image"], poison_extra["target_label"]
    k_bb = ntk.empirical_ntk(f, variables["params"], x_block, x_block)
    k_tb = ntk.empirical_ntk(f, variables["params"], x_t, x_block)
    scale = jnp.mean(jnp.diag(k_bb))
    logits = ntk.kernel_regression(
        k_bb / scale, k_tb / scale, jax.nn.one_hot(y_block, NUM_CLASSES), t=64.0
    )
    losses = -jax.nn.log_softmax(logits)[jnp.arange(len(y_t)), y_t]
    return jnp.sum(jnp.where(keep, losses, 0.0)) / jnp.sum(keep)


def test_one_step_raises_the_kernel_predictors_target_loss():
    shape = (8, 8, 3)
    poison = make(shape, threat.make(epsilon=8 / 255))
    x, y = dataset(shape)
    state = jax.jit(poison.init)(jax.random.key(0), {"image": x, "label": y})
    index = jnp.arange(8, dtype=jnp.int32)
    batch = {"image": x[index], "label": y[index], "index": index}
    new_state, metrics = jax.jit(poison.update)(state, batch, jax.random.key(1))
    poisoned = poison.apply(new_state, batch)["image"]
    before = predictor_loss(state.extra, batch["image"], batch["label"], index)
    after = predictor_loss(state.extra, poisoned, batch["label"], index)
    assert after > before + 1e-4, (float(before), float(after))
    np.testing.assert_allclose(metrics["clean_target_loss"], before, rtol=1e-4)
    np.testing.assert_allclose(metrics["target_loss"], after, rtol=1e-4)
    # Only the block's perturbations moved.
    assert np.abs(np.asarray(new_state.delta[8:])).max() == 0.0
    assert np.abs(np.asarray(new_state.delta[:8])).max() > 0.0


@pytest.mark.parametrize("shape, norm, eps", [((8, 8, 3), "linf", 8 / 255), ((8, 8, 1), "l2", 0.5)])
def test_crafted_poison_is_bounded_boxed_and_deterministic(shape, norm, eps):
    tm = threat.make(epsilon=eps, norm=norm)
    poison = shared(shape, norm, eps)
    x, y = dataset(shape)

    def craft(key):
        state, history = poisons.craft(
            poison, x, y, key=jax.random.key(key), batch_size=8, progress=False
        )
        return poisons.apply_all(poison, state, x, y), history

    (x_p, y_p), history = craft(0)
    delta = x_p - np.asarray(x)
    assert np.all(tm.norm_of(delta) <= eps + 1e-5)
    assert x_p.min() >= 0.0 and x_p.max() <= 1.0
    np.testing.assert_array_equal(y_p, np.asarray(y))
    assert (np.abs(delta.reshape(N, -1)).max(axis=1) > 0).all()  # every block was attacked
    assert history["target_loss"][0] > history["clean_target_loss"][0]
    assert len(history["target_loss"]) == 2
    np.testing.assert_array_equal(craft(0)[0][0], x_p)
    assert not np.allclose(craft(1)[0][0], x_p)


def test_killed_craft_resumes_exactly(tmp_path):
    shape = (8, 8, 3)
    poison = shared(shape, "linf", 8 / 255)
    x, y = dataset(shape)
    key = jax.random.key(0)
    whole, _ = poisons.craft(poison, x, y, key=key, batch_size=8, progress=False)
    # A run killed after the first pass leaves its checkpoint; the next one resumes from it.
    poisons.craft(
        poison._replace(num_epochs=1),
        x,
        y,
        key=key,
        batch_size=8,
        ckpt_dir=tmp_path,
        progress=False,
    )
    resumed, history = poisons.craft(
        poison, x, y, key=key, batch_size=8, ckpt_dir=tmp_path, progress=False
    )
    np.testing.assert_array_equal(np.asarray(resumed.delta), np.asarray(whole.delta))
    assert len(history["target_loss"]) == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_size=N), "target_size=16 gives 16 targets of the 16 training examples"),
        (dict(target_size=0.01), "target_size=0.01 gives 0 targets"),
        (dict(t=0.0), "t=0.0 must be > 0"),
        (dict(diag_reg=0.0), "diag_reg=0.0 must be > 0"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    shape = (8, 8, 3)
    x, y = dataset(shape)
    with pytest.raises(ValueError, match=message):
        poison = make(shape, threat.make(epsilon=8 / 255), **kwargs)
        poisons.craft(poison, x, y, key=jax.random.key(0), batch_size=8, progress=False)
