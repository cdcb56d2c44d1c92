"""Every poison of the registry on a tiny synthetic problem (8x8x3 images, 3 classes, MLP).

Invariants checked for each `POISONS` entry: the bound holds (except the substandard sets),
images stay in [0, 1] and on the 8-bit grid (the threat model quantizes), labels are unchanged
(except mislabeling), the same key gives the same poison, save/load round-trips and a tampered
artifact is refused. Then effect checks: P1 moves a clean-trained model toward the target
classes, error-minimizing noise lowers its crafting model's loss, partial poisoning touches
exactly the chosen examples.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import losses, models, poisons, threat
from jaxpoison.poisons import error_minimizing, storage

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 3
IMAGE_SHAPE = (8, 8, 3)
N = 48
EPS = 16 / 255
# Small hyperparameters so each craft compiles and runs in a second or two.
FAST = {
    "adversarial": dict(num_steps=5, step_size=EPS / 4),
    "error_maximizing": dict(num_steps=5, step_size=EPS / 4),
    "mifgsm": dict(num_steps=5),
    "hypocritical": dict(num_steps=5, step_size=EPS / 4),
    "universal_adversarial": dict(num_epochs=1, num_steps=2),
    "universal_hypocritical": dict(num_epochs=1, num_steps=2, source="class"),
    "error_minimizing": dict(
        model=dict(name="mlp", width=0.0625),
        optimizer=dict(learning_rate=0.1),
        num_epochs=3,
        num_steps=5,
        step_size=EPS / 4,
        train_steps=3,
    ),
    "l2c": dict(
        generator=dict(name="autoencoder", features=(2, 2)),
        victim=dict(name="mlp", width=0.0625),
        unroll_steps=2,
    ),
    "tap": dict(num_steps=3, num_restarts=1, step_size=EPS / 4),
    "ntga": dict(kernel_model=dict(name="mlp", width=0.0625), num_steps=2),
    "stadv": dict(num_steps=2),
    "recoloradv": dict(num_steps=2, resolution=3),
    "meta_poison": dict(
        model=dict(name="mlp", width=0.0625),
        num_models=2,
        stagger_steps=2,
        pretrain_batch_size=16,
        num_epochs=1,
        step_size=EPS / 2,
    ),
}
# REM and SEM at the error-minimizing model's size, with a 1-step inner adversary.
for _name in ("robust_error_minimizing", "stable_error_minimizing"):
    FAST[_name] = dict(
        model=dict(name="mlp", width=0.0625),
        optimizer=dict(learning_rate=0.1),
        num_epochs=2,
        num_steps=2,
        adversarial_steps=1,
        num_samples=1,
    )
NAMES = sorted(poisons.POISONS)


@pytest.fixture(scope="module", autouse=True)
def fast_compilation():
    """These tests check logic, not speed: skip most XLA optimisations (compiling dominates)."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def dataset():
    """Images on the 8-bit grid with a class-dependent mean colour, so a linear model learns."""
    rng = np.random.default_rng(0)
    y = np.arange(N) % NUM_CLASSES
    # Class means differ by a few ε, so a budget-ε perturbation can cross the boundary.
    means = 0.5 + rng.uniform(-0.05, 0.05, (NUM_CLASSES, 1, 1, 3))
    x = np.clip(means[y] + rng.normal(0, 0.1, (N, *IMAGE_SHAPE)), 0, 1)
    x = (np.round(x * 255) / 255).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y, jnp.int32)


@pytest.fixture(scope="module")
def surrogate(dataset):
    """A small MLP trained on the clean data (full batch Adam): (apply_fn, variables)."""
    x, y = dataset
    module = models.make("mlp", num_classes=NUM_CLASSES, width=0.0625)
    apply_fn = models.make_apply_fn(module)
    params = models.init(module, jax.random.key(0), IMAGE_SHAPE)["params"]
    tx = optax.adam(1e-2)

    def loss(p):
        return jnp.mean(losses.cross_entropy(apply_fn({"params": p}, x, train=False)[0], y))

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, updates), s), None

    params = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=60)[0][0])(params)
    return apply_fn, {"params": params}


@pytest.fixture(scope="module")
def tm():
    return threat.make(epsilon=EPS, norm="linf", quantize=True)


def build(name, tm, surrogate, **extra):
    kwargs = dict(threat=tm, num_classes=NUM_CLASSES, image_shape=IMAGE_SHAPE)
    if name in poisons.REQUIRES_MODEL:
        kwargs.update(apply_fn=surrogate[0], variables=surrogate[1])
    return poisons.make(name, **kwargs, **FAST.get(name, {}), **extra)


