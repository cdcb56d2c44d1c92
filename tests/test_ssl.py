"""Rotation self-supervised learning: the four rotations of a batch, the pretext objective, the
models' penultimate features, the linear probe, and the study through `trainers`."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import models, objectives, trainers
from jaxpoison.ssl import probe, rotation

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_rotate_gives_exact_quarter_turns_labelled_0_to_3():
    x = np.arange(2 * 3 * 3 * 1, dtype=np.float32).reshape(2, 3, 3, 1)
    rotated, labels = jax.device_get(rotation.rotate(jnp.asarray(x)))
    assert rotated.shape == (8, 3, 3, 1)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    np.testing.assert_array_equal(rotated[:2], x)
    # One quarter turn counter-clockwise of [[0,1,2],[3,4,5],[6,7,8]] is [[2,5,8],[1,4,7],[0,3,6]].
    np.testing.assert_array_equal(rotated[2, ..., 0], [[2, 5, 8], [1, 4, 7], [0, 3, 6]])
    for k in range(4):
        np.testing.assert_array_equal(rotated[2 * k : 2 * k + 2], np.rot90(x, k, axes=(1, 2)))
    np.testing.assert_array_equal(rotated[4, ..., 0], x[0, ::-1, ::-1, 0])  # 180°
    with pytest.raises(ValueError, match="square"):
        rotation.rotate(jnp.zeros((2, 4, 3, 1)))


def test_pretext_objective_is_cross_entropy_of_rotations_and_ignores_labels():
    module = models.make("mlp", num_classes=4, width=1 / 32)
    variables = models.init(module, jax.random.key(0), (6, 6, 3))
    apply_fn = models.make_apply_fn(module)
    x = jax.random.uniform(jax.random.key(1), (5, 6, 6, 3))
    pretext = jax.jit(rotation.pretext(objectives.make("erm")), static_argnames="apply_fn")
    loss, aux = pretext(
        variables, {"image": x, "label": jnp.zeros(5, jnp.int32)}, None, apply_fn=apply_fn
    )
    loss2, _ = pretext(variables, {"image": x, "label": jnp.arange(5)}, None, apply_fn=apply_fn)
    rotated = jnp.concatenate([jnp.rot90(x, k, axes=(1, 2)) for k in range(4)])
    logits = apply_fn(variables, rotated, train=False)[0]
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.repeat(jnp.arange(4), 5))
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-6)
    assert float(loss) == float(loss2)
    assert aux["metrics"]["loss"] == loss


def test_pretext_at_perturbs_each_rotated_copy_inside_the_ball():
    module = models.make("mlp", num_classes=4, width=1 / 32)
    variables = models.init(module, jax.random.key(0), (6, 6, 3))
    x = jax.random.uniform(jax.random.key(1), (3, 6, 6, 3))
    eps = 8 / 255
    pretext = jax.jit(
        rotation.pretext(objectives.make("pgd_at", epsilon=eps, num_steps=2, step_size=eps)),
        static_argnames="apply_fn",
    )
    _, aux = pretext(
        variables,
        {"image": x, "label": jnp.zeros(3, jnp.int32)},
        jax.random.key(2),
        apply_fn=models.make_apply_fn(module),
    )
    delta = np.asarray(aux["adversarial"]) - np.asarray(rotation.rotate(x)[0])
    assert aux["adversarial"].shape == (12, 6, 6, 3)
    assert np.abs(delta).max() <= eps + 1e-6 and np.abs(delta).max() > eps / 2


@pytest.mark.parametrize("name", ["mlp", "cnn_cifar"])
def test_features_are_the_input_of_the_last_layer_and_outputs_unchanged(name):
    module = models.make(name, num_classes=4, width=0.125)
    variables = models.init(module, jax.random.key(0), (8, 8, 3))
    assert "intermediates" not in variables
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3))
    features_fn = models.make_features_fn(module)

    @jax.jit
    def outputs(variables, x):
        logits = models.make_apply_fn(module)(variables, x, train=False)[0]
        # A batch size that does not divide the 3 examples: same features.
        batched = probe.extract(features_fn, variables, x, batch_size=2)
        return logits, features_fn(variables, x), batched

    logits, feats, batched = outputs(variables, x)
    dense = [k for k in variables["params"] if k.startswith("Dense")]
    last = variables["params"][sorted(dense, key=lambda k: int(k.split("_")[1]))[-1]]
    assert feats.ndim == 2 and feats.shape[0] == 3
    np.testing.assert_allclose(feats @ last["kernel"] + last["bias"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched, feats, rtol=1e-5, atol=1e-6)


def test_every_model_exposes_features_of_its_last_layer_width():
    """By shapes only (no compilation): features [B, D], D = rows of the last Dense kernel."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    for name in models.MODELS:
        module = models.make(name, num_classes=4, width=0.125)
        variables = jax.eval_shape(
            lambda x, m=module: models.init(m, jax.random.key(0), x.shape[1:]), x
        )
        feats = jax.eval_shape(models.make_features_fn(module), variables, x)
        kernels = [
            v["kernel"].shape for k, v in variables["params"].items() if k.startswith("Dense")
        ]
        last = [shape for shape in kernels if shape[1] == 4]
        assert len(last) == 1, name
        assert feats.shape == (2, last[0][0]), name


