"""LSP and autoregressive poisons (`jaxpoison.poisons.synthetic`) on CIFAR and MNIST shapes.

Checked against the papers' definitions: every example's δ has norm exactly ε; LSP noise is
constant on p x p patches and its classes are linearly separable in patch space (while the same
points with shuffled labels are not); the AR recursion equals a plain Python loop, each class's
residual filter annihilates its own noise and not the others', and degenerate coefficient draws
never reach a poison.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import poisons, threat
from jaxpoison.poisons import synthetic

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 10
N = 300
SHAPES = [(32, 32, 3), (28, 28, 1)]


def labels(n=N):
    return jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES


def craft(name, shape, tm, *, key=0, n=N, **kwargs):
    """δ [n, H, W, C] and the poison's state, drawn by `poisons.craft` (init is jitted there)."""
    poison = poisons.make(name, threat=tm, num_classes=NUM_CLASSES, image_shape=shape, **kwargs)
    x = jnp.full((n, *shape), 0.5)
    state, history = poisons.craft(poison, x, labels(n), key=jax.random.key(key), progress=False)
    assert history == {} and poison.num_epochs == 0
    return np.asarray(state.delta), state


@pytest.mark.parametrize("name", ["lsp", "autoregressive"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm, eps", [("l2", 1.0), ("linf", 8 / 255)])
def test_every_example_has_norm_epsilon(name, shape, norm, eps):
    tm = threat.make(epsilon=eps, norm=norm)
    delta, _ = craft(name, shape, tm)
    assert delta.shape == (N, *shape) and np.isfinite(delta).all()
    np.testing.assert_allclose(tm.norm_of(delta), eps, rtol=1e-5)
    # Sample-wise: no two examples share their noise, same key => same noise, another differs.
    flat = delta.reshape(N, -1)
    assert len(np.unique(flat, axis=0)) == N
    np.testing.assert_array_equal(craft(name, shape, tm)[0], delta)
    assert not np.allclose(craft(name, shape, tm, key=1)[0], delta)


def _patch_means(delta, p):
    """[N, d] patch features: the mean of δ over each p x p patch and channel."""
    n, h, w, c = delta.shape
    gh, gw = -(-h // p), -(-w // p)
    padded = np.zeros((n, gh * p, gw * p, c))
    counts = np.zeros((1, gh * p, gw * p, 1))
    padded[:, :h, :w] = delta
    counts[:, :h, :w] = 1
    total = padded.reshape(n, gh, p, gw, p, c).sum(axis=(2, 4))
    return (total / counts.reshape(1, gh, p, gw, p, 1).sum(axis=(2, 4))).reshape(n, -1)


def _linear_fit_accuracy(features, y, steps=3000):
    """Training accuracy of multinomial logistic regression (full-batch Adam)."""
    feats = jnp.asarray(features / np.abs(features).max(), jnp.float32)
    onehot = jax.nn.one_hot(y, NUM_CLASSES)

    def loss(params):
        logits = feats @ params[0] + params[1]
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))

    @jax.jit
    def fit(params):
        def step(carry, t):
            p, m, v = carry
            g = jax.grad(loss)(p)
            m = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, m, g)
            v = jax.tree.map(lambda a, b: 0.999 * a + 0.001 * b * b, v, g)
            p = jax.tree.map(
                lambda a, mm, vv: (
                    a - 0.05 * (mm / (1 - 0.9**t)) / (jnp.sqrt(vv / (1 - 0.999**t)) + 1e-8)
                ),
                p,
                m,
                v,
            )
            return (p, m, v), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(step, (params, zeros, zeros), jnp.arange(1, steps + 1.0))[0][0]

    params = fit((jnp.zeros((feats.shape[1], NUM_CLASSES)), jnp.zeros(NUM_CLASSES)))
    pred = np.asarray(jnp.argmax(feats @ params[0] + params[1], axis=-1))
    return np.mean(pred == np.asarray(y))