@pytest.fixture(scope="module")
def poison_file(dataset, tmp_path_factory):
    """A poison made elsewhere, for `from_file`: the data moved by ±8 levels (< EPS), uint8."""
    x, y = (np.asarray(a) for a in dataset)
    signs = np.random.default_rng(1).choice([-8, 8], x.shape)
    x_u8 = np.clip(np.round(x * 255) + signs, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("file") / "poisoned.npz"
    np.savez(path, x_train=x_u8, y_train=y)
    return path


@pytest.fixture(scope="module")
def crafted(tm, surrogate, dataset, poison_file):
    """crafted(name) -> (poison, state, history, images, labels), crafted once per module;
    ``repeat=1`` crafts again from scratch with the same key (for the determinism test)."""
    cache = {}
    x, y = dataset

    def get(name, repeat=0):
        if (name, repeat) not in cache:
            # The repeat reuses the poison object, so the engine's compiled step is reused.
            extra = {"path": str(poison_file)} if name == "from_file" else {}
            poison = cache[name, 0][0] if repeat else build(name, tm, surrogate, **extra)
            state, history = poisons.craft(
                poison, x, y, key=jax.random.key(0), batch_size=16, progress=False
            )
            images, labels = poisons.apply_all(poison, state, x, y)
            cache[name, repeat] = poison, state, history, images, labels
        return cache[name, repeat]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_invariants(name, crafted, dataset):
    x, y = (np.asarray(a) for a in dataset)
    _, _, _, images, labels = crafted(name)
    assert images.shape == x.shape and np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    # On the 8-bit grid: the threat model quantizes and the clean images are on it.
    np.testing.assert_allclose(images * 255, np.round(images * 255), atol=1e-3)
    if name not in poisons.UNBOUNDED:
        assert np.abs(images - x).max() <= EPS + 1e-6
        assert np.abs(images - x).max() > 0  # it did perturb
    if name == "badnets":  # no fraction given: every image triggered and labelled 0
        assert (labels == 0).all() and (np.abs(images - x).max(axis=(1, 2, 3)) > 0).any()
    elif name == "mislabeling":
        assert not np.array_equal(labels, y) and labels.min() >= 0 and labels.max() < NUM_CLASSES
        np.testing.assert_array_equal(images, x)
    else:
        np.testing.assert_array_equal(labels, y)
    if name == "noise":
        assert np.abs(images - x).mean() > 0.1


@pytest.mark.parametrize("name", NAMES)
def test_same_key_same_poison(name, crafted):
    _, state_a, _, images_a, labels_a = crafted(name)
    _, state_b, _, images_b, labels_b = crafted(name, repeat=1)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    jax.tree.map(np.testing.assert_array_equal, state_a, state_b)


@pytest.mark.parametrize("name", NAMES)
def test_storage_round_trip_and_tampering(name, crafted, dataset, tm, tmp_path):
    x, y = dataset
    poison, state, _, _, _ = crafted(name)
    template = jax.eval_shape(poison.init, jax.random.key(0), {"image": x, "label": y})
    meta = dict(name=name, spec={}, threat=tm, dataset_name="synthetic", fingerprint="f" * 64)
    storage.save(tmp_path / "p", state, **meta)
    loaded, metadata = storage.load(tmp_path / "p", template, fingerprint="f" * 64)
    assert metadata["poison"] == name
    jax.tree.map(np.testing.assert_array_equal, loaded, state)
    images, labels = poisons.apply_all(poison, loaded, x, y)
    np.testing.assert_array_equal(images, crafted(name)[3])

    with pytest.raises(storage.PoisonFileError, match="other training data"):
        storage.load(tmp_path / "p", template, fingerprint="0" * 64)
    with np.load(tmp_path / "p" / "state.npz") as f:
        stored = dict(f)
    floating = [k for k, v in stored.items() if np.issubdtype(v.dtype, np.floating)]
    if floating:  # a diverged (NaN) state is neither saved nor loaded, the leaf named
        stored[floating[0]] = np.full_like(stored[floating[0]], np.nan)
        np.savez(tmp_path / "p" / "state.npz", **stored)
        with pytest.raises(storage.PoisonFileError, match="NaN or infinite"):
            storage.load(tmp_path / "p", template, fingerprint="f" * 64)
        nan_state = jax.tree.map(
            lambda v: jnp.full_like(v, jnp.nan) if jnp.issubdtype(v.dtype, jnp.floating) else v,
            state,
        )
        with pytest.raises(storage.PoisonFileError, match="NaN or infinite"):
            storage.save(tmp_path / "nan", nan_state, **meta)
        assert not (tmp_path / "nan").exists()
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    if name in poisons.UNBOUNDED or not any("delta" in p for p in paths):
        return  # no stored perturbation (substandard sets; generators bound their own output)
    # A perturbation scaled beyond the budget is refused.
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, v: 3 * v if "delta" in jax.tree_util.keystr(path) else v, state
    )
    storage.save(tmp_path / "t", scaled, **meta)
    with pytest.raises(storage.PoisonFileError, match="norm"):
        storage.load(tmp_path / "t", template, fingerprint="f" * 64)