def test_probe_fits_a_linearly_separable_problem_and_not_noise():
    rng = np.random.default_rng(0)
    centers = np.array([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]])
    y = rng.integers(0, 3, 600)
    f = centers[y] + rng.normal(0, 0.5, (600, 4)) + np.array([0, 0, 0, 100.0])  # offset, scale
    f, y = jnp.asarray(f, jnp.float32), jnp.asarray(y, jnp.int32)
    fit = jax.jit(lambda f, y: probe.fit(f, y, num_classes=3, num_steps=200))
    p, history = fit(f[:400], y[:400])
    assert p.weights.shape == (4, 3) and history.shape == (200,)
    assert float(history[-1]) < 0.1 * float(history[0])
    assert float(probe.accuracy(p, f[:400], y[:400])) == 1.0
    assert float(probe.accuracy(p, f[400:], y[400:])) == 1.0
    # Labels independent of the features: near chance on held-out data.
    y_noise = jnp.asarray(rng.integers(0, 3, 600), jnp.int32)
    p, _ = fit(f[:400], y_noise[:400])
    assert float(probe.accuracy(p, f[400:], y_noise[400:])) < 0.5


def test_study_records_the_probe_accuracy_per_run(tmp_path, shared_data_dir):
    spec = importlib.util.spec_from_file_location("rs", REPO / "configs" / "rotation_ssl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.data.data_dir = str(shared_data_dir)
    config.data.num_train, config.data.num_test = 100, 50
    config.objectives = {"st": dict(name="erm")}
    config.select.poisons = ("regions4",)
    config.victim.model = dict(name="mlp", width=1 / 32)
    config.victim.num_seeds = 1
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    assert set(results["summary"]) == {"st/clean", "st/regions4"}
    for name, s in results["summary"].items():
        scores = results["runs"][name]["evals"]["linear_probe"]
        assert s["probe_test_acc"]["mean"] == pytest.approx(scores["test_accuracy"][0])
        assert s["final_test_acc"] == s["probe_test_acc"]
        assert 0.0 <= s["probe_test_acc"]["mean"] <= 1.0
        # The probe is fitted on 100 training images with 10 classes: well above chance there.
        assert s["probe_train_acc"]["mean"] > 0.2
        history = results["runs"][name]["history"]["test/accuracy"]  # rotation, 4 classes
        assert len(history) == config.victim.epochs
    artifact = tmp_path / results["poisons"]["regions4"]["artifact"]
    assert artifact.parent == tmp_path / "poison" / "regions4"
    assert (artifact / "metadata.json").is_file()
