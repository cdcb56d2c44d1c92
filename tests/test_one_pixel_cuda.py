"""The l0 threat (`threat.L0Ball`), the one-pixel shortcut and CUDA, on CIFAR and MNIST shapes.

Checked against independent values: the l0 projection equals a brute-force search over pixel
subsets; the OPS objective equals the reference's mean / std computed image by image in numpy,
its search finds a planted shortcut pixel, and the chosen pixels separate the classes of
poisoned (not clean) images by a lookup rule; the CUDA filtering equals a Python loop. Plus the
poison invariants: [0, 1] box, labels unchanged, same key => same poison, at most k changed
pixels, and the stored artifact round trip.
"""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import config_lib, objectives, poisons, specs, threat
from jaxpoison.poisons import convolution, one_pixel, storage
from jaxpoison.trainers import poisoning

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 10
N = 200
SHAPES = [(32, 32, 3), (28, 28, 1)]


def grid_images(shape, n=N, seed=0):
    """Random images on the 8-bit grid and balanced labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape)) / 255.0
    return jnp.asarray(x, jnp.float32), jnp.arange(n, dtype=jnp.int32) % NUM_CLASSES


def craft(name, shape, tm, *, key=0, x=None, y=None, **kwargs):
    poison = poisons.make(name, threat=tm, num_classes=NUM_CLASSES, image_shape=shape, **kwargs)
    if x is None:
        x, y = grid_images(shape)
    state, history = poisons.craft(poison, x, y, key=jax.random.key(key), progress=False)
    assert history == {} and poison.num_epochs == 0
    images, labels = poisons.apply_all(poison, state, x, y)
    return poison, state, np.asarray(images), np.asarray(labels)


def changed_pixels(a, b):
    """Per example, the number of pixel positions where any channel differs."""
    return (np.abs(np.asarray(a) - np.asarray(b)) > 0).any(-1).sum(axis=(1, 2))


# ----- the l0 ball ----------------------------------------------------------------------------


def test_l0_projection_is_the_euclidean_projection():
    """Brute force: the nearest point with at most k changed pixels, each in the box."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (6, 2, 2, 2)).astype(np.float32)
    delta = rng.normal(0, 0.8, x.shape).astype(np.float32)
    for k in (0, 1, 2, 4):
        got = np.asarray(threat.L0Ball(pixels=k).project(jnp.asarray(delta), jnp.asarray(x)))
        boxed = np.clip(x + delta, 0, 1) - x
        for i in range(len(x)):
            best = min(
                np.sum((delta[i] - np.where(_subset_mask(s), boxed[i], 0.0)) ** 2)
                for r in range(k + 1)
                for s in itertools.combinations(range(4), r)
            )
            np.testing.assert_allclose(np.sum((delta[i] - got[i]) ** 2), best, rtol=1e-5)
        assert (changed_pixels(got, 0) <= k).all()
        assert (x + got >= 0).all() and (x + got <= 1 + 1e-6).all()


def _subset_mask(pixels):
    m = np.zeros((2, 2, 1), bool)
    for p in pixels:
        m[p // 2, p % 2] = True
    return m


def test_l0_random_init_norm_and_mask():
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (5, 6, 6, 3)), jnp.float32)
    mask = np.zeros((6, 6, 1), np.float32)
    mask[:, :2] = 1.0  # only the first two columns may move
    ball = threat.make(norm="l0", pixels=3, mask=mask.tolist())
    delta = np.asarray(ball.random_init(jax.random.key(0), x))
    np.testing.assert_array_equal(ball.norm_of(jnp.asarray(delta)), 3.0)
    assert (np.abs(delta[:, :, 2:]) == 0).all()
    assert (np.asarray(x) + delta >= 0).all() and (np.asarray(x) + delta <= 1 + 1e-6).all()
    np.testing.assert_array_equal(ball.random_init(jax.random.key(0), x), delta)
    # Quantizing keeps x + delta on the 8-bit grid for x on it.
    xq = jnp.round(x * 255) / 255
    q = threat.make(norm="l0", pixels=2, quantize=True).random_init(jax.random.key(1), xq)
    np.testing.assert_allclose((xq + q) * 255, np.round((xq + q) * 255), atol=1e-3)
    with pytest.raises(ValueError, match="no steepest-ascent step"):
        ball.step_direction(x)


