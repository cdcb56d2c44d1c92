"""BadNets (`jaxpoison.poisons.badnets`) and the ``backdoor`` evaluator.

The trigger's pixels are set exactly and no other pixel moves; only the chosen fraction of the
set is triggered and relabelled (to the target, or y + 1 all-to-all); the same key gives the same
subset; 1- and 3-channel images; bad trigger settings are refused. End to end on the digits set:
an MLP trained with 10 % of its training set poisoned classifies >= 90 % of the triggered test
images of the other classes as the target, and its clean accuracy stays within a few points of a
clean-trained one.
"""

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, evaluation, poisons, threat, training
from jaxpoison.poisons import badnets

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 10
N = 200
TM = threat.make(epsilon=8 / 255, quantize=True)


def images(shape, n=N, seed=0):
    """Random images on the 8-bit grid, labels cycling over the classes."""
    x = np.random.default_rng(seed).integers(0, 256, (n, *shape)) / 255.0
    return x.astype(np.float32), np.arange(n, dtype=np.int32) % NUM_CLASSES


def poisoned(shape, *, key=0, x=None, y=None, **kwargs):
    if x is None:
        x, y = images(shape)
    poison = poisons.make(
        "badnets", threat=TM, num_classes=NUM_CLASSES, image_shape=shape, **kwargs
    )
    state, history = poisons.craft(poison, x, y, key=jax.random.key(key), progress=False)
    assert history == {} and poison.num_epochs == 0
    out_x, out_y = poisons.apply_all(poison, state, x, y)
    return x, y, np.asarray(out_x), np.asarray(out_y)


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (10, 12, 3)])  # 28x28x1: MNIST
def test_trigger_pixels_set_exactly_on_the_chosen_fraction(shape):
    h, w, c = shape
    x, y, px, py = poisoned(shape, fraction=0.1, target=2)
    checker = np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], np.float32)[..., None]
    patch = px[:, h - 3 :, w - 3 :]
    # Random clean images never hold the exact checkerboard: these are the triggered ones.
    stamped = np.flatnonzero(np.all(patch == np.broadcast_to(checker, (3, 3, c)), axis=(1, 2, 3)))
    assert len(stamped) == 20  # round(0.1 * 200)
    np.testing.assert_array_equal(py[stamped], 2)
    clean = np.setdiff1d(np.arange(N), stamped)
    np.testing.assert_array_equal(px[clean], x[clean])
    np.testing.assert_array_equal(py[clean], y[clean])
    # Outside the patch no pixel of any image moves.
    outside = np.ones((h, w), bool)
    outside[h - 3 :, w - 3 :] = False
    np.testing.assert_array_equal(px[:, outside], x[:, outside])


def test_same_key_same_subset_other_key_another():
    shape = (8, 8, 1)
    _, _, px, py = poisoned(shape, fraction=0.2)
    _, _, qx, qy = poisoned(shape, fraction=0.2)
    np.testing.assert_array_equal(px, qx)
    np.testing.assert_array_equal(py, qy)
    _, _, rx, _ = poisoned(shape, key=1, fraction=0.2)
    assert not np.array_equal(px, rx)


def test_all_to_all_position_and_explicit_pattern():
    shape = (6, 6, 3)
    pattern = np.linspace(0, 1, 2 * 2 * 3).reshape(2, 2, 3)
    x, y, px, py = poisoned(
        shape, all_to_all=True, patch_size=2, position=(1, 3), pattern=pattern.tolist()
    )
    np.testing.assert_array_equal(py, (y + 1) % NUM_CLASSES)
    expected = x.copy()
    expected[:, 1:3, 3:5] = np.round(pattern * 255) / 255  # quantized to the 8-bit grid
    np.testing.assert_allclose(px, expected, atol=1e-7)
    # A white top-left square, unquantized threat.
    full, mask = badnets.trigger(shape, patch_size=2, position="top_left", pattern="white")
    assert full[:2, :2].min() == 1 and full.sum() == 12 and mask.sum() == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=9), "patch_size=9 must be"),
        (dict(position=(6, 0)), r"outside the 8x8 image"),
        (dict(position="middle"), "position='middle' is unknown"),
        (dict(pattern="stripes"), "pattern='stripes' is unknown"),
        (dict(pattern=[[2.0]]), r"values in \[0, 1\]"),
        (dict(target=10), "target=10 must be a class index in 0..9"),
    ],
)
def test_bad_trigger_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        poisons.make("badnets", threat=TM, num_classes=NUM_CLASSES, image_shape=(8, 8, 1), **kwargs)


