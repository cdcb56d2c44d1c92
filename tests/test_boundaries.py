"""The library's boundaries: images entering it (`data.as_float_images`, used by `poisons.craft`
and `poisons.apply_all`), keywords entering a registry's factory (`make` of poisons, objectives,
evaluators, models), and the `register` extension points with a user's poison, objective,
evaluator and flax module.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import data, models, objectives, poisons, threat
from jaxpoison.evaluation import risk
from jaxpoison.poisons.base import Poison, SampleWiseState, apply_sample_wise

pytestmark = pytest.mark.usefixtures("fast_compiles")

EPS = 8 / 255


@pytest.fixture
def registries():
    """Restores every registry (and the poison name sets) after a test that registers."""
    saved = [
        (r, r.copy())
        for r in (
            poisons.POISONS,
            poisons.REQUIRES_MODEL,
            poisons.UNBOUNDED,
            objectives.OBJECTIVES,
            risk.EVALUATORS,
            models.MODELS,
        )
    ]
    yield
    for r, copy in saved:
        r.clear()
        r.update(copy)


def uint8_images(n=12, shape=(8, 8, 3), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


# ----- images --------------------------------------------------------------------------------


def test_uint8_is_divided_by_255_the_same_way_for_numpy_and_jax():
    x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8, 1)
    out = data.as_float_images(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32) / 255.0)
    assert out.min() == 0.0 and out.max() == 1.0
    on_device = data.as_float_images(jnp.asarray(x))
    assert isinstance(on_device, jax.Array) and on_device.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(on_device), out)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, jnp.bfloat16])
def test_floats_in_the_unit_box_pass_as_float32(dtype):
    x = (uint8_images() / 255.0).astype(dtype)
    out = data.as_float_images(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))


@pytest.mark.parametrize(
    "x,match",
    [
        (uint8_images().astype(np.float32), "divide by 255"),
        (uint8_images() / 255.0 - 0.5, "normalised"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN or inf"),
        (np.full((2, 8, 8, 3), np.inf, np.float32), "NaN or inf"),
        (np.zeros((2, 8, 8), np.float32), r"x\[\.\.\., None\]"),
        (uint8_images(shape=(3, 8, 8)), r"np.transpose\(x, \(0, 2, 3, 1\)\)"),
        (uint8_images(shape=(1, 8, 8)), "channel-first"),
        (uint8_images().astype(np.int64), "astype"),
    ],
    ids=["0..255 floats", "normalised", "nan", "inf", "3-d", "NCHW", "NCHW grey", "int64"],
)
def test_bad_images_are_refused_with_the_fix(x, match):
    for images in (x, jnp.asarray(x)):
        with pytest.raises(data.DataError, match=match) as info:
            data.as_float_images(images, what="test images")
        assert "\n" not in str(info.value) and str(info.value).startswith("test images")


def nudge(*, threat, num_classes, image_shape, num_epochs=1):
    """A user's sample-wise poison: one crafting pass pulls each image toward mid-grey."""
    del num_classes, image_shape

    def init(key, dataset):
        del key
        return SampleWiseState(delta=jnp.zeros_like(dataset["image"]))

    def update(state, batch, key):
        del key
        step = threat.project(0.5 - batch["image"], batch["image"])
        delta = state.delta.at[batch["index"]].set(step)
        return SampleWiseState(delta=delta), {"mean_abs": jnp.mean(jnp.abs(step))}

    return Poison(init=init, update=update, apply=apply_sample_wise(threat), num_epochs=num_epochs)


def test_a_registered_poison_and_uint8_images_through_craft_and_apply_all(registries):
    """Bug 4's regression: uint8 images given to `craft` / `apply_all` were taken as floats, so
    99.6% of the poisoned pixels saturated; now they give exactly the result of x / 255."""
    poisons.register("nudge", nudge)
    assert "nudge" not in poisons.REQUIRES_MODEL and "nudge" not in poisons.UNBOUNDED
    tm = threat.make(epsilon=EPS, norm="linf")
    poison = poisons.make("nudge", threat=tm, num_classes=3, image_shape=(8, 8, 3))
    x8, y = uint8_images(), np.arange(12) % 3
    xf = x8.astype(np.float32) / 255.0
    results = []
    for images in (x8, xf, jnp.asarray(x8)):
        state, history = poisons.craft(
            poison, images, y, key=jax.random.key(0), batch_size=4, progress=False
        )
        results.append(poisons.apply_all(poison, state, images, y))
        assert len(history["mean_abs"]) == 1
    for images, labels in results[1:]:
        np.testing.assert_array_equal(images, results[0][0])
        np.testing.assert_array_equal(labels, y)
    poisoned = results[0][0]
    assert np.abs(poisoned - xf).max() <= EPS + 1e-6
    assert (poisoned == 1.0).mean() < 0.05  # uint8 taken as floats saturated nearly every pixel
    with pytest.raises(data.DataError, match="poisons.craft: images .* channel-first"):
        poisons.craft(poison, x8.transpose(0, 3, 1, 2), y, key=jax.random.key(0))
    with pytest.raises(data.DataError, match="poisons.apply_all: images .* divide by 255"):
        poisons.apply_all(poison, state, x8.astype(np.float32), y)
    with pytest.raises(data.DataError, match="labels of shape"):
        poisons.apply_all(poison, state, x8, y[:5])