def test_l0_fields_and_refusals():
    ball = threat.make(norm="l0", pixels=2)
    assert isinstance(ball, threat.L0Ball) and (ball.norm, ball.epsilon) == ("l0", 2.0)
    with pytest.raises(ValueError, match="give pixels= .* and no epsilon"):
        threat.make(norm="l0", epsilon=8 / 255)
    with pytest.raises(ValueError, match="give pixels= .* and no epsilon"):
        threat.make(norm="l0", pixels=1, epsilon=8 / 255)
    with pytest.raises(ValueError, match="radius of the l0 ball"):
        threat.make(norm="linf", epsilon=0.1, pixels=1)
    with pytest.raises(ValueError, match="whole number"):
        threat.make(norm="l0", pixels=1.5)
    with pytest.raises(ValueError, match="l0 ball is threat.L0Ball"):
        threat.LpBall(epsilon=1.0, norm="l0")
    # Objectives and evaluators: one line, whichever way the ball comes.
    for kwargs in (dict(threat=ball), dict(norm="l0", epsilon=1.0)):
        with pytest.raises(ValueError, match="pgd_at needs an l-infinity or l2 ball"):
            threat.resolve(**kwargs, what="pgd_at")
    with pytest.raises(ValueError, match="needs an l-infinity or l2 ball"):
        objectives.make("pgd_at", threat=ball, num_steps=2)
    # Poisons that take gradient steps or scale to an lp radius refuse it; OPS and CUDA take it.
    with pytest.raises(ValueError, match="poison 'random' needs an l-infinity or l2 ball"):
        poisons.make("random", threat=ball, num_classes=3, image_shape=(8, 8, 3))
    assert {"one_pixel", "cuda"} <= poisons.L0_POISONS


def test_config_threat_l0_builds_the_ball():
    config = config_lib.poison_family("t", ["one_pixel", "cuda"])
    ps = specs.poison_spec(config, "one_pixel", image_shape=(32, 32, 3), num_classes=10)
    assert isinstance(ps.threat, threat.L0Ball) and ps.threat.pixels == 1
    specs.check(config, image_shape=(28, 28, 1), num_classes=10, victims=False)
    with config.unlocked():
        config.threat = dict(norm="l0", pixels=2)
    assert specs.threat(config).pixels == 2
    with config.unlocked():
        config.threat = dict(norm="l0")
    with pytest.raises(ValueError, match="has no pixels"):
        specs.threat(config)


def test_check_bounds_counts_changed_pixels():
    x = np.zeros((3, 4, 4, 3), np.float32)
    y = np.arange(3)
    ps = types.SimpleNamespace(run="ops", threat=threat.make(norm="l0", pixels=1))
    one = x.copy()
    one[:, 1, 2] = [1.0, 0.0, 1.0]  # one RGB pixel: one pixel, not three
    poisoning.check_bounds(ps, x, y, one, y)
    two = one.copy()
    two[1, 0, 0, 1] = 0.5
    with pytest.raises(ValueError, match=r"example 1 lies 2\.0+ \(l0\) .* outside pixels=1"):
        poisoning.check_bounds(ps, x, y, two, y)


# ----- issue 25: concrete array radii are checked as floats -----------------------------------


@pytest.mark.parametrize(
    "eps, match",
    [
        (jnp.asarray(2.0), "8/255"),
        (np.float32(2.0), "8/255"),
        (np.asarray(-0.5), ">= 0"),
        (jnp.asarray(jnp.nan), "finite"),
        (jnp.asarray([0.1, 1.5]), "8/255"),
    ],
)
def test_concrete_array_epsilon_is_validated(eps, match):
    with pytest.raises(ValueError, match=match):
        threat.LpBall(epsilon=eps)


def test_traced_epsilon_still_passes():
    x = jnp.zeros((2, 3, 3, 1))
    project = jax.jit(lambda e: threat.LpBall(epsilon=e).project(jnp.ones_like(x), x))
    np.testing.assert_allclose(project(jnp.asarray(0.25)), 0.25)
    per_ball = jax.vmap(lambda e: threat.LpBall(epsilon=e, norm="l2").epsilon)(jnp.ones(3))
    np.testing.assert_array_equal(per_ball, 1.0)
    ball = threat.LpBall(epsilon=jnp.asarray(0.5))  # a concrete array in range is fine
    assert jax.tree.map(lambda e: e * 2, ball).epsilon == 1.0
    jax.jit(lambda b: b.project(x, x))(ball)  # rebuilt from tracers inside jit


# ----- one-pixel shortcut ----------------------------------------------------------------------


