"""Functional poisons: StAdv flow fields and ReColorAdv colour functions (`poisons.functional`).

Checked against independent values: zero flow is the identity and whole-pixel flows are shifts
(exactly), a half-pixel flow averages neighbours, L_flow equals a double loop over 4-neighbours,
a zero colour grid is the identity and an affine colour grid is reproduced exactly. Then the
poison invariants on 1- and 3-channel data, ℓ∞ and ℓ2 configs: the flow (grid) bound, the [0, 1]
box and 8-bit grid, labels unchanged, same key => same poison, a resumed craft equals an
uninterrupted one, and crafting moves the crafting model (the error goal raises its loss).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import losses, models, poisons, threat
from jaxpoison.poisons import functional

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 3
N = 24
FAST = dict(num_steps=4, goal="error")


def images(shape, n=N, seed=0):
    """Random images on the 8-bit grid and balanced labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape)) / 255.0
    return jnp.asarray(x, jnp.float32), jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES


@pytest.fixture(scope="module")
def surrogates():
    """surrogates(shape) -> (apply_fn, variables): a tiny MLP at init, one per shape."""
    cache = {}

    def get(shape):
        if shape not in cache:
            module = models.make("mlp", num_classes=NUM_CLASSES, width=0.0625)
            variables = models.init(module, jax.random.key(0), shape)
            cache[shape] = models.make_apply_fn(module), variables
        return cache[shape]

    return get


def make(name, shape, surrogates, norm="linf", **kwargs):
    apply_fn, variables = surrogates(shape)
    tm = threat.make(epsilon=8 / 255 if norm == "linf" else 0.5, norm=norm, quantize=True)
    return poisons.make(
        name,
        threat=tm,
        num_classes=NUM_CLASSES,
        image_shape=shape,
        apply_fn=apply_fn,
        variables=variables,
        **{**FAST, **kwargs},
    )


def craft(poison, x, y, key=0, **kwargs):
    state, history = poisons.craft(
        poison, x, y, key=jax.random.key(key), batch_size=8, progress=False, **kwargs
    )
    return state, history, *poisons.apply_all(poison, state, x, y)


# ----- the transformations ---------------------------------------------------------------------


def test_warp_zero_flow_is_identity_and_whole_pixels_shift():
    x = jax.random.uniform(jax.random.key(1), (2, 5, 6, 3))
    np.testing.assert_array_equal(functional.warp(x, jnp.zeros((2, 5, 6, 2))), x)
    flow = jnp.broadcast_to(jnp.array([1.0, -2.0]), (2, 5, 6, 2))
    out = np.asarray(functional.warp(x, flow))
    # Interior: rows 0..3 read row r + 1, columns 2..5 read column c - 2, exactly.
    np.testing.assert_array_equal(out[:, :4, 2:], np.asarray(x)[:, 1:, :4])
    # Border (replicate): columns 0, 1 read column 0; the last row reads itself (row 5 -> 4).
    np.testing.assert_array_equal(out[:, :4, 0], np.asarray(x)[:, 1:, 0])
    np.testing.assert_array_equal(out[:, 4, 2:], np.asarray(x)[:, 4, :4])


def test_warp_half_pixel_averages_neighbours_and_stays_in_box():
    x = jax.random.uniform(jax.random.key(2), (1, 4, 4, 1))
    half = jnp.broadcast_to(jnp.array([0.0, 0.5]), (1, 4, 4, 2))
    out = np.asarray(functional.warp(x, half))
    xn = np.asarray(x)
    np.testing.assert_allclose(out[:, :, :3], (xn[:, :, :3] + xn[:, :, 1:]) / 2, rtol=1e-6)
    wild = jax.random.uniform(jax.random.key(3), (1, 4, 4, 2), minval=-9, maxval=9)
    out = np.asarray(functional.warp(x, wild))
    assert out.min() >= xn.min() - 1e-7 and out.max() <= xn.max() + 1e-7


def test_flow_loss_is_the_double_sum_over_neighbours():
    flow = np.random.default_rng(0).normal(size=(2, 4, 5, 2)).astype(np.float32)
    expected = np.zeros(2)
    for b in range(2):
        for r in range(4):
            for c in range(5):
                for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    if 0 <= r + dr < 4 and 0 <= c + dc < 5:
                        d = flow[b, r, c] - flow[b, r + dr, c + dc]
                        expected[b] += np.sqrt(np.sum(d**2) + 1e-8)
    np.testing.assert_allclose(functional.flow_loss(jnp.asarray(flow)), expected, rtol=1e-5)
    assert float(functional.flow_loss(jnp.zeros((1, 4, 5, 2)))[0]) < 1e-2  # only sqrt(1e-8)s