# ----- factories' keywords ---------------------------------------------------------------------


def test_a_keyword_a_factory_does_not_take_is_one_clear_error():
    """Bug 5's regression: a leaked or misspelt key was a raw TypeError from inside the factory."""
    tm = threat.make(epsilon=EPS, norm="linf")
    common = dict(threat=tm, num_classes=10, image_shape=(8, 8, 3))
    cases = [
        (lambda: poisons.make("regions", name="random", **common), "poison 'regions'", "name"),
        (lambda: poisons.make("random", num_patch=4, **common), "poison 'random'", "num_patch"),
        (lambda: objectives.make("pgd_at", eps=0.1), "objective 'pgd_at'", "eps"),
        (lambda: risk.make("accuracy", apply_fn=None, num_classes=2, bs=3), "'accuracy'", "bs"),
        (lambda: models.make("mlp", num_classes=10, depth=3), "model 'mlp'", "depth"),
    ]
    for call, kind, wrong in cases:
        with pytest.raises(ValueError, match="does not take argument") as info:
            call()
        message = str(info.value)
        assert kind in message and f"['{wrong}']" in message and "it accepts: [" in message
    with pytest.raises(ValueError, match=r"accepts: \[.*'num_patches'.*\]"):
        poisons.make("regions", num_patch=4, **common)
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['threat'\]"):
        poisons.make("regions", num_classes=10, image_shape=(8, 8, 3))


def test_a_type_error_inside_a_factory_is_not_swallowed(registries):
    def broken(**kwargs):
        return len(kwargs) + "1"

    objectives.register("broken", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        objectives.make("broken", anything=1)


# ----- registering --------------------------------------------------------------------------


def test_register_refuses_taken_names_and_non_callables(registries):
    taken = {
        poisons.register: "random",
        objectives.register: "erm",
        risk.register: "accuracy",
        models.register: "mlp",
    }
    for register, name in taken.items():
        with pytest.raises(ValueError, match=f"{name!r} is already registered.*overwrite=True"):
            register(name, len)
        with pytest.raises(ValueError, match="must be callable"):
            register("new", 3)
    poisons.register("random", nudge, requires_model=True, unbounded=True, overwrite=True)
    assert poisons.POISONS["random"] is nudge
    assert "random" in poisons.REQUIRES_MODEL and "random" in poisons.UNBOUNDED
    poisons.register("random", nudge, overwrite=True)
    assert "random" not in poisons.REQUIRES_MODEL and "random" not in poisons.UNBOUNDED


def test_registered_objective_and_evaluator(registries):
    def make_scaled(*, scale=1.0):
        def objective(variables, batch, key, *, apply_fn):
            del key
            logits = apply_fn(variables, batch["image"], train=False)[0]
            return scale * jnp.mean(logits**2), {"model_state": {}, "metrics": {}}

        return objective

    objectives.register("scaled", make_scaled)
    objective = objectives.make("scaled", scale=2.0)
    apply_fn = lambda v, x, train: (x.reshape(x.shape[0], -1) @ v["params"], {})
    loss, _ = objective(
        {"params": jnp.ones((4, 2))}, {"image": jnp.ones((3, 2, 2, 1))}, None, apply_fn=apply_fn
    )
    assert float(loss) == 2.0 * 16.0
    with pytest.raises(ValueError, match=r"objective 'scaled' does not take .*\['scale'\]"):
        objectives.make("scaled", scaling=2.0)

    risk.register("constant", lambda *, apply_fn, num_classes, value=1.0: value)
    assert risk.make("constant", apply_fn=None, num_classes=2, value=3.0) == 3.0
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['num_classes'\]"):
        risk.make("constant", apply_fn=None)


class Linear(nn.Module):
    """A user's classifier with no `width` field."""

    num_classes: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train):
        del train
        return nn.Dense(self.num_classes, use_bias=self.use_bias)(x.reshape(x.shape[0], -1))


def test_a_registered_flax_module_is_built_by_models_make(registries):
    models.register("linear", Linear)
    module = models.make("linear", num_classes=4, use_bias=False)
    assert isinstance(module, Linear) and not module.use_bias
    variables = models.init(module, jax.random.key(0), (8, 8, 3))
    logits, state = models.make_apply_fn(module)(variables, jnp.ones((2, 8, 8, 3)), train=True)
    assert logits.shape == (2, 4) and state == {}
    assert models.make("linear", num_classes=4, width=1.0).num_classes == 4  # the default
    with pytest.raises(ValueError, match=r"model 'linear' does not take argument\(s\) \['width'\]"):
        models.make("linear", num_classes=4, width=0.5)
