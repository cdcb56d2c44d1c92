"""Tests of UEraser: its augmentations (`transforms.ueraser_ops`) and its objective.

The ops keep shape and the [0, 1] box, draw per example and per key, and repeat for a repeated
key; the plasma fractal equals an independent numpy transcription of kornia's diamond-square on
the same uniforms; the objective's loss is the max over K of per-example cross-entropies
computed copy by copy, and plain cross-entropy of one copy after ``repeat_fraction``."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image, ImageOps
from scipy import ndimage

from jaxpoison import losses, models, objectives, training
from jaxpoison.transforms import compression, ueraser_ops

pytestmark = pytest.mark.usefixtures("fast_compiles")

# Jitted once per module and shape (8 8x8 images), shared by the tests below.
AUGMENT = jax.jit(ueraser_ops.ueraser, static_argnames="jpeg")
RANDOM_JPEG = jax.jit(ueraser_ops.random_jpeg)
OPS = {
    "plasma_brightness": jax.jit(ueraser_ops.plasma_brightness),
    "plasma_contrast": jax.jit(ueraser_ops.plasma_contrast),
    "channel_shuffle": jax.jit(lambda k, x: ueraser_ops.channel_shuffle(k, x, p=1.0)),
    "trivial_augment": jax.jit(ueraser_ops.trivial_augment),
    "random_jpeg": RANDOM_JPEG,
    "ueraser": AUGMENT,
    "ueraser_jpeg": lambda k, x: AUGMENT(k, x, jpeg=True),
}
SHAPE = (8, 8, 3)


def images(channels, key=0):
    return jax.random.uniform(jax.random.key(key), (8, *SHAPE[:2], channels))


@pytest.mark.parametrize(
    "name, channels", [(name, 3) for name in OPS if name != "ueraser_jpeg"] + [("ueraser_jpeg", 1)]
)
def test_ops_box_shape_keys(name, channels):
    """Shape and [0, 1] kept; same key => same images; another key, or another example of the
    same image, => other images."""
    fn = OPS[name]
    x = jnp.broadcast_to(images(channels)[:1], (8, *SHAPE[:2], channels))
    a, b, c = (np.asarray(fn(jax.random.key(k), x)) for k in (1, 1, 2))
    assert a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert len({e.tobytes() for e in a}) > 1  # examples drawn independently
    assert not np.allclose(a, x)


def kornia_plasma_numpy(uniforms, roughness, h, w):
    """kornia.contrib.diamond_square, transcribed in numpy from its source (filter2d's reflect
    padding = scipy's 'mirror'), on the given uniforms."""
    u0 = np.asarray(uniforms[0], np.float64)
    res = u0.copy()
    res[:, 1, 1::2] = (res[:, ::2, :-2:2] + res[:, ::2, 2::2]).sum(axis=1) / 4.0
    tmp1 = res[:, 2, 0].copy()
    res[:, 1, 0] = res[:, 0, 0] + res[:, 1, 1] + tmp1
    res[:, 1, -1] = res[:, -1, -1] + res[:, 1, -2] + tmp1
    tmp2 = res[:, 1, 1::2].copy()
    res[:, 0, 1::2] = res[:, 0, 0:-2:2] + res[:, 0, 2::2] + tmp2
    res[:, 2, 1::2] = res[:, 2, 0:-2:2] + res[:, 2, 2::2] + tmp2
    img = res / 3.0
    p2h, p2w = (2 ** math.ceil(math.log2(s - 1)) + 1 for s in (h, w))
    depth = int(min(math.log2(p2h - 1) - 1, math.log2(p2w - 1) - 1))
    assert len(uniforms) == depth + 1
    if (p2w - 1) // 2**depth + 1 == 3:  # kornia transposes a seed of width 3
        img = img.transpose(0, 2, 1)
    diamond_k = np.array([[0.25, 0, 0.25], [0, 0, 0], [0.25, 0, 0.25]])
    square_k = np.array([[0, 0.25, 0], [0.25, 0, 0.25], [0, 0.25, 0]])
    r = np.asarray(roughness, np.float64)[:, None, None]
    scale = np.ones_like(r)
    for u in uniforms[1:]:
        scale = scale * r
        n, hh, ww = img.shape
        new = np.zeros((n, 2 * hh - 1, 2 * ww - 1))
        new[:, ::2, ::2] = img
        comp = np.ones(new.shape[1:])
        comp[:, 0] = comp[:, -1] = comp[0, :] = comp[-1, :] = 1 / 0.75
        noise = np.asarray(u, np.float64) * scale

        def filt(a, k):
            return np.stack([ndimage.correlate(p, k, mode="mirror") for p in a])

        d = filt(new, diamond_k)
        dc = (d > 0).astype(float)
        new = new + (1 - scale) * d * dc + dc * noise
        s = filt(new, square_k) * comp
        sc = (s > 0).astype(float)
        img = new + sc * noise + (1 - scale) * sc * s
    return img[:, :h, :w]


@pytest.mark.parametrize("shape", [(16, 8), (8, 16)])
def test_plasma_matches_kornia_transcription(shape):
    h, w = shape
    n = 6
    shapes = ueraser_ops._plasma_uniform_shapes(n, h, w)
    keys = jax.random.split(jax.random.key(3), len(shapes))
    uniforms = [jax.random.uniform(k, s) for k, s in zip(keys, shapes, strict=True)]
    roughness = jnp.linspace(0.1, 0.7, n)
    ours = jax.jit(ueraser_ops._plasma_from_uniforms, static_argnums=2)(uniforms, roughness, (h, w))
    ref = kornia_plasma_numpy(uniforms, roughness, h, w)
    assert ours.shape == (n, h, w)
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_plasma_range_and_roughness():
    """Maps are >= 0 with mean 0.4-0.5 and under 0.5 % of values above 1 (kornia's border factor
    4/3); rougher maps have larger neighbour differences."""
    n = 512
    plasma = jax.jit(lambda r: ueraser_ops.plasma_fractal(jax.random.key(0), (n, 32, 32), r))
    smooth, rough = plasma(jnp.full((n,), 0.1)), plasma(jnp.full((n,), 0.7))
    for m in (smooth, rough):
        assert float(m.min()) >= 0.0 and float(jnp.mean(m > 1)) < 0.005
        assert 0.35 < float(m.mean()) < 0.55

    def tv(m):
        return float(jnp.mean(jnp.abs(jnp.diff(m, axis=1))))

    assert tv(rough) > 3 * tv(smooth)


def test_trivial_augment_ops():
    """Single ops against independent values: translation by whole pixels, identity at
    magnitude 0, equalisation as PIL's ImageOps.equalize, posterize and solarize by hand."""
    rng = np.random.default_rng(0)
    x8 = rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    x = jnp.asarray(x8 / 255.0, jnp.float32)
    names = ueraser_ops.TRIVIAL_AUGMENT_OPS
    m, on = jnp.array([0.5, 1.0]), jnp.ones(2)

    @jax.jit
    def warp_of(op, m, on):
        return ueraser_ops._warp(x, ueraser_ops._affine(op, m, on, 8, 8))

    def warp(name, m, on):
        return np.asarray(warp_of(jnp.full((2,), names.index(name)), m, on))

    tx = warp("translate_x", m, on)  # 0.5 m W: 2 and 4 pixels to the right
    np.testing.assert_allclose(tx[0, :, 2:], x[0, :, :-2], atol=1e-6)
    np.testing.assert_allclose(tx[0, :, :2], 0.0)
    ty = warp("translate_y", m, on)
    np.testing.assert_allclose(ty[1, 4:], x[1, :-4], atol=1e-6)
    for name in ("rotate", "shear_x", "shear_y"):
        np.testing.assert_allclose(warp(name, m, jnp.zeros(2)), x, atol=1e-5)
    colour = np.asarray(jax.jit(ueraser_ops._color_ops)(x, jnp.array([0.5, 0.9])))
    for i in range(2):
        eq = np.asarray(ImageOps.equalize(Image.fromarray(x8[i]))) / 255.0
        np.testing.assert_allclose(colour[1, i], eq, atol=1e-6)
    np.testing.assert_allclose(colour[2, 0], (x8[0] // 64 * 64) / 255.0, atol=1e-6)  # 2 bits
    np.testing.assert_allclose(colour[2, 1], (x8[1] // 32 * 32) / 255.0, atol=1e-6)  # 3 bits
    np.testing.assert_allclose(colour[3, 0], np.where(x[0] >= 0.5, 1 - x[0], x[0]), atol=1e-6)


def test_random_jpeg_is_jpeg_at_one_of_the_qualities():
    """Each example equals `compression.jpeg` at some quality in 10..99 (`jpeg_codec` with the
    tables of quality 10 is `jpeg(quality=10)`)."""
    x = images(3)
    out = np.asarray(RANDOM_JPEG(jax.random.key(1), x))
    codec = jax.jit(compression.jpeg_codec)
    per_quality = [
        np.asarray(codec(x, *compression.quantization_tables(q))) for q in range(10, 100)
    ]
    for i in range(len(x)):
        assert any(np.array_equal(out[i], v[i]) for v in per_quality)
    np.testing.assert_array_equal(per_quality[0], compression.jpeg(quality=10)(x))


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(4)(nn.relu(x))


def test_objective_is_max_over_copies_then_one_copy():
    """Progress before repeat_fraction: mean of max_k CE over K copies forwarded one by one
    (each with its own batch statistics), running statistics the mean of the K updates; after:
    CE of the first copy."""
    module = TinyBN()
    apply_fn = models.make_apply_fn(module)
    variables = models.init(module, jax.random.key(0), SHAPE)
    x = images(3, key=1)
    y = jnp.arange(8) % 4
    key, k = jax.random.key(2), 3
    objective = objectives.make("ueraser", num_copies=k, repeat_fraction=0.5)
    run = jax.jit(
        lambda p: objective(variables, dict(image=x, label=y, progress=p), key, apply_fn=apply_fn)
    )
    forward = jax.jit(lambda c: apply_fn(variables, c, train=True))
    outs = [forward(AUGMENT(kk, x)) for kk in jax.random.split(key, k)]
    ce = np.stack([losses.cross_entropy(logits, y) for logits, _ in outs])

    loss, aux = run(jnp.float32(0.2))
    np.testing.assert_allclose(loss, ce.max(axis=0).mean(), rtol=1e-5)
    assert not np.allclose(ce.max(axis=0), ce[0])  # the max is not just one copy
    expected_state = jax.tree.map(lambda *s: np.mean(s, axis=0), *(st for _, st in outs))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), aux["model_state"], expected_state
    )
    assert float(aux["metrics"]["max_over_copies"]) == 1.0

    loss, aux = run(jnp.float32(0.6))
    np.testing.assert_allclose(loss, ce[0].mean(), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), aux["model_state"], outs[0][1]
    )
    assert float(aux["metrics"]["max_over_copies"]) == 0.0


def toy_data(seed, n):
    """4 classes: a bright 4x4 quadrant per class on noise, 8x8x3."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = 0.3 * rng.random((n, 8, 8, 3), dtype=np.float32)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 0.6
    return x, y.astype(np.int32)


def test_trains_with_trainer_from_config():
    cfg = ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.25),
            epochs=4,
            batch_size=32,
            optimizer=dict(name="adam", learning_rate=3e-3, weight_decay=0.0, schedule="constant"),
            objective=dict(name="ueraser", num_copies=2, repeat_fraction=0.5),
        )
    )
    td = training.TrainData.create(*toy_data(0, 256), *toy_data(1, 64))
    trainer = training.Trainer.from_config(cfg, num_classes=4, image_shape=(8, 8, 3))
    _, history = trainer.fit(td, key=jax.random.key(0), progress=False)
    loss = np.ravel(history["train/loss"])
    assert np.all(np.isfinite(loss))
    assert loss[-1] < loss[0]
    np.testing.assert_allclose(np.ravel(history["train/max_over_copies"]), [1, 1, 0, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_copies=0), "num_copies=0 must be a positive integer"),
        (dict(num_copies=2.0), "num_copies=2.0 must be a positive integer"),
        (dict(repeat_fraction=1.5), r"repeat_fraction=1.5 must be in \[0, 1\]"),
        (dict(repeat_fraction="all"), "repeat_fraction='all' must be a number"),
        (dict(jpeg=1), "jpeg=1 must be True or False"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        objectives.make("ueraser", **kwargs)
