"""DP-SGD (`jaxpoison.privacy`): clipping and noise against their definition, the private step
against the ordinary one, ε against the accountants, and what is refused."""

import math

import dp_accounting
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, models, objectives, privacy, specs, train_state, training

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_aggregate_clips_each_example_then_sums_and_noises():
    rng = np.random.default_rng(0)
    grads = {
        "w": jnp.asarray(rng.normal(size=(6, 3, 2))),
        "b": jnp.asarray(rng.normal(size=(6, 4))),
    }
    norms = np.sqrt(
        (np.asarray(grads["w"]) ** 2).sum((1, 2)) + (np.asarray(grads["b"]) ** 2).sum(1)
    )
    dp = privacy.DPSGD(l2_norm_clip=float(np.median(norms)), noise_multiplier=0.0)
    mean, metrics = dp.aggregate(grads, jax.random.key(0))
    scale = np.minimum(1.0, dp.l2_norm_clip / norms)
    for name in grads:
        expect = np.tensordot(scale, np.asarray(grads[name]), axes=1) / 6
        np.testing.assert_allclose(np.asarray(mean[name]), expect, rtol=1e-5)
    assert float(metrics["clipped"]) == pytest.approx(np.mean(norms > dp.l2_norm_clip))
    # The noise: N(0, (sigma C)^2) per coordinate of the sum, divided by the batch size.
    noisy = privacy.DPSGD(l2_norm_clip=1.0, noise_multiplier=2.0)
    zeros = {"w": jnp.zeros((4, 20000))}
    draw = np.asarray(noisy.aggregate(zeros, jax.random.key(1))[0]["w"])
    assert draw.std() == pytest.approx(2.0 / 4, rel=0.03)
    other = np.asarray(noisy.aggregate(zeros, jax.random.key(2))[0]["w"])
    assert not np.allclose(draw, other)


def test_private_step_without_noise_or_clipping_is_the_ordinary_step():
    module = models.make("mlp", num_classes=4, width=0.25)
    apply_fn = models.make_apply_fn(module)
    tx = train_state.make_optimizer(
        learning_rate=0.1, epochs=1, steps_per_epoch=1, schedule="constant"
    )
    state = train_state.init_state(module, jax.random.key(0), (6, 6, 1), tx)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.random((8, 6, 6, 1)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 4, 8), jnp.int32),
        "index": jnp.arange(8),
    }
    step = lambda private: jax.jit(
        lambda s, b: train_state.train_step(
            s,
            b,
            jax.random.key(1),
            apply_fn=apply_fn,
            objective=objectives.make("erm"),
            tx=tx,
            schedule=(1, 1),
            private=private,
        )
    )(state, batch)
    plain, _ = step(None)
    free = privacy.DPSGD(l2_norm_clip=1e6, noise_multiplier=0.0)
    private, metrics = step(free)
    chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    jax.tree.map(chex_close, private.params, plain.params)
    assert float(metrics["clipped"]) == 0.0
    noisy, _ = step(privacy.DPSGD(l2_norm_clip=0.1, noise_multiplier=1.0))
    assert not np.allclose(noisy.params["Dense_0"]["kernel"], plain.params["Dense_0"]["kernel"])


def test_epsilon_is_the_accountants():
    dp = privacy.DPSGD(l2_norm_clip=1.0, noise_multiplier=1.1, delta=1e-5)
    eps = dp.epsilon(num_examples=60000, batch_size=256, steps=60 * 234)
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(256 / 60000, dp_accounting.GaussianDpEvent(1.1))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, 60 * 234))
    assert eps == pytest.approx(accountant.get_epsilon(1e-5))
    # The PLD accountant, tighter, agrees to within the RDP conversion's slack.
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.SelfComposedDpEvent(event, 60 * 234))
    assert 0.6 * eps < pld.get_epsilon(1e-5) <= eps
    more_noise = privacy.DPSGD(noise_multiplier=2.0).epsilon(
        num_examples=60000, batch_size=256, steps=60 * 234
    )
    fewer_steps = dp.epsilon(num_examples=60000, batch_size=256, steps=15 * 234)
    assert more_noise < eps and fewer_steps < eps
    assert math.isinf(
        privacy.DPSGD(noise_multiplier=0.0).epsilon(num_examples=10, batch_size=5, steps=1)
    )


def test_trainer_trains_privately_and_reports_epsilon():
    ds = data.load(ml_collections.ConfigDict(dict(source="digits", name="digits")))
    td = training.train_data_from(ds.x_train[:400], ds.y_train[:400], ds)
    victim = ml_collections.ConfigDict(
        dict(
            model=dict(name="mlp", width=0.125),
            epochs=1,
            batch_size=100,
            optimizer=dict(learning_rate=0.5, momentum=0.0, schedule="constant"),
            objective=dict(name="erm", privacy=dict(l2_norm_clip=1.0, noise_multiplier=0.5)),
        )
    )
    trainer = training.Trainer.from_config(victim, num_classes=10, image_shape=ds.image_shape)
    _, history = trainer.fit(td, key=jax.random.key(0), progress=False)
    assert np.isfinite(history["train/loss"]).all() and "train/clipped" in history
    spent = trainer.privacy_spent(400)
    assert (
        spent["steps"] == 4 and spent["sampling_rate"] == 0.25 and 0 < spent["epsilon"] < math.inf
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(name="erm", privacy=dict(l2_norm_clip=0.0)), "l2_norm_clip=0.0"),
        (dict(name="erm", privacy=dict(noise_multiplier=-1.0)), "noise_multiplier=-1.0"),
        (dict(name="erm", privacy=dict(delta=1.0)), "delta=1.0"),
        (dict(name="erm", privacy=dict(clip=1.0)), "does not take \\['clip'\\]"),
    ],
)
def test_bad_privacy_settings_are_one_clear_error(spec, message):
    with pytest.raises(ValueError, match=message):
        specs.defense(spec)


def test_batchnorm_models_are_refused():
    victim = ml_collections.ConfigDict(
        dict(
            model=dict(name="resnet18", width=0.125),
            epochs=1,
            batch_size=10,
            optimizer=dict(learning_rate=0.1),
            objective=dict(name="erm", privacy=dict(noise_multiplier=1.0)),
        )
    )
    with pytest.raises(ValueError, match="BatchNorm couples the examples"):
        training.Trainer.from_config(victim, num_classes=10, image_shape=(8, 8, 3))
