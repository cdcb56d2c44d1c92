"""Data-side defenses (`jaxpoison.transforms`): ISS compressions against their definitions and
Pillow's JPEG on real images, the augmentations' invariants, and the trainer running them."""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxpoison import data, losses, objectives, specs, training, transforms
from jaxpoison.transforms import augment, compression, projection


def _pillow_jpeg(images, quality):
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(buf, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out.append(decoded[..., None] if decoded.ndim == 2 else decoded)
    return np.stack(out)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2, 3))
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@pytest.fixture(scope="module")
def real_images(shared_data_dir):
    with np.load(shared_data_dir / "cifar10.npz") as d:
        cifar = d["x_test"][:64]
    with np.load(shared_data_dir / "mnist.npz") as d:
        mnist = d["x_test"][:64]
    return {"cifar10": cifar, "mnist": mnist}


@pytest.mark.parametrize("dataset", ["cifar10", "mnist"])
@pytest.mark.parametrize("quality", [10, 50, 90])
def test_jpeg_matches_pillow_on_real_images(real_images, dataset, quality):
    x = real_images[dataset]
    ours = compression.jpeg(quality=quality)(jnp.asarray(x / 255.0, jnp.float32))
    ours = np.asarray(jnp.round(ours * 255.0)).astype(np.uint8)
    ref = _pillow_jpeg(x, quality)
    # The bar: the same distortion as Pillow's encoder (PSNR to the original within
    # 0.5 dB); measured within 0.06 dB, and ours is within a few 8-bit steps of Pillow's output.
    assert abs(_psnr(ours, x) - _psnr(ref, x)) < 0.5
    assert _psnr(ours, ref) > 40.0
    assert not np.array_equal(ours, x)


def test_jpeg_straight_through_gradient_and_same_forward(real_images):
    x = jnp.asarray(real_images["cifar10"][:2] / 255.0, jnp.float32)
    hard, soft = compression.jpeg(quality=10), compression.jpeg(quality=10, differentiable=True)
    np.testing.assert_array_equal(np.asarray(hard(x)), np.asarray(soft(x)))
    g_hard = jax.jit(jax.grad(lambda a: jnp.sum(hard(a) * x)))(x)
    g_soft = jax.jit(jax.grad(lambda a: jnp.sum(soft(a) * x)))(x)
    assert np.all(np.asarray(g_hard) == 0.0)
    assert np.abs(np.asarray(g_soft)).mean() > 0.1


def test_quantization_tables_follow_libjpeg_scaling():
    luma, chroma = compression.quantization_tables(50)
    assert luma[0, 0] == 16 and chroma[0, 0] == 17 and luma[7, 7] == 99
    luma, _ = compression.quantization_tables(10)  # scale 500: 16 -> 80, capped at 255
    assert luma[0, 0] == 80 and luma.max() == 255
    assert np.all(compression.quantization_tables(100)[0] == 1)


def test_grayscale_bit_depth_and_blur_definitions(tiny_images):
    x = jnp.asarray(tiny_images[0])
    gray = np.asarray(compression.grayscale()(x))
    np.testing.assert_allclose(gray[..., 0], np.asarray(x) @ [0.299, 0.587, 0.114], rtol=1e-5)
    assert np.all(gray[..., 0] == gray[..., 2])
    one = x[..., :1]
    assert compression.grayscale()(one) is one
    levels = np.unique(np.round(np.asarray(compression.bit_depth(bits=2)(x)) * 255))
    assert set(levels) <= {0, 64, 128, 192}
    # APBench's blur (3x3, sigma 0.1) changes no 8-bit value; sigma 1 is a reflect-padded
    # separable Gaussian.
    x8 = jnp.round(x * 255) / 255
    np.testing.assert_array_equal(
        np.round(np.asarray(augment.gaussian_blur()(x8)) * 255), np.round(np.asarray(x8) * 255)
    )
    w = np.exp(-0.5 * np.arange(-1, 2) ** 2)
    w /= w.sum()
    padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    expect = sum(w[i] * w[j] * padded[:, i : i + 8, j : j + 8] for i in range(3) for j in range(3))
    np.testing.assert_allclose(
        np.asarray(augment.gaussian_blur(sigma=1.0)(x)), expect, rtol=1e-5, atol=1e-6
    )