@flax.struct.dataclass
class SeedStates:
    """What an evaluator reads of a `TrainState`: params and model state, a leading seed axis."""

    params: jax.Array
    model_state: dict


@pytest.mark.parametrize("all_to_all", [False, True])
def test_backdoor_evaluator_counts_by_definition(all_to_all):
    """A hand-made model: an image encodes its class in pixel (0, 0) and whether the backdoor
    works on it in pixel (0, 1); it answers the class, or the backdoor's label when the
    checkerboard's corner pixels are set and the flag is on."""
    n, shape, target = 101, (6, 6, 1), 3
    rng = np.random.default_rng(0)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    vulnerable = rng.random(n) < 0.6
    x = np.zeros((n, *shape), np.float32)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = y / 10, vulnerable

    def apply_fn(variables, images, *, train):
        del variables, train
        label = jnp.round(images[:, 0, 0, 0] * 10).astype(int)
        goal = (label + 1) % NUM_CLASSES if all_to_all else jnp.full_like(label, target)
        on = (images[:, 5, 5, 0] == 1) & (images[:, 5, 4, 0] == 0) & (images[:, 0, 1, 0] == 1)
        return jax.nn.one_hot(jnp.where(on, goal, label), NUM_CLASSES), {}

    evaluator = evaluation.risk.make(
        "backdoor",
        apply_fn=apply_fn,
        num_classes=NUM_CLASSES,
        target=target,
        all_to_all=all_to_all,
        batch_size=16,
    )
    states = SeedStates(params=np.zeros((2, 1), np.float32), model_state={})  # 2 seeds
    out = {k: np.asarray(v) for k, v in evaluator(states, x, y, key=jax.random.key(0)).items()}
    assert out["asr"].shape == (2,)
    counted = np.ones(n, bool) if all_to_all else y != target
    hit = vulnerable & counted
    np.testing.assert_allclose(out["asr"], hit.sum() / counted.sum(), rtol=1e-6)
    np.testing.assert_array_equal(out["n/asr"], counted.sum())
    np.testing.assert_array_equal(out["acc/D"], 1.0)
    # Triggered images keep their class where the backdoor is off or, all-to-one, is the class.
    triggered_correct = ~vulnerable | ((y == target) & (not all_to_all))
    np.testing.assert_allclose(out["acc/triggered"], triggered_correct.mean(), rtol=1e-6)


@pytest.fixture(scope="module")
def digits():
    ds = data.load(ml_collections.ConfigDict(dict(source="digits", name="digits")))
    return ds


def fit(ds, x, y):
    victim = ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.5),
            epochs=8,
            batch_size=64,
            num_seeds=1,
            optimizer=dict(name="adam", learning_rate=3e-3, weight_decay=0.0, schedule="cosine"),
            objective=dict(name="erm"),
        )
    )
    trainer = training.Trainer.from_config(
        victim, num_classes=ds.num_classes, image_shape=ds.image_shape
    )
    td = training.train_data_from(x, y, ds)
    states, _ = trainer.fit(td, key=jax.random.key(0), progress=False)
    evaluator = evaluation.risk.make(
        "backdoor", apply_fn=trainer.apply_fn, num_classes=ds.num_classes, target=0
    )
    return {
        k: np.asarray(v)[0]
        for k, v in evaluator(states, td.x_test, td.y_test, key=jax.random.key(1)).items()
    }


def test_backdoor_learned_at_ten_percent_clean_accuracy_kept(digits):
    ds = digits
    x, y = ds.x_train.astype(np.float32) / 255.0, ds.y_train
    clean = fit(ds, x, y)
    _, _, px, py = poisoned(ds.image_shape, x=x, y=y, fraction=0.1, target=0)
    attacked = fit(ds, px, py)
    assert clean["n/asr"] == attacked["n/asr"] == np.sum(ds.y_test != 0)
    assert clean["asr"] < 0.3, clean  # the trigger alone does not make a clean model say 0
    assert attacked["asr"] >= 0.9, attacked
    assert clean["acc/D"] > 0.85 and attacked["acc/D"] >= clean["acc/D"] - 0.04, (clean, attacked)