def _reference_objective(x, y, k, pixel, colour_bits):
    """The reference's per-class objective: mean / std of |colour - x_pixel| over the class's
    images and channels, written as a plain numpy loop over one candidate."""
    h, w = x.shape[1:3]
    d = np.abs(np.asarray(colour_bits, np.float64) - x[y == k, pixel // w, pixel % w, :])
    return d.mean() / d.std()


@pytest.mark.parametrize("shape", [(5, 4, 3), (4, 6, 1)])
def test_ops_objective_equals_the_reference_formula(shape):
    x, y = grid_images(shape, n=60)
    count, mean, var = one_pixel.class_moments(x, y, num_classes=NUM_CLASSES, chunk=16)
    np.testing.assert_array_equal(count, 6.0)
    objective, _ = one_pixel.scores(mean, var)
    colours = np.asarray(one_pixel.corner_colours(shape[-1]))
    assert objective.shape == (NUM_CLASSES, shape[0] * shape[1], 2 ** shape[-1])
    xs, ys = np.asarray(x, np.float64), np.asarray(y)
    rng = np.random.default_rng(0)
    for _ in range(40):
        k, p, v = rng.integers(NUM_CLASSES), rng.integers(shape[0] * shape[1]), rng.integers(2)
        expected = _reference_objective(xs, ys, k, p, colours[v])
        np.testing.assert_allclose(objective[k, p, v], expected, rtol=2e-4)


def test_corner_colours_order():
    np.testing.assert_array_equal(one_pixel.corner_colours(1), [[0], [1]])
    rgb = np.asarray(one_pixel.corner_colours(3))
    assert rgb.shape == (8, 3) and len(np.unique(rgb, axis=0)) == 8
    np.testing.assert_array_equal(rgb[[0, 4, 7]], [[0, 0, 0], [1, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("shape", SHAPES)
def test_ops_finds_a_planted_shortcut_pixel(shape):
    """Class k's images share pixel (k, 2k) = 0 exactly, the rest is mid-grey noise: the best
    pair of class k is that pixel set to white (deviation 1, no spread)."""
    h, w, c = shape
    rng = np.random.default_rng(3)
    x = np.round(rng.uniform(0.3, 0.7, (N, *shape)) * 255) / 255
    y = np.arange(N) % NUM_CLASSES
    for k in range(NUM_CLASSES):
        x[y == k, k, 2 * k] = 0.0
    position, colour = one_pixel.search(
        jnp.asarray(x, jnp.float32), jnp.asarray(y), key=jax.random.key(0), num_classes=NUM_CLASSES
    )
    np.testing.assert_array_equal(position[:, 0], [k * w + 2 * k for k in range(NUM_CLASSES)])
    np.testing.assert_array_equal(colour, np.ones((NUM_CLASSES, 1, c)))


@pytest.mark.parametrize("shape", SHAPES)
def test_ops_invariants_and_the_pixel_separates_classes(shape):
    x, y = grid_images(shape)
    tm = threat.make(norm="l0", pixels=1, quantize=True)
    poison, state, images, labels = craft("one_pixel", shape, tm, x=x, y=y)
    x, y = np.asarray(x), np.asarray(y)
    assert images.shape == x.shape and images.min() >= 0 and images.max() <= 1
    np.testing.assert_allclose(images * 255, np.round(images * 255), atol=1e-3)
    np.testing.assert_array_equal(labels, y)
    assert (changed_pixels(images, x) <= 1).all() and changed_pixels(images, x).mean() > 0.99
    # Distinct (pixel, colour) per class; the key plays no part (no ties in this data).
    pairs = {
        (int(p), tuple(c))
        for p, c in zip(state.position[:, 0], np.asarray(state.colour[:, 0]), strict=True)
    }
    assert len(pairs) == NUM_CLASSES
    for key in (0, 1):
        _, again, images_again, _ = craft("one_pixel", shape, tm, key=key, x=x, y=y)
        jax.tree.map(np.testing.assert_array_equal, again, state)
        np.testing.assert_array_equal(images_again, images)
    # The rule "class k's pixel has class k's colour" holds for every poisoned image and for
    # few clean ones; other classes' rules rarely fire (by chance: random pixels at 0 or 1).
    w = shape[1]
    pos = np.asarray(state.position[:, 0])
    col = np.asarray(state.colour[:, 0])

    def hits(imgs):
        return np.stack(
            [np.all(imgs[:, p // w, p % w] == col[k], -1) for k, p in enumerate(pos)], axis=1
        )

    own = np.arange(N), y
    assert hits(images)[own].all() and hits(x)[own].mean() < 0.1
    assert hits(images).sum(1).mean() < 1.2


def test_ops_breaks_ties_with_the_key():
    """MNIST-like data: the border is black in every image, so white on any border pixel is a
    perfect (+inf) pair; the key spreads the classes over the border instead of the first pixels
    of the top row."""
    shape = (12, 12, 1)
    x, y = grid_images(shape, n=100)
    x = x.at[:, :2].set(0.0).at[:, -2:].set(0.0).at[:, :, :2].set(0.0).at[:, :, -2:].set(0.0)
    border = np.ones(shape[:2], bool)
    border[2:-2, 2:-2] = False
    found = []
    for key in (0, 0, 1):
        position, colour = one_pixel.search(x, y, key=jax.random.key(key), num_classes=NUM_CLASSES)
        found.append(np.asarray(position[:, 0]))
        assert border.ravel()[found[-1]].all() and (np.asarray(colour) == 1).all()
        assert len(set(found[-1])) == NUM_CLASSES
    np.testing.assert_array_equal(found[0], found[1])
    assert not np.array_equal(found[0], found[2])
    assert not np.array_equal(np.sort(found[0]), np.arange(NUM_CLASSES))  # not the top row


def test_ops_with_more_pixels_and_with_an_lp_ball():
    shape = (8, 8, 3)
    x, y = grid_images(shape, n=60)
    tm = threat.make(norm="l0", pixels=2)
    _, state, images, _ = craft("one_pixel", shape, tm, x=x, y=y, num_pixels=2)
    assert (
        state.position.shape == (NUM_CLASSES, 2)
        and (state.position[:, 0] != state.position[:, 1]).all()
    )
    assert (changed_pixels(images, x) <= 2).all() and changed_pixels(images, x).max() == 2
    # The budgeted variant: the same pixel, moved at most epsilon toward the colour.
    eps = 8 / 255
    lin = threat.make(epsilon=eps, norm="linf")
    _, _, budgeted, _ = craft("one_pixel", shape, lin, x=x, y=y)
    assert np.abs(budgeted - np.asarray(x)).max() <= eps + 1e-6
    assert (changed_pixels(budgeted, x) <= 1).all()
    with pytest.raises(ValueError, match="num_pixels=2 per image, but the l0 threat allows"):
        poisons.make(
            "one_pixel",
            threat=threat.make(norm="l0", pixels=1),
            num_classes=3,
            image_shape=shape,
            num_pixels=2,
        )
    with pytest.raises(ValueError, match="too few for 10 classes"):
        poisons.make("one_pixel", threat=tm, num_classes=10, image_shape=(2, 2, 1))


# ----- CUDA -----------------------------------------------------------------------------------


def test_convolve_equals_a_python_loop():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 5, 6, 3))
    kern = rng.uniform(0, 1, (2, 3, 3))
    expected = np.zeros_like(x)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    for b in range(2):
        for i in range(5):
            for j in range(6):
                window = padded[b, i : i + 3, j : j + 3]  # [3, 3, C]
                expected[b, i, j] = np.einsum("ae,aec->c", kern[b], window)
    got = convolution.convolve(jnp.asarray(x, jnp.float32), jnp.asarray(kern, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_invariants(shape):
    x, y = grid_images(shape)
    x = x.at[0].set(0.0)  # an all-black image stays black (no 0/0)
    tm = threat.make(epsilon=8 / 255, quantize=True)
    _, state, images, labels = craft("cuda", shape, tm, x=x, y=y)
    np.testing.assert_array_equal(labels, np.asarray(y))
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    np.testing.assert_allclose(images * 255, np.round(images * 255), atol=1e-3)
    assert (images[0] == 0).all() and (images[1:].max(axis=(1, 2, 3)) == 1).all()
    # The filters: 3x3, entries in [0, 0.3] but one 1 each, distinct classes.
    kern = np.asarray(state.kernel)
    assert kern.shape == (NUM_CLASSES, 3, 3)
    assert ((kern == 1.0).reshape(NUM_CLASSES, -1).sum(1) == 1).all()
    assert (kern[kern != 1.0] >= 0).all() and (kern[kern != 1.0] <= 0.3).all()
    assert len(np.unique(kern.reshape(NUM_CLASSES, -1), axis=0)) == NUM_CLASSES
    # Each image is its clean image filtered by its class's filter, scaled to max 1.
    xs = np.asarray(x)
    filtered = np.asarray(convolution.convolve(jnp.asarray(xs[1:]), kern[np.asarray(y)[1:]]))
    scaled = filtered / filtered.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(images[1:], scaled, atol=0.5 / 255 + 1e-6)
    # Far from the clean images in every lp sense (unbounded), same key => same, other differs.
    assert np.abs(images - xs).max() > 0.3
    _, again, images_again, _ = craft("cuda", shape, tm, x=x, y=y)
    jax.tree.map(np.testing.assert_array_equal, again, state)
    np.testing.assert_array_equal(images_again, images)
    _, other, _, _ = craft("cuda", shape, tm, key=1, x=x, y=y)
    assert not np.allclose(other.kernel, state.kernel)
    assert "cuda" in poisons.UNBOUNDED


def test_cuda_fields_and_refusals():
    tm = threat.make(epsilon=8 / 255)
    _, state, _, _ = craft(
        "cuda",
        (8, 8, 1),
        tm,
        x=jnp.full((20, 8, 8, 1), 0.5),
        y=jnp.arange(20) % NUM_CLASSES,
        kernel_size=5,
        blur_parameter=0.1,
    )
    kern = np.asarray(state.kernel)
    assert kern.shape == (NUM_CLASSES, 5, 5) and kern[kern != 1.0].max() <= 0.1
    _, shared, _, _ = craft(
        "cuda",
        (8, 8, 1),
        tm,
        x=jnp.full((20, 8, 8, 1), 0.5),
        y=jnp.arange(20) % NUM_CLASSES,
        class_wise=False,
    )
    assert (np.asarray(shared.kernel) == np.asarray(shared.kernel)[:1]).all()
    with pytest.raises(ValueError, match="kernel_size=4 must be odd"):
        poisons.make("cuda", threat=tm, num_classes=2, image_shape=(8, 8, 3), kernel_size=4)
    with pytest.raises(ValueError, match="kernel_size=9 must be odd and in 1..8"):
        poisons.make("cuda", threat=tm, num_classes=2, image_shape=(8, 8, 3), kernel_size=9)
    with pytest.raises(ValueError, match="blur_parameter=0 must be > 0"):
        poisons.make("cuda", threat=tm, num_classes=2, image_shape=(8, 8, 3), blur_parameter=0)


# ----- artifacts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, tm",
    [
        ("one_pixel", threat.make(norm="l0", pixels=1, quantize=True)),
        ("cuda", threat.make(epsilon=8 / 255, quantize=True)),
    ],
)
def test_artifact_round_trip(name, tm, tmp_path):
    shape = (28, 28, 1)
    x, y = grid_images(shape)
    poison, state, images, _ = craft(name, shape, tm, x=x, y=y)
    meta = dict(name=name, spec={}, threat=tm, dataset_name="synthetic", fingerprint="f" * 64)
    storage.save(tmp_path / "p", state, **meta)
    template = jax.eval_shape(poison.init, jax.random.key(0), {"image": x, "label": y})
    loaded, metadata = storage.load(tmp_path / "p", template, fingerprint="f" * 64)
    assert metadata["poison"] == name and metadata["threat"]["norm"] == tm.norm
    jax.tree.map(np.testing.assert_array_equal, loaded, state)
    np.testing.assert_array_equal(poisons.apply_all(poison, loaded, x, y)[0], images)
    with pytest.raises(storage.PoisonFileError, match="other training data"):
        storage.load(tmp_path / "p", template, fingerprint="0" * 64)


def test_stored_delta_is_checked_in_pixels_under_l0(tmp_path):
    """A user's sample-wise poison stored under the l0 ball: its deltas are counted in pixels."""
    from jaxpoison.poisons.base import SampleWiseState

    delta = np.zeros((2, 4, 4, 3), np.float32)
    delta[:, 1, 1] = [0.9, -0.4, 0.0]  # one pixel per example, far in any lp sense
    tm = threat.make(norm="l0", pixels=1)
    meta = dict(name="mine", spec={}, threat=tm, dataset_name="synthetic", fingerprint="f" * 64)
    storage.save(tmp_path / "ok", SampleWiseState(delta=jnp.asarray(delta)), **meta)
    template = SampleWiseState(delta=jnp.zeros_like(delta))
    loaded, _ = storage.load(tmp_path / "ok", template)
    np.testing.assert_array_equal(loaded.delta, delta)
    delta[1, 2, 3, 2] = 0.1  # a second pixel
    storage.save(tmp_path / "two", SampleWiseState(delta=jnp.asarray(delta)), **meta)
    with pytest.raises(storage.PoisonFileError, match="l0 norm 2.0+ > epsilon 1.0+"):
        storage.load(tmp_path / "two", template)
