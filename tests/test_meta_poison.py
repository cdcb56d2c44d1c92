"""The MetaPoison-style availability poison (`jaxpoison.poisons.meta_poison`) on tiny data.

A 1/16-width MLP ensemble of two victims staggered by two steps, K = 2 unrolled steps, 8x8
images: the poison invariants in ℓ∞ (3 channels) and ℓ2 (1 channel), same key => same poison,
the class-wise patterns, the ensemble's staggered ages, a killed craft resuming to the same
state, the config errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import poisons, threat
from jaxpoison.poisons import meta_poison

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES, N, BATCH = 3, 24, 8
EPS = {"linf": 16 / 255, "l2": 0.5}
FAST = dict(
    model=dict(name="mlp", width=0.0625),
    unroll_steps=2,
    num_models=2,
    stagger_steps=2,
    pretrain_batch_size=8,
    num_epochs=2,
)
UPDATES = FAST["num_epochs"] * N // BATCH


def dataset(channels, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(N) % NUM_CLASSES
    means = 0.5 + rng.uniform(-0.05, 0.05, (NUM_CLASSES, 1, 1, channels))
    x = np.clip(means[y] + rng.normal(0, 0.1, (N, 8, 8, channels)), 0, 1)
    return jnp.asarray(np.round(x * 255) / 255, jnp.float32), jnp.asarray(y, jnp.int32)


def make(norm, channels, **kwargs):
    return poisons.make(
        "meta_poison",
        threat=threat.make(epsilon=EPS[norm], norm=norm),
        num_classes=NUM_CLASSES,
        image_shape=(8, 8, channels),
        **(FAST | kwargs),
    )


def craft(poison, x, y, *, key=0, **kwargs):
    return poisons.craft(
        poison, x, y, key=jax.random.key(key), batch_size=BATCH, progress=False, **kwargs
    )


CASES = [("linf", 3), ("l2", 1)]


@pytest.fixture(scope="module")
def crafted():
    cache = {}

    def get(norm, channels):
        if (norm, channels) not in cache:
            x, y = dataset(channels)
            poison = make(norm, channels)
            cache[norm, channels] = (poison, *craft(poison, x, y))
        return cache[norm, channels]

    return get


@pytest.mark.parametrize("norm,channels", CASES)
def test_invariants_and_same_key_same_poison(crafted, norm, channels):
    x, y = dataset(channels)
    poison, state, history = crafted(norm, channels)
    images, labels = poisons.apply_all(poison, state, x, y)
    diff = (images - np.asarray(x)).reshape(N, -1)
    size = np.abs(diff).max(1) if norm == "linf" else np.linalg.norm(diff, axis=1)
    assert size.max() <= EPS[norm] * (1 + 1e-5)
    assert size.min() > 0.1 * EPS[norm]  # every example was stepped
    assert images.min() >= 0.0 and images.max() <= 1.0 and np.isfinite(images).all()
    np.testing.assert_array_equal(labels, y)
    assert len(history["meta/objective"]) == FAST["num_epochs"]
    assert np.isfinite(history["meta/objective"]).all()
    again, _ = craft(poison, x, y)
    jax.tree.map(np.testing.assert_array_equal, state, again)
    other, _ = craft(poison, x, y, key=1)
    assert not np.array_equal(np.asarray(other.delta), np.asarray(state.delta))


def test_class_wise_patterns():
    """class_wise=True: one pattern per class in the ball, every image of a class moved by it
    (clipped to the box), labels kept, same key => same patterns; with the victims' real steps
    on the poisoned batch (trajectory='poison')."""
    x, y = dataset(3)
    poison = make("linf", 3, class_wise=True, trajectory="poison")
    state, history = craft(poison, x, y)
    table = np.asarray(state.delta)
    assert table.shape == (NUM_CLASSES, 8, 8, 3)
    assert np.abs(table).max() <= EPS["linf"] * (1 + 1e-6)
    assert np.abs(table).reshape(NUM_CLASSES, -1).max(1).min() > 0.1 * EPS["linf"]
    images, labels = poisons.apply_all(poison, state, x, y)
    np.testing.assert_allclose(
        images, np.clip(np.asarray(x) + table[np.asarray(y)], 0, 1), atol=1e-6
    )
    np.testing.assert_array_equal(labels, y)
    assert np.isfinite(history["meta/objective"]).all()
    again, _ = craft(poison, x, y)
    jax.tree.map(np.testing.assert_array_equal, state, again)


def test_victims_are_staggered_and_restart(crafted):
    """Victim m starts m·S steps into training, every update trains each one step, and a victim
    reaching M·S steps restarts: its step counter always equals its age."""
    _, state, _ = crafted("linf", 3)
    lifetime = FAST["num_models"] * FAST["stagger_steps"]
    start = np.arange(FAST["num_models"]) * FAST["stagger_steps"]
    ensemble = state.extra
    np.testing.assert_array_equal(ensemble.ages, (start + UPDATES) % lifetime)
    np.testing.assert_array_equal(ensemble.victims.step, ensemble.ages)
    assert int(ensemble.step) == UPDATES
    x, y = dataset(3)
    fresh = jax.jit(make("linf", 3).init)(jax.random.key(0), {"image": x, "label": y})
    np.testing.assert_array_equal(fresh.extra.victims.step, start)
    kernel = fresh.extra.victims.params["Dense_0"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # distinct inits, not one copied


def test_killed_craft_resumes_to_the_same_state(crafted, tmp_path):
    x, y = dataset(1)
    poison, whole, _ = crafted("l2", 1)
    craft(make("l2", 1, num_epochs=1), x, y, ckpt_dir=tmp_path)
    resumed, history = craft(poison, x, y, ckpt_dir=tmp_path)
    assert len(history["meta/objective"]) == 2
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)


def test_registry_and_bad_settings():
    assert poisons.POISONS["meta_poison"] is meta_poison.meta_poison
    for kwargs, message in [
        (dict(unroll_steps=0), "unroll_steps=0 must be >= 1"),
        (dict(num_models=0), "num_models=0 must be >= 1"),
        (dict(stagger_steps=0), "stagger_steps=0 must be >= 1"),
        (dict(trajectory="mixed"), "trajectory='mixed'"),
        (dict(step_size=0.0), "step_size=0.0 must be > 0"),
        (dict(class_wise="yes"), "class_wise='yes' must be True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            make("linf", 3, **kwargs)
