"""REM and SEM noise (`jaxpoison.poisons.robust`) on tiny data with a tiny MLP crafting model.

The poison invariants for both, in ℓ∞ and ℓ2, on 3- and 1-channel images: the bound, the [0, 1]
box, labels unchanged, same key => same poison; the crafting model trained adversarially on every
batch, no stop; a killed craft resumes to the same state; class-wise patterns; the point of REM
(its noise keeps the crafting model's loss low *under its adversary*) and the configs' refusals.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import attacks, losses, models, poisons, threat
from jaxpoison.poisons import error_minimizing

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 3
N, BATCH = 48, 16
EPS = {"linf": 16 / 255, "l2": 0.5}
# Two passes of three batches; PGD, noise descent and augmentation all cut to a few steps.
FAST = dict(
    model=dict(name="mlp", width=0.0625),
    optimizer=dict(learning_rate=0.1),
    num_epochs=2,
    num_steps=3,
    adversarial_steps=2,
    num_samples=2,
    crop_padding=2,
)


def dataset(channels, seed=0):
    """Images on the 8-bit grid with a class-dependent mean colour, so a linear model learns."""
    rng = np.random.default_rng(seed)
    y = np.arange(N) % NUM_CLASSES
    means = 0.5 + rng.uniform(-0.05, 0.05, (NUM_CLASSES, 1, 1, channels))
    x = np.clip(means[y] + rng.normal(0, 0.1, (N, 8, 8, channels)), 0, 1)
    return jnp.asarray(np.round(x * 255) / 255, jnp.float32), jnp.asarray(y, jnp.int32)


def make(name, norm, channels, **kwargs):
    tm = threat.make(epsilon=EPS[norm], norm=norm)
    return poisons.make(
        name,
        threat=tm,
        num_classes=NUM_CLASSES,
        image_shape=(8, 8, channels),
        **(FAST | kwargs),
    )


def craft(poison, x, y, *, key=0, **kwargs):
    return poisons.craft(
        poison, x, y, key=jax.random.key(key), batch_size=BATCH, progress=False, **kwargs
    )


# (name, norm, channels, class_wise): each poison in both norms and on both image shapes.
CASES = [
    ("robust_error_minimizing", "linf", 3, False),
    ("robust_error_minimizing", "l2", 1, False),
    ("stable_error_minimizing", "linf", 3, False),
    ("stable_error_minimizing", "l2", 1, True),
]


@pytest.fixture(scope="module")
def crafted():
    """crafted(*case) -> (poison, state, history), crafted once per module (the poison object
    is reused, so later crafts with it reuse its compiled step)."""
    cache = {}

    def get(*case):
        if case not in cache:
            name, norm, channels, class_wise = case
            x, y = dataset(channels)
            poison = make(name, norm, channels, class_wise=class_wise)
            cache[case] = (poison, *craft(poison, x, y))
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(map(str, case)))
def test_invariants_and_same_key_same_poison(crafted, case):
    _, norm, channels, _ = case
    x, y = dataset(channels)
    poison, state, history = crafted(*case)
    images, labels = poisons.apply_all(poison, state, x, y)
    diff = (images - np.asarray(x)).reshape(N, -1)
    size = np.abs(diff).max(1) if norm == "linf" else np.linalg.norm(diff, axis=1)
    assert size.max() <= EPS[norm] * (1 + 1e-5)
    assert size.min() > 0.1 * EPS[norm]  # every example carries noise
    assert images.min() >= 0.0 and images.max() <= 1.0 and np.isfinite(images).all()
    np.testing.assert_array_equal(labels, y)
    assert isinstance(state, error_minimizing.MinMinState)
    # The crafting model trains on every batch (train_steps=None) and nothing stops it.
    assert int(state.model.step) == FAST["num_epochs"] * N // BATCH and not bool(state.done)
    assert len(history["loss"]) == FAST["num_epochs"] and np.isfinite(history["loss"]).all()
    again, _ = craft(poison, x, y)
    jax.tree.map(np.testing.assert_array_equal, state, again)
    other, _ = craft(poison, x, y, key=1)
    assert not np.array_equal(np.asarray(other.delta), np.asarray(state.delta))


def test_rem_and_sem_differ_only_in_the_inner_perturbation(crafted):
    """Same key and settings: REM's PGD adversary and SEM's uniform noise give other noise."""
    rem = crafted("robust_error_minimizing", "linf", 3, False)[1]
    sem = crafted("stable_error_minimizing", "linf", 3, False)[1]
    assert not np.allclose(np.asarray(rem.delta), np.asarray(sem.delta))


def test_killed_craft_resumes_to_the_same_state(crafted, tmp_path):
    """One pass checkpointed, then the two-pass craft resumed from it = two passes at once."""
    x, y = dataset(3)
    poison, whole, _ = crafted("robust_error_minimizing", "linf", 3, False)
    craft(make("robust_error_minimizing", "linf", 3, num_epochs=1), x, y, ckpt_dir=tmp_path)
    resumed, history = craft(poison, x, y, ckpt_dir=tmp_path)
    assert len(history["loss"]) == 2
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)


def test_class_wise_patterns(crafted):
    x, y = dataset(1)
    poison, state, _ = crafted("stable_error_minimizing", "l2", 1, True)
    assert state.delta.shape == (NUM_CLASSES, 8, 8, 1)
    assert np.linalg.norm(np.asarray(state.delta).reshape(NUM_CLASSES, -1), axis=1).max() <= (
        EPS["l2"] * (1 + 1e-5)
    )
    images, _ = poisons.apply_all(poison, state, x, y)
    # Every example of class c carries pattern c where the [0, 1] box does not cut it.
    diff = images - np.asarray(x)
    pattern = np.asarray(state.delta)[np.asarray(y)]
    inside = (np.asarray(x) + pattern >= 0) & (np.asarray(x) + pattern <= 1)
    np.testing.assert_allclose(diff[inside], pattern[inside], atol=1e-6)
    assert inside.mean() > 0.9


def test_rem_noise_holds_under_the_adversary():
    """The point of REM: on its noisy data the (adversarially trained) crafting model's loss at
    the PGD worst case of radius ε_a stays well below its worst-case loss on the clean data."""
    x, y = dataset(3)
    poison = make(
        "robust_error_minimizing", "linf", 3, num_epochs=6, num_steps=5, crop_padding=0, flip=False
    )
    state, _ = craft(poison, x, y)
    images, _ = poisons.apply_all(poison, state, x, y)
    apply_fn = models.make_apply_fn(models.make("mlp", num_classes=NUM_CLASSES, width=0.0625))
    variables = {"params": state.model.params, **state.model.model_state}
    loss_fn = attacks.model_loss(apply_fn, variables)
    ball = threat.make(epsilon=EPS["linf"] / 2)

    def worst_case_loss(images):
        images = jnp.asarray(images)
        delta = attacks.pgd(
            loss_fn, images, y, key=jax.random.key(5), threat=ball, num_steps=10, step_size=1 / 255
        )
        logits = apply_fn(variables, images + delta, train=False)[0]
        return float(jnp.mean(losses.cross_entropy(logits, y)))

    poisoned, clean = worst_case_loss(images), worst_case_loss(x)
    assert poisoned < 0.7 * clean


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adversarial_epsilon=32 / 255), "adversarial_epsilon=.* must be in"),
        (dict(adversarial_epsilon=0.0), "adversarial_epsilon=0.0 must be in"),
        (dict(num_samples=0), "num_samples=0 must be a whole number >= 1"),
        (dict(adversarial_steps=1.5), "adversarial_steps=1.5 must be a whole number"),
        (dict(crop_padding=-1), "crop_padding=-1 must be a whole number of pixels"),
        (dict(train_steps=0), "train_steps=0 must be a whole number >= 1, or None"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make("robust_error_minimizing", "linf", 3, **kwargs)
