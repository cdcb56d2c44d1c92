"""TAP and the options of the shared attack-poison core: augmentation, restarts, ensembles.

Invariants of `tap` on 3- and 1-channel images in the ℓ∞ and ℓ2 balls (bound, [0, 1] box, labels
unchanged, same key => same poison, a rerun resumes from the crafting checkpoint); then each
option against an independent value: the kept restart is, per example, the best of the single
attacks run with the restarts' keys (lowest target loss for TAP, highest loss for
error-maximizing); an ensemble of two copies of one model crafts that model's poison, and an
ensemble of two models follows the averaged loss written out by hand; an augmentation inside
the loss (a fixed flip) equals attacking the flipped image; the surrogate trains k seeds for an
ensemble under its own content key; the GPU config passes the spec check. The unchanged
defaults of P1 and error-maximizing are covered by tests/test_poisons.py.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import attacks, config_lib, data, losses, models, poisons, specs, threat, training
from jaxpoison.poisons.base import SampleWiseState
from jaxpoison.trainers import poisoning
from jaxpoison.workdir import content_key

pytestmark = pytest.mark.usefixtures("fast_compiles")

NUM_CLASSES = 3
N = 24
SHAPES = [(8, 8, 3), (8, 8, 1)]
FAST = dict(num_steps=3, num_restarts=2, crop_padding=1)


def balls():
    return {
        "linf": threat.make(epsilon=8 / 255, norm="linf"),
        "l2": threat.make(epsilon=0.5, norm="l2"),
    }


@pytest.fixture(scope="module")
def problem():
    """{shape: (x, y, apply_fn, [variables of 2 random MLPs])}: images in [0, 1]."""
    out = {}
    module = models.make("mlp", num_classes=NUM_CLASSES, width=0.0625)
    apply_fn = models.make_apply_fn(module)
    for shape in SHAPES:
        x = jax.random.uniform(jax.random.key(1), (N, *shape))
        y = jnp.arange(N, dtype=jnp.int32) % NUM_CLASSES
        variables = [models.init(module, jax.random.key(s), shape) for s in (0, 1)]
        out[shape] = x, y, apply_fn, variables
    return out


def make(shape, tm, problem, **kwargs):
    _, _, apply_fn, variables = problem[shape]
    kwargs = {**FAST, "variables": variables[0], **kwargs}
    return poisons.make(
        "tap", threat=tm, num_classes=NUM_CLASSES, image_shape=shape, apply_fn=apply_fn, **kwargs
    )


def stack(*trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


@pytest.mark.parametrize("shape, norm", [(SHAPES[0], "linf"), (SHAPES[1], "l2")], ids=str)
def test_tap_invariants(shape, norm, problem):
    x, y, _, _ = problem[shape]
    tm = balls()[norm]
    poison = make(shape, tm, problem)
    craft = lambda p, **kw: poisons.craft(
        p, x, y, key=jax.random.key(0), batch_size=8, progress=False, **kw
    )
    state, history = craft(poison)
    images, labels = (np.asarray(a) for a in poisons.apply_all(poison, state, x, y))
    delta = images - np.asarray(x)
    assert np.abs(delta).max() > 0
    assert (np.asarray(tm.norm_of(jnp.asarray(delta))) <= tm.epsilon + 1e-5).all()
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(labels, np.asarray(y))
    assert set(history) == {"accuracy", "loss", "target_rate"}
    np.testing.assert_array_equal(np.asarray(craft(poison)[0].delta), np.asarray(state.delta))


def test_crafting_resumes_from_its_checkpoint(problem, tmp_path):
    """A rerun with the checkpoint reloads the crafted pass (a poison with other steps would
    craft another delta)."""
    x, y, _, _ = problem[SHAPES[0]]
    tm = balls()["linf"]
    craft = lambda p, **kw: poisons.craft(
        p, x, y, key=jax.random.key(0), batch_size=8, progress=False, **kw
    )
    first, history = craft(make(SHAPES[0], tm, problem, num_restarts=1), ckpt_dir=tmp_path)
    other = make(SHAPES[0], tm, problem, num_restarts=1, num_steps=1)
    resumed, again = craft(other, ckpt_dir=tmp_path)
    np.testing.assert_array_equal(np.asarray(resumed.delta), np.asarray(first.delta))
    assert again == history
    assert np.abs(np.asarray(craft(other)[0].delta) - np.asarray(first.delta)).max() > 0


def _update(poison, x, y, key):
    """One crafting step on the whole of (x, y): the delta of every example."""
    state = poison.init(None, {"image": x, "label": y})
    batch = {"image": x, "label": y, "index": jnp.arange(len(y))}
    return np.asarray(jax.jit(poison.update)(state, batch, key)[0].delta)


def _target_loss(apply_fn, variables, x, y):
    logits = apply_fn(variables, jnp.asarray(x), train=False)[0]
    return np.asarray(losses.cross_entropy(logits, (y + 1) % NUM_CLASSES))


def test_restarts_keep_the_best_attack_of_each_example(problem):
    shape = SHAPES[0]
    x, y, apply_fn, variables = problem[shape]
    tm, key, r = balls()["l2"], jax.random.key(5), 3
    best = _update(make(shape, tm, problem, num_restarts=r), x, y, key)
    single = jax.jit(make(shape, tm, problem, num_restarts=1).update)
    state = SampleWiseState(delta=jnp.zeros_like(x))
    batch = {"image": x, "label": y, "index": jnp.arange(N)}
    tries = np.stack([single(state, batch, k)[0].delta for k in jax.random.split(key, r)])
    scores = np.stack([_target_loss(apply_fn, variables[0], x + d, y) for d in tries])
    assert (np.ptp(scores, axis=0) > 1e-6).mean() > 0.5  # the restarts do differ
    np.testing.assert_allclose(best, tries[np.argmin(scores, axis=0), np.arange(N)], atol=1e-6)


def test_ensemble_averages_the_models_losses(problem):
    shape = SHAPES[0]
    x, y, apply_fn, (v0, v1) = problem[shape]
    tm, key = balls()["linf"], jax.random.key(2)
    one = dict(num_restarts=1, crop_padding=0, flip=False)
    alone = _update(make(shape, tm, problem, **one, variables=v0), x, y, key)
    twins = make(shape, tm, problem, **one, variables=stack(v0, v0), num_models=2)
    np.testing.assert_array_equal(_update(twins, x, y, key), alone)
    pair = _update(
        make(shape, tm, problem, **one, variables=stack(v0, v1), num_models=2), x, y, key
    )
    by_hand = attacks.pgd(
        lambda z, t: sum(_ce(apply_fn, v, z, (t + 1) % NUM_CLASSES) for v in (v0, v1)) / 2,
        x,
        y,
        key=key,
        threat=tm,
        num_steps=FAST["num_steps"],
        step_size=tm.epsilon / 20,
        maximize=False,
    )
    np.testing.assert_allclose(pair, np.asarray(by_hand), atol=1e-6)
    assert np.abs(pair - alone).max() > 0


def _ce(apply_fn, variables, x, y):
    return losses.cross_entropy(apply_fn(variables, x, train=False)[0], y)


def test_augmentation_enters_the_loss(problem):
    """A flip of every image inside the loss = attacking the flipped image, flipped back."""
    x, y, apply_fn, (v0, _) = problem[SHAPES[0]]
    tm = balls()["linf"]
    loss_fn = lambda z, t: _ce(apply_fn, v0, z, t)
    kw = dict(key=jax.random.key(0), threat=tm, num_steps=4, step_size=tm.epsilon / 4)
    flip = lambda z: z[:, :, ::-1]
    inside = attacks.pgd(loss_fn, x, y, random_start=False, augment_fn=lambda k, z: flip(z), **kw)
    outside = attacks.pgd(loss_fn, flip(x), y, random_start=False, **kw)
    np.testing.assert_allclose(np.asarray(inside), np.asarray(flip(outside)), atol=1e-7)
    # TAP's random crops and flips change the poison, and it still holds the bound.
    tap = make(SHAPES[0], tm, problem, num_restarts=1)
    plain = make(SHAPES[0], tm, problem, num_restarts=1, crop_padding=0, flip=False)
    augmented = _update(tap, x, y, jax.random.key(3))
    assert np.abs(augmented - _update(plain, x, y, jax.random.key(3))).max() > 0
    assert np.abs(augmented).max() <= tm.epsilon + 1e-6


@pytest.mark.parametrize(
    "field, value",
    [("num_models", 0), ("num_restarts", 1.5), ("crop_padding", -1), ("num_restarts", True)],
)
def test_bad_counts_are_one_clear_error(field, value, problem):
    with pytest.raises(ValueError, match=rf"^{field}={value!r}: give a whole number >= \d\.$"):
        make(SHAPES[0], balls()["linf"], problem, **{field: value})


def test_error_maximizing_restarts_keep_the_highest_loss(problem):
    """Through `error_maximizing` (P1 takes the same options): an ensemble with restarts and
    augmentation; the kept restart has the higher ensemble loss to the true label."""
    x, y, apply_fn, (v0, v1) = problem[SHAPES[0]]
    tm = balls()["linf"]
    kwargs = dict(
        threat=tm,
        num_classes=NUM_CLASSES,
        image_shape=SHAPES[0],
        apply_fn=apply_fn,
        variables=stack(v0, v1),
        num_models=2,
        crop_padding=1,
        flip=True,
        num_steps=2,
    )
    poisons.make("adversarial", num_restarts=2, **kwargs)
    key = jax.random.key(0)
    best = _update(poisons.make("error_maximizing", num_restarts=2, **kwargs), x, y, key)
    single = jax.jit(poisons.make("error_maximizing", num_restarts=1, **kwargs).update)
    state = SampleWiseState(delta=jnp.zeros_like(x))
    batch = {"image": x, "label": y, "index": jnp.arange(N)}
    tries = np.stack([single(state, batch, k)[0].delta for k in jax.random.split(key, 2)])
    loss = lambda d: sum(_ce(apply_fn, v, x + d, y) for v in (v0, v1)) / 2
    scores = np.stack([loss(d) for d in tries])
    np.testing.assert_allclose(best, tries[np.argmax(scores, axis=0), np.arange(N)], atol=1e-6)
    assert 0 < np.abs(best).max() <= tm.epsilon + 1e-6


def test_surrogate_ensemble_is_k_seeds_under_its_own_key(tmp_path):
    ds = data.load(source="embedded", name="cifar10", num_train=60, num_test=30)
    config = ml_collections.ConfigDict(
        dict(
            data=dict(crop_padding=0, flip=False),
            surrogate=dict(
                model=dict(name="mlp", width=0.0625),
                epochs=1,
                batch_size=30,
                eval_batch_size=30,
                optimizer=dict(name="adam", learning_rate=1e-3, weight_decay=0.0),
            ),
        )
    )
    _, variables, key = poisoning.train_surrogate(
        config, ds, key=jax.random.key(0), workdir=tmp_path, progress=False, num_models=2
    )
    trainer = training.Trainer.from_config(
        specs.surrogate(config, image_shape=ds.image_shape, num_classes=ds.num_classes),
        image_shape=ds.image_shape,
        num_classes=ds.num_classes,
    )
    td = training.train_data_from(ds.x_train, ds.y_train, ds)
    records = {
        k: content_key(trainer.record(td, key=jax.random.key(0), num_seeds=k)) for k in (1, 2)
    }
    assert key == records[2] != records[1]
    one = models.init(trainer.module, jax.random.key(0), ds.image_shape)
    leaves = jax.tree.leaves(variables)
    assert [a.shape for a in leaves] == [(2, *a.shape) for a in jax.tree.leaves(one)]
    assert any(np.abs(np.asarray(a[0] - a[1])).max() > 0 for a in leaves)


def test_the_gpu_config_passes_the_spec_check():
    spec = importlib_config("configs/poisons/tap_cifar10.py")
    for arg in (None, "tiny"):
        config = spec.get_config(arg)
        specs.check(config, image_shape=(32, 32, 3), num_classes=10)
        assert config.poisons.tap.num_steps == (2 if arg else 250)
    assert config_lib.FAMILY_SPECS["tap"]["name"] == "tap"


def importlib_config(path):
    import importlib.util
    from pathlib import Path

    file = Path(__file__).resolve().parents[1] / path
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
