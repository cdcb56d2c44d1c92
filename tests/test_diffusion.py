"""Diffusion purification (AVATAR): schedules, the ε loss and its resumable trainer, `purify`,
score models on disk (ours and score_sde's msgpack layout), and the dataset-stage transform."""

import shutil

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, diffusion, training, transforms
from jaxpoison.diffusion import schedule as schedule_lib
from jaxpoison.diffusion import score, unet

pytestmark = pytest.mark.usefixtures("fast_compiles")

TINY = dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
RECIPE = dict(batch_size=8, learning_rate=3e-3, warmup_steps=0, ema_decay=0.0, log_every=1)


def test_linear_and_cosine_schedules_and_forward_marginals():
    lin = schedule_lib.make("linear")
    # DDPM's linear schedule: ᾱ_0 = 1 - 1e-4, ᾱ_999 = prod(1 - linspace(1e-4, 0.02, 1000)).
    np.testing.assert_allclose(float(lin.alphas_cumprod[0]), 1 - 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lin.alphas_cumprod[-1]), 4.0358e-5, rtol=1e-3)
    cos = schedule_lib.make("cosine", num_timesteps=100)
    abar = np.asarray(cos.alphas_cumprod)
    assert np.all(np.diff(abar) < 0) and abar[-1] < 1e-3 and abar[0] > 0.999
    for sched in (lin, cos):
        t = jnp.asarray([1, sched.num_timesteps // 2, sched.num_timesteps - 1])
        x0 = jnp.full((3, 4000), 0.7)
        noise = jax.random.normal(jax.random.key(0), x0.shape)
        xt = np.asarray(schedule_lib.q_sample(sched, x0, t, noise))
        want_mean, want_std = (np.asarray(a) for a in sched.marginal(t))
        assert np.all(np.abs(xt.mean(1) - 0.7 * want_mean) <= 4 * want_std / np.sqrt(4000) + 1e-6)
        np.testing.assert_allclose(xt.std(1), want_std, rtol=0.05)
    with pytest.raises(ValueError, match="unknown; use one of"):
        schedule_lib.make("sigmoid")


@pytest.fixture(scope="module")
def cifar_crops():
    ds = data.load(source="embedded", name="cifar10", num_train=100, num_test=10)
    return data.to_float(ds.x_train[:32, 8:16, 8:16])  # 8 x 8 crops: a CPU-sized model


@pytest.fixture(scope="module")
def trained(cifar_crops, tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("score_ckpt")
    kwargs = dict(key=jax.random.key(0), num_steps=10, model=TINY, ckpt_dir=ckpt, **RECIPE)
    model, history = diffusion.train_score_model(
        cifar_crops, checkpoint_every=5, progress=False, **kwargs
    )
    return model, history, ckpt, kwargs


def test_loss_decreases_and_training_resumes_to_the_same_parameters(cifar_crops, trained):
    model, history, ckpt, kwargs = trained
    losses = history["train/loss"]
    assert len(losses) == 10 and np.isfinite(losses).all()
    # The last layer starts at zero, so the first loss is E[ε²] = 1; training lowers it.
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:2])
    (run_dir,) = [p for p in ckpt.iterdir() if p.is_dir()]
    shutil.rmtree(run_dir / "10")  # as if killed after the step-5 checkpoint
    resumed, again = diffusion.train_score_model(
        cifar_crops, checkpoint_every=5, progress=False, **kwargs
    )
    assert again["train/loss"] == losses
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def purify_fn(trained):
    model = trained[0]

    def run(images, key, *, batch_size=8, sampler="ddpm", t_star=0.2):
        fn = jax.jit(
            lambda p, x, k: diffusion.purify(
                p,
                x,
                k,
                module=model.module,
                schedule=model.schedule,
                t_star=t_star,
                num_steps=3,
                sampler=sampler,
                batch_size=batch_size,
            )
        )
        return np.asarray(fn(model.params, jnp.asarray(images), key))

    return run


def test_purify_identity_box_determinism_and_batch_independence(cifar_crops, purify_fn):
    x = cifar_crops[:8]
    np.testing.assert_array_equal(purify_fn(x, jax.random.key(0), t_star=0.0), x)
    # ddim here (ddpm runs in the transform test): the key draws x_t*'s noise.
    y = purify_fn(x, jax.random.key(1), sampler="ddim")
    assert y.shape == x.shape and y.min() >= 0.0 and y.max() <= 1.0
    assert 0 < np.abs(y - x).mean() < 0.5
    np.testing.assert_array_equal(purify_fn(x, jax.random.key(1), sampler="ddim"), y)
    assert not np.array_equal(purify_fn(x, jax.random.key(2), sampler="ddim"), y)
    # Per-example keys: the batch size changes nothing.
    y3 = purify_fn(x, jax.random.key(1), sampler="ddim", batch_size=3)
    np.testing.assert_allclose(y3, y, atol=1e-5)


def test_reverse_timesteps_are_strided_and_end_at_the_clean_image():
    tau, prev = diffusion.sampling.reverse_timesteps(100, 4)
    assert tau.tolist() == [99, 66, 33, 0] and prev.tolist() == [66, 33, 0, -1]
    tau, _ = diffusion.sampling.reverse_timesteps(5, 10)  # at most one per timestep
    assert tau.tolist() == [4, 3, 2, 1, 0]


# score_sde's DDPM (models/ddpm.py) for nf 8, ch_mult (1, 2), one block per level, attention at
# 4 x 4, on 8 x 8 images: the top-level names it creates, written out from its code.
SCORE_SDE_SMALL = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
SCORE_SDE_NAMES = {
    "Dense_0", "Dense_1", "Conv_0", "Conv_1", "GroupNorm_0", "Downsample_0", "Upsample_0",
    *(f"ResnetBlockDDPM_{i}" for i in range(8)), *(f"AttnBlock_{i}" for i in range(3)),
}  # fmt: skip


def _score_sde_file(path, module, image_shape, seed):
    """A checkpoint_<N> as flax.training.checkpoints writes score_sde's State."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: score.init_params(module, jax.random.key(0), image_shape))
    target = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    ema = jax.tree.map(lambda a: a + 1.0, target)
    state = {
        "step": 3,
        "optimizer": {"target": target, "state": {"step": 3, "param_states": {}}},
        "lr": 2e-4,
        "model_state": {},
        "ema_rate": 0.9999,
        "params_ema": ema,
        "rng": np.asarray([0, 42], np.uint32),
    }
    path.write_bytes(flax.serialization.msgpack_serialize(state))
    return ema


def test_score_sde_checkpoint_loads_and_a_mismatched_one_is_one_clear_error(tmp_path):
    module = unet.make(**SCORE_SDE_SMALL)
    params = score.param_shapes(module, (8, 8, 3))
    assert {k.split("/")[0] for k in params} == SCORE_SDE_NAMES
    assert params["ResnetBlockDDPM_4/NIN_0/W"] == (32, 16)  # concat(16, 16) -> 16 channels
    assert params["AttnBlock_0/NIN_3/W"] == (16, 16) and params["Dense_1/kernel"] == (32, 32)
    path = tmp_path / "checkpoint_3"
    ema = _score_sde_file(path, module, (8, 8, 3), seed=0)
    loaded = diffusion.load(path, model=SCORE_SDE_SMALL, image_shape=(8, 8, 3))
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(a, b)  # the EMA parameters, as score_sde samples with
    with pytest.raises(
        ValueError, match=r"checkpoint_3: its parameters do not match the U-Net \(nf=16"
    ):
        diffusion.load(path, model=dict(SCORE_SDE_SMALL, nf=16), image_shape=(8, 8, 3))
    with pytest.raises(ValueError, match="unexpected AttnBlock_1"):  # no attention at 4 x 4
        diffusion.load(
            path, model=dict(SCORE_SDE_SMALL, attn_resolutions=()), image_shape=(8, 8, 3)
        )
    (tmp_path / "junk").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="not a flax msgpack checkpoint"):
        diffusion.load(tmp_path / "junk")
    with pytest.raises(ValueError, match="does not exist; train one with"):
        diffusion.load(tmp_path / "nowhere")


def test_own_format_round_trips(trained, tmp_path):
    model = trained[0]
    path = diffusion.save(tmp_path / "sm", model)
    loaded = diffusion.load(path)
    assert loaded.spec == model.spec or loaded.module == model.module
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(a, b)


def _random_score_model(image_shape, seed):
    spec = {"model": TINY, "schedule": {}, "image_shape": list(image_shape)}
    module, sched = score.build(spec)
    params = score.init_params(module, jax.random.key(seed), image_shape)
    # Its last layer starts at zero (ε = 0 everywhere); nonzero so that the models differ.
    params = jax.tree.map(lambda a: a + 0.01 * (seed + 1), params)
    return score.ScoreModel(module, params, sched, spec)


def test_transform_purifies_in_a_defense_and_keys_victims_by_the_score_model(tmp_path):
    ds = data.load(ml_collections.ConfigDict(dict(source="digits", name="digits")))  # 8x8x1
    x, y = ds.x_train[:200], ds.y_train[:200]
    td = training.train_data_from(x, y, ds)
    path = str(tmp_path / "score_model")
    diffusion.save(path, _random_score_model(ds.image_shape, 0))
    spec = dict(score_model=path, t_star=0.05, num_steps=2, batch_size=64)
    victim = ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.125),
            epochs=1,
            batch_size=100,
            optimizer=dict(learning_rate=0.1, momentum=0.9, schedule="constant"),
            objective=dict(name="erm", transforms=dict(diffusion_purification=spec)),
        )
    )
    make = lambda: training.Trainer.from_config(victim, num_classes=10, image_shape=ds.image_shape)
    trainer = make()
    purified = trainer.purified(td, jax.random.key(0))
    xp = np.asarray(purified.x_train)
    assert xp.shape == x.shape[:1] + ds.image_shape and 0 <= xp.min() and xp.max() <= 1
    assert not np.allclose(xp, np.asarray(data.device_float(td.x_train)))
    np.testing.assert_array_equal(np.asarray(purified.y_train), y)  # labels untouched
    fn = transforms.make(dict(diffusion_purification=spec)).dataset[0]
    with pytest.raises(ValueError, match=r"trained on \(8, 8, 1\) images, the training images"):
        fn(jax.random.key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros(2, jnp.int32))
    key = jax.random.key(0)
    record = trainer.record(td, key=key, num_seeds=1)
    diffusion.save(path, _random_score_model(ds.image_shape, 1))  # another model, same path
    assert make().record(td, key=key, num_seeds=1) != record
    plain = ml_collections.ConfigDict(dict(victim, objective=dict(name="erm")))
    plain_trainer = training.Trainer.from_config(plain, num_classes=10, image_shape=ds.image_shape)
    assert "transforms" not in plain_trainer.record(td, key=key, num_seeds=1)  # keys unchanged


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(score_model="/nonexistent/sm"), "does not exist; train one with"),
        (dict(score_model=""), "must be the path of a score model"),
        (dict(score_model="x", t_star=2.0), r"t_star=2.0 must be a fraction"),
        (dict(score_model="x", sampler="euler"), "sampler='euler' is unknown"),
        (dict(score_model="x", num_steps=0), "num_steps=0 must be a positive integer"),
    ],
)
def test_bad_settings_are_one_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        transforms.make(dict(diffusion_purification=spec))