def _accuracy(surrogate, images, labels):
    apply_fn, variables = surrogate
    logits = apply_fn(variables, jnp.asarray(images), train=False)[0]
    return np.asarray(losses.accuracy(logits, jnp.asarray(labels)))


def test_adversarial_moves_the_model_toward_the_targets(crafted, dataset, surrogate):
    x, y = (np.asarray(a) for a in dataset)
    _, _, history, images, _ = crafted("adversarial")
    clean_acc = _accuracy(surrogate, x, y).mean()
    assert clean_acc > 0.9
    assert _accuracy(surrogate, images, y).mean() < clean_acc - 0.5
    assert _accuracy(surrogate, images, (y + 1) % NUM_CLASSES).mean() > 0.5
    assert history["target_rate"][0] > 0.5


def test_hypocritical_makes_examples_easier(crafted, dataset, surrogate):
    x, y = dataset
    apply_fn, variables = surrogate
    images = crafted("hypocritical")[3]
    loss = lambda im: float(
        jnp.mean(losses.cross_entropy(apply_fn(variables, im, train=False)[0], y))
    )
    assert loss(jnp.asarray(images)) < 0.8 * loss(x)


def _crafting_model_loss(state, images, labels):
    module = models.make("mlp", num_classes=NUM_CLASSES, width=0.0625)
    variables = {"params": state.model.params, **state.model.model_state}
    logits = models.make_apply_fn(module)(variables, jnp.asarray(images), train=False)[0]
    return float(jnp.mean(losses.cross_entropy(logits, labels)))


def test_error_minimizing_lowers_the_crafting_model_loss(crafted, dataset):
    x, y = dataset
    _, state, history, images, _ = crafted("error_minimizing")
    assert isinstance(state, error_minimizing.MinMinState)
    assert _crafting_model_loss(state, images, y) < 0.8 * _crafting_model_loss(state, x, y)
    assert history["loss"][-1] < history["loss"][0]


def test_class_wise_error_minimizing_and_stop(dataset, tm, surrogate):
    x, y = dataset
    # stop_accuracy=0 stops after the first pass: the later passes must not touch the state.
    poison = build("error_minimizing", tm, surrogate, class_wise=True, stop_accuracy=0.0)
    state, history = poisons.craft(
        poison, x, y, key=jax.random.key(1), batch_size=16, progress=False
    )
    assert state.delta.shape == (NUM_CLASSES, *IMAGE_SHAPE)
    assert bool(state.done) and len(history["loss"]) == FAST["error_minimizing"]["num_epochs"]
    assert int(state.model.step) == FAST["error_minimizing"]["train_steps"]
    images, labels = poisons.apply_all(poison, state, x, y)
    diff = np.asarray(images) - np.asarray(x)
    assert np.abs(diff).max() <= EPS + 1e-6
    # Every example of class c carries pattern c (except where the [0, 1] box cuts it).
    pattern = np.asarray(state.delta)[np.asarray(y)]
    inside = (np.asarray(x) >= EPS) & (np.asarray(x) <= 1 - EPS)
    np.testing.assert_allclose(diff[inside], pattern[inside], atol=1e-6)
    assert _crafting_model_loss(state, images, y) < _crafting_model_loss(state, x, y)


def test_choose_partial_subsets():
    y = jnp.arange(N) % NUM_CLASSES
    key = jax.random.key(3)
    for kwargs, eligible in [
        (dict(fraction=0.5), np.ones(N, bool)),
        (dict(classes=[1]), np.asarray(y == 1)),
        (dict(fraction=0.25, classes=[0, 2]), np.asarray(y != 1)),
    ]:
        mask = np.asarray(poisons.partial.choose(key, y, **kwargs))
        assert mask.sum() == round(kwargs.get("fraction", 1.0) * eligible.sum())
        assert not (mask & ~eligible).any()


@pytest.mark.parametrize("name", ["random", "mislabeling"])
def test_partial_poisoning(name, dataset, tm, surrogate):
    x, y = (np.asarray(a) for a in dataset)
    poison = build(name, tm, surrogate, fraction=0.5, classes=[0, 2])
    state, _ = poisons.craft(poison, x, y, key=jax.random.key(3), progress=False)
    images, labels = poisons.apply_all(poison, state, x, y)
    changed = (images != x).any(axis=(1, 2, 3)) | (labels != y)
    touched = np.asarray(state.mask)
    assert touched.sum() == (y != 1).sum() // 2 and not (touched & (y == 1)).any()
    assert not (changed & ~touched).any() and changed.sum() > touched.sum() // 2