def test_cutout_zeroes_one_clipped_square_per_example():
    x = jnp.ones((64, 32, 32, 3))
    out = np.asarray(
        transforms.make({"cutout": {"length": 16}}).augment(
            jax.random.key(0), {"image": x, "label": jnp.zeros(64, jnp.int32)}
        )["image"]
    )
    zeros = out[..., 0] == 0
    assert np.all((out == 0).all(-1) == zeros)  # every channel
    for z in zeros:
        rows, cols = np.nonzero(z.any(1))[0], np.nonzero(z.any(0))[0]
        assert z.sum() == len(rows) * len(cols) and len(rows) <= 16 and len(cols) <= 16
    areas = zeros.sum((1, 2))
    assert areas.max() == 256 and areas.min() < 256  # clipped at the border sometimes
    assert len({tuple(np.argwhere(z)[0]) for z in zeros}) > 20  # one square per example


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_mixing_transforms_mix_images_and_weights_the_same_way(name, tiny_images):
    x, y = jnp.asarray(tiny_images[0]), jnp.asarray(tiny_images[1])
    out = transforms.make((name,)).augment(jax.random.key(1), {"image": x, "label": y})
    w, y_j = np.asarray(out["mix"]["weight"]), np.asarray(out["mix"]["label"])
    assert np.all((w >= 0) & (w <= 1)) and w.std() > 0
    # The partner of example i is example perm[i], with label y[perm[i]].
    x_np, mixed = np.asarray(x), np.asarray(out["image"])
    for i in range(len(w)):
        partners = [j for j in range(len(w)) if tiny_images[1][j] == y_j[i]]
        if name == "mixup":
            errs = [
                np.abs(mixed[i] - (w[i] * x_np[i] + (1 - w[i]) * x_np[j])).max() for j in partners
            ]
            assert min(errs) < 1e-5
        else:
            own = np.all(mixed[i] == x_np[i], axis=-1)
            assert abs(own.mean() - w[i]) < 1e-6 or np.array_equal(mixed[i], x_np[i])


def test_erm_trains_on_the_mixed_loss():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    apply_fn = lambda v, x, train: (logits, {})
    batch = {
        "image": jnp.zeros((2, 1)),
        "label": jnp.asarray([0, 1]),
        "mix": {"label": jnp.asarray([2, 2]), "weight": jnp.asarray([0.25, 1.0])},
    }
    loss, aux = objectives.make("erm")({}, batch, None, apply_fn=apply_fn)
    ce = lambda y: np.asarray(losses.cross_entropy(logits, jnp.asarray(y)))
    expect = np.mean([0.25 * ce([0, 1])[0] + 0.75 * ce([2, 2])[0], ce([0, 1])[1]])
    np.testing.assert_allclose(float(loss), expect, rtol=1e-6)
    np.testing.assert_allclose(float(aux["metrics"]["accuracy"]), (0.25 + 0.0) / 2)


@pytest.fixture(scope="module")
def digits():
    ds = data.load(ml_collections.ConfigDict(dict(source="digits", name="digits")))
    x, y = ds.x_train[:400], ds.y_train[:400]
    return ds, x, y, training.train_data_from(x, y, ds)


def _victim(objective):
    return ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.125),
            epochs=1,
            batch_size=200,
            optimizer=dict(learning_rate=0.1, momentum=0.9, schedule="constant"),
            objective=objective,
        )
    )


def _fit(digits, objective, td=None):
    ds, *_, td_default = digits
    trainer = training.Trainer.from_config(
        _victim(objective), num_classes=10, image_shape=ds.image_shape
    )
    history = trainer.fit(td or td_default, key=jax.random.key(0), progress=False)[1]
    assert np.isfinite(history["train/loss"]).all()
    return trainer, history


@pytest.fixture(scope="module")
def plain_fit(digits):
    return _fit(digits, dict(name="erm"))


def test_trainer_applies_dataset_transforms_once_and_keys_checkpoints_by_them(digits, plain_fit):
    ds, _, y, td = digits
    key = jax.random.key(0)
    squeezing, h_defended = _fit(digits, dict(name="erm", transforms=dict(bit_depth=dict(bits=2))))
    squeezed = np.asarray(compression.bit_depth(bits=2)(data.device_float(td.x_train)))
    _, h_by_hand = _fit(digits, dict(name="erm"), training.train_data_from(squeezed, y, ds))
    assert h_defended == h_by_hand  # the same numbers as squeezing the data by hand
    plain, h_plain = plain_fit
    assert h_defended != h_plain
    assert squeezing.record(td, key=key, num_seeds=1) != plain.record(td, key=key, num_seeds=1)


def test_trainer_runs_batch_transforms_in_the_step(digits, plain_fit):
    _, history = _fit(digits, dict(name="erm", transforms=("cutout", "mixup")))
    assert history["train/loss"] != plain_fit[1]["train/loss"]


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(name="erm", transforms=("sharpen",)), "unknown transform 'sharpen'"),
        (dict(name="erm", transforms=dict(jpeg=dict(quality=0))), "quality=0"),
        (dict(name="erm", transforms=dict(jpeg=dict(qualty=10))), "does not take"),
        (dict(name="erm", transforms=("mixup", "cutmix")), "both mix labels"),
        (dict(name="pgd_at", epsilon=0.03, transforms=("mixup",)), "only objective 'erm'"),
        (dict(name="erm", transforms=dict(bit_depth=dict(bits=9))), "bits=9"),
        (dict(name="erm", transforms=dict(cutout=dict(length=0))), "length=0"),
    ],
)
def test_bad_transform_specs_are_one_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        specs.defense(spec)