@pytest.mark.parametrize("shape", SHAPES)
def test_lsp_is_patch_constant_and_linearly_separable(shape):
    tm = threat.make(epsilon=np.sqrt(np.prod(shape)) * 6 / 255, norm="l2")
    n = 1500  # more points than the 490 parameters of a linear model on 48 features
    delta, _ = craft("lsp", shape, tm, n=n)
    y = np.asarray(labels(n))
    feats = _patch_means(delta, 8)
    h, w, c = shape
    assert feats.shape[1] == -(-h // 8) * -(-w // 8) * c  # 48 on CIFAR, 16 on MNIST
    # Constant on every patch: δ equals its patch means upsampled.
    grid = feats.reshape(n, -(-h // 8), -(-w // 8), c)
    upsampled = np.repeat(np.repeat(grid, 8, axis=1), 8, axis=2)[:, :h, :w]
    np.testing.assert_allclose(delta, upsampled, atol=1e-6)
    # Class centres distinct; a linear model on δ alone separates the classes, but not the same
    # points under shuffled labels.
    centres = np.stack([feats[y == k].mean(0) for k in range(NUM_CLASSES)])
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert gaps[~np.eye(NUM_CLASSES, dtype=bool)].min() > 0
    assert _linear_fit_accuracy(feats, y) == 1.0
    shuffled = np.random.default_rng(0).permutation(y)
    assert _linear_fit_accuracy(feats, shuffled) < 0.9


def test_lsp_refuses_what_it_cannot_build():
    tm = threat.make(epsilon=1.0, norm="l2")
    with pytest.raises(ValueError, match="patch_size=9 must be in 1..8"):
        synthetic.lsp(threat=tm, num_classes=3, image_shape=(8, 8, 3), patch_size=9)
    # One 8x8 patch on one channel: 2 cluster centres for 3 classes.
    with pytest.raises(ValueError, match="fewer than the 3 classes; use a smaller patch_size"):
        synthetic.lsp(threat=tm, num_classes=3, image_shape=(8, 8, 1))


def test_ar_generate_equals_a_python_loop():
    rng = np.random.default_rng(0)
    coef = rng.standard_normal((2, 3, 3, 3))
    coef[..., 2, 2] = 0.0
    start = rng.standard_normal((2, 7, 6, 3))
    expected = start.copy()
    for n in range(2):
        for r in range(2, 7):
            for col in range(2, 6):
                window = expected[n, r - 2 : r + 1, col - 2 : col + 1]  # [3, 3, C]
                expected[n, r, col] = np.einsum("abc,cab->c", window, coef[n])
    got = synthetic.ar_generate(jnp.asarray(coef, jnp.float32), jnp.asarray(start, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-5)


def _residuals(coefficients, delta):
    """|residual| of every class's AR filter on every example: [K, N] mean absolute value."""
    f = np.array(coefficients, np.float64)
    f[:, :, 2, 2] = -1.0
    windows = np.lib.stride_tricks.sliding_window_view(delta.astype(np.float64), (3, 3), (1, 2))
    return np.abs(np.einsum("kcab,nhwcab->knhw", f, windows)).mean(axis=(2, 3))


@pytest.mark.parametrize("shape", SHAPES)
def test_ar_noise_is_its_class_process_and_no_other(shape):
    tm = threat.make(epsilon=1.0, norm="l2")
    delta, state = craft("autoregressive", shape, tm)
    coefs = np.asarray(state.extra)
    assert coefs.shape == (NUM_CLASSES, shape[2], 3, 3) and np.isfinite(coefs).all()
    np.testing.assert_array_equal(coefs[:, :, 2, 2], 0.0)
    np.testing.assert_allclose(coefs.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    y = np.asarray(labels())
    # Non-degenerate in every class: finite, not constant, no blacked-out channel.
    for k in range(NUM_CLASSES):
        d = delta[y == k]
        assert np.isfinite(d).all() and (d.std(axis=(1, 2)) > 1e-3 / np.sqrt(d[0].size)).all()
    residual = _residuals(coefs, delta)  # [K, N]
    own = residual[y, np.arange(N)]
    others = np.where(np.arange(NUM_CLASSES)[:, None] == y[None], np.inf, residual).min(axis=0)
    typical = np.abs(delta).mean()
    assert own.max() < 1e-4 * typical  # the process's own filter annihilates its noise
    assert others.min() > 1e-2 * typical  # and every other class's filter does not


def test_ar_coefficients_refuse_degenerate_searches():
    with pytest.raises(ValueError, match="too small"):
        synthetic.ar_coefficients(num_classes=2, image_shape=(2, 8, 1))
    with pytest.raises(ValueError, match="crop=1 must be >= 2"):
        synthetic.ar_coefficients(num_classes=2, image_shape=(8, 8, 1), crop=1)
    with pytest.raises(ValueError, match="found only .* lower min_response"):
        synthetic.ar_coefficients(
            num_classes=10, image_shape=(8, 8, 1), min_response=1e6, num_draws=1024
        )


def test_ar_coefficients_keep_only_stable_draws():
    """The plain draw (normal / its sum) diverges or goes NaN often; the kept ones never do."""
    raw = np.random.default_rng(0).standard_normal((1000, 3, 3))
    raw[:, 2, 2] = 0.0
    plain = raw / raw.sum(axis=(1, 2), keepdims=True)
    start = np.random.default_rng(1).standard_normal((1, 36, 36, 1000))
    out = np.asarray(synthetic.ar_generate(jnp.asarray(plain, jnp.float32), start))[:, 4:, 4:]
    with np.errstate(all="ignore"):
        rms = np.sqrt(np.mean(np.square(out.astype(np.float64)), axis=(0, 1, 2)))
    assert np.mean(~np.isfinite(rms) | (rms > 1e3)) > 0.3  # the guard is needed

    coefs = synthetic.ar_coefficients(num_classes=NUM_CLASSES, image_shape=(32, 32, 3))
    starts = jax.random.normal(jax.random.key(5), (20, 36, 36, 3))
    for k in range(NUM_CLASSES):
        out = np.asarray(synthetic.ar_generate(jnp.asarray(coefs[k]), starts))[:, 4:, 4:]
        rms = np.sqrt(np.mean(out**2, axis=(1, 2)))
        assert np.isfinite(rms).all() and (rms < 5.0).all() and (rms > 1e-3).all()