def test_recolor_identity_and_affine_colour_maps():
    x = jax.random.uniform(jax.random.key(4), (2, 3, 3, 3))
    np.testing.assert_array_equal(functional.recolor(x, jnp.zeros((2, 4, 4, 4, 3))), x)
    # g(c) = A c + b at the control points; trilinear interpolation reproduces it everywhere.
    a = jnp.array([[0.02, -0.01, 0.0], [0.0, 0.03, 0.01], [-0.02, 0.0, 0.01]])
    b = jnp.array([0.01, -0.02, 0.03])
    lattice = jnp.stack(jnp.meshgrid(*[jnp.linspace(0, 1, 4)] * 3, indexing="ij"), -1)
    grid = jnp.broadcast_to(lattice @ a.T + b, (2, 4, 4, 4, 3))
    expected = jnp.clip(x + x @ a.T + b, 0, 1)
    np.testing.assert_allclose(functional.recolor(x, grid), expected, atol=1e-6)


# ----- the poisons -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape,norm", [((8, 8, 3), "linf"), ((8, 8, 1), "l2")])
def test_stadv_invariants(shape, norm, surrogates):
    x, y = images(shape)
    poison = make("stadv", shape, surrogates, norm=norm, max_flow=1.0, step_size=0.25)
    state, history, out, labels = craft(poison, x, y)
    flow = np.asarray(state.values)
    assert flow.shape == (N, *shape[:2], 2)
    assert 0.5 < np.abs(flow).max() <= 1.0  # the bound held
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-3)  # quantized
    np.testing.assert_array_equal(labels, y)
    assert np.abs(out - np.asarray(x)).max() > 8 / 255  # not an lp poison: pixels move far
    # The error goal raised the crafting model's loss above the clean images' loss.
    apply_fn, variables = surrogates(shape)
    logits = lambda v: apply_fn(variables, v, train=False)[0]
    loss = lambda v: float(jnp.mean(losses.cross_entropy(logits(v), y)))
    assert loss(jnp.asarray(out)) > loss(x) + 0.01
    assert set(history) >= {"accuracy", "loss", "smoothness"}
    _, _, again, _ = craft(poison, x, y)
    np.testing.assert_array_equal(out, again)
    _, _, other, _ = craft(poison, x, y, key=1)
    assert not np.array_equal(out, other)


def test_stadv_resumed_craft_equals_uninterrupted(surrogates, tmp_path):
    shape = (8, 8, 3)
    x, y = images(shape)
    whole = make("stadv", shape, surrogates, num_epochs=2, goal="target")
    state, history, _, _ = craft(whole, x, y)
    craft(make("stadv", shape, surrogates, num_epochs=1, goal="target"), x, y, ckpt_dir=tmp_path)
    resumed, resumed_history, _, _ = craft(whole, x, y, ckpt_dir=tmp_path)
    assert len(resumed_history["target_rate"]) == 2
    np.testing.assert_array_equal(resumed.values, state.values)
    np.testing.assert_allclose(resumed_history["loss"], history["loss"], rtol=1e-6)


def test_recoloradv_bound_box_labels_and_key(surrogates):
    shape = (8, 8, 3)
    x, y = images(shape)
    poison = make("recoloradv", shape, surrogates, epsilon=0.06, resolution=3)
    state, _, out, labels = craft(poison, x, y)
    grid = np.asarray(state.values)
    assert grid.shape == (N, 3, 3, 3, 3)
    assert np.abs(grid).max() <= 0.06 + 1e-7
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(labels, y)
    # Every pixel moved by at most epsilon per channel (plus 8-bit rounding).
    assert np.abs(out - np.asarray(x)).max() <= 0.06 + 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(out, craft(poison, x, y)[2])


def test_bad_settings_are_refused(surrogates):
    with pytest.raises(ValueError, match="has 1 channel"):
        make("recoloradv", (8, 8, 1), surrogates)
    for name, kwargs, message in [
        ("stadv", dict(max_flow=0.0), "max_flow=0.0 is invalid"),
        ("stadv", dict(goal="true"), "goal must be"),
        ("stadv", dict(num_epochs=-1), "num_epochs=-1"),
        ("recoloradv", dict(resolution=1), "resolution=1"),
        ("recoloradv", dict(epsilon=float("inf")), "epsilon=inf is invalid"),
    ]:
        with pytest.raises(ValueError, match=message):
            make(name, (8, 8, 3), surrogates, **kwargs)