def test_clean_data_addition_comes_from_outside_the_subset():
    import ml_collections

    from jaxpoison import data
    from jaxpoison.trainers import poisoning

    config = ml_collections.ConfigDict(
        dict(
            data=dict(source="embedded", name="cifar10", num_train=100, num_test=10),
            poisons=dict(p=dict(name="random", clean_extra=20), q=dict(name="random")),
        )
    )
    dataset = data.load(config.data)
    extras = poisoning.clean_additions(config, dataset)
    assert set(extras) == {"p"}
    x_extra, y_extra = extras["p"]
    assert x_extra.shape == (20, 32, 32, 3) and x_extra.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(y_extra, minlength=10), np.full(10, 2))
    subset = {im.tobytes() for im in dataset.x_train}
    assert not any(np.round(im * 255).astype(np.uint8).tobytes() in subset for im in x_extra)


# ----- class-wise patterns are pairwise distinct ------------------------------------------------


def distinct_rows(state):
    flat = np.asarray(state.class_delta).reshape(state.class_delta.shape[0], -1)
    return len({row.tobytes() for row in flat})


@pytest.mark.parametrize("num_classes", [10, 16])
def test_regions_on_one_channel_gives_distinct_patterns(tm, num_classes):
    """Issue 19, bug 7's regression: Regions-4 on one channel has 16 sign patterns, and 10 classes
    drawn independently collided (two classes shared a pattern) for most keys."""
    poison = poisons.make("regions", threat=tm, num_classes=num_classes, image_shape=(8, 8, 1))
    init = jax.jit(poison.init)
    for seed in range(20):
        state = init(jax.random.key(seed), None)
        assert distinct_rows(state) == num_classes
        assert set(np.unique(np.asarray(state.class_delta))) <= {np.float32(-EPS), np.float32(EPS)}
    with pytest.raises(ValueError, match=r"num_patches=4 on 1 channel.*num_patches >= 8"):
        poisons.make("regions", threat=tm, num_classes=17, image_shape=(8, 8, 1))


def test_regions_1_on_rgb_shares_patterns_only_when_asked(tm):
    """Regions-1 on CIFAR-10 (Sandoval-Segura et al.): 8 colours for 10 classes. Refused unless
    ``distinct=False``; then all 8 colours are used and no colour by more than 2 classes."""
    with pytest.raises(ValueError, match=r"num_patches >= 2, or distinct=False"):
        poisons.make("regions", threat=tm, num_classes=10, image_shape=(8, 8, 3), num_patches=1)
    poison = poisons.make(
        "regions", threat=tm, num_classes=10, image_shape=(8, 8, 3), num_patches=1, distinct=False
    )
    for seed in range(5):
        delta = np.asarray(jax.jit(poison.init)(jax.random.key(seed), None).class_delta)
        colours = [row.tobytes() for row in delta[:, 0, 0]]
        assert len(set(colours)) == 8 and max(colours.count(c) for c in colours) == 2
        assert (delta == delta[:, :1, :1]).all()


def test_regions_keeps_a_first_draw_without_collisions(tm):
    """Where the independent draw has no repeated pattern (almost always with 3 channels), the
    patterns are that draw: poisons crafted before distinctness was enforced stay the same."""
    key = jax.random.key(0)
    state = poisons.make("regions", threat=tm, num_classes=3, image_shape=IMAGE_SHAPE).init(
        key, None
    )
    signs = np.where(jax.random.bernoulli(key, 0.5, (3, 2, 2, 3)), 1.0, -1.0)
    expected = np.repeat(np.repeat(signs, 4, axis=1), 4, axis=2) * np.float32(EPS)
    np.testing.assert_array_equal(np.asarray(state.class_delta), expected)


def test_other_class_wise_poisons_refuse_too_few_patterns(tm):
    sign = poisons.make(
        "random", threat=tm, num_classes=16, image_shape=(2, 2, 1), distribution="sign"
    )
    assert distinct_rows(jax.jit(sign.init)(jax.random.key(0), None)) == 16
    with pytest.raises(ValueError, match="distribution='uniform'"):
        poisons.make(
            "random", threat=tm, num_classes=17, image_shape=(2, 2, 1), distribution="sign"
        )
    with pytest.raises(ValueError, match="frequency >= 2"):
        poisons.make("low_frequency", threat=tm, num_classes=3, image_shape=(8, 8, 1), frequency=1)