def test_register_a_new_transform():
    def invert():
        return lambda images: 1.0 - images

    transforms.register("invert_test", transforms.per_image(invert), stage="dataset")
    try:
        pipeline = transforms.make(("invert_test", "grayscale"))
        x = jnp.full((3, 4, 4, 3), 0.25)
        np.testing.assert_allclose(pipeline.purify(jax.random.key(0), x, None), 0.75)
        with pytest.raises(ValueError, match="already registered"):
            transforms.register("invert_test", transforms.per_image(invert), stage="dataset")
        with pytest.raises(ValueError, match="stage="):
            transforms.register("other", invert, stage="epoch")
    finally:
        transforms.TRANSFORMS.pop("invert_test")


def test_orthogonal_projection_removes_a_class_wise_shortcut():
    # A class-wise pattern (P5-style) on random images: a linear model separates the classes
    # by it; once its directions are projected out the same fit is near chance.
    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    patterns = rng.choice([-8 / 255, 8 / 255], size=(4, 8, 8, 3))
    x = jnp.asarray(rng.random((400, 8, 8, 3)) * 0.8 + 0.1 + patterns[y], jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    fit = jax.jit(lambda a: projection.fit_linear(a, y, num_classes=4, batch_size=100))
    accuracy = lambda a, w: float(jnp.mean(jnp.argmax(a.reshape(400, -1) @ w, -1) == y))
    w = fit(x)
    assert accuracy(x, w) > 0.85
    spec = {"orthogonal_projection": {"batch_size": 100}}
    fn = transforms.make(spec, num_classes=4).dataset[0]
    projected = jax.jit(fn)(jax.random.key(0), x, y)
    np.testing.assert_allclose(
        np.asarray(projected), np.asarray(projection.project_out(x, w)), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(projected.reshape(400, -1) @ w), 0.0, atol=1e-3)
    assert accuracy(projected, fit(projected)) < 0.4  # chance: 0.25


def test_order_of_a_sequence_is_kept_and_a_mapping_runs_in_registry_order():
    sequence = transforms.make(({"name": "jpeg", "quality": 20}, "grayscale"))
    assert sequence.names == ("jpeg", "grayscale")
    mapping = transforms.make(ml_collections.ConfigDict({"jpeg": {"quality": 20}, "grayscale": {}}))
    assert mapping.names == ("grayscale", "jpeg")
    x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
    key = jax.random.key(0)
    assert not np.allclose(sequence.purify(key, x, None), mapping.purify(key, x, None))


def test_poison_ratio_mixes_clean_images_into_every_batch(digits, plain_fit):
    # APBench's poison ratio: with ratio r the first floor(r B) positions of each shuffled batch
    # take the poisoned image, the rest the clean one. A "poison" that blanks every image:
    # ratio 1 trains on blanks only (chance), a ratio below 1 recovers the clean numbers'
    # order of magnitude, and the checkpoint key changes with the ratio.
    ds, x, y, td = digits
    poisoned = training.train_data_from(np.zeros_like(x), y, ds, x_clean=x)
    accuracy = {}
    for ratio in (1.0, 0.5):
        victim = _victim(dict(name="erm"))
        victim.update(epochs=4, batch_size=50, poison_ratio=ratio)
        half = training.Trainer.from_config(victim, num_classes=10, image_shape=ds.image_shape)
        history = half.fit(poisoned, key=jax.random.key(0), progress=False)[1]
        accuracy[ratio] = history["test/accuracy"][-1][0]
    assert accuracy[1.0] < 0.2 and accuracy[0.5] > accuracy[1.0] + 0.2
    plain = plain_fit[0]
    assert half.record(poisoned, key=jax.random.key(0), num_seeds=1) != plain.record(
        poisoned, key=jax.random.key(0), num_seeds=1
    )
    with pytest.raises(ValueError, match="needs|has none"):
        half.fit(td, key=jax.random.key(0), progress=False)
    victim.poison_ratio = 1.5
    with pytest.raises(ValueError, match="poison_ratio=1.5 must lie in"):
        training.Trainer.from_config(victim, num_classes=10, image_shape=ds.image_shape)


def test_per_class_fraction_keeps_each_class_share_clean():
    y = jnp.asarray(np.random.default_rng(0).permutation(np.repeat(np.arange(4), [10, 20, 30, 40])))
    from jaxpoison.poisons import partial

    mask = np.asarray(partial.choose(jax.random.key(0), y, fraction=0.3, per_class=True))
    assert [int(mask[np.asarray(y) == c].sum()) for c in range(4)] == [3, 6, 9, 12]
    mask = np.asarray(
        partial.choose(jax.random.key(0), y, fraction=0.5, per_class=True, classes=(1, 3))
    )
    assert [int(mask[np.asarray(y) == c].sum()) for c in range(4)] == [0, 10, 0, 20]
    other = np.asarray(
        partial.choose(jax.random.key(1), y, fraction=0.5, per_class=True, classes=(1, 3))
    )
    assert not np.array_equal(mask, other)
