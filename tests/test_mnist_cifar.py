"""MNIST-CIFAR (simplicity bias): the dataset builder, the MNIST-randomized test set, PGD-AT whose
ball is restricted to the MNIST half, and the study run through `trainers.train_and_evaluate`."""

import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxpoison import data, models, objectives, trainers
from jaxpoison.data import mnist_cifar
from jaxpoison.data.sources import Dataset

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fast_compiles")


def fake_sources(n_mnist=(7, 9, 5), n_cifar=(4, 6, 8, 3, 3, 3, 3, 3, 3, 5), seed=0):
    """MNIST / CIFAR datasets whose every image is one constant value that names it uniquely:
    MNIST digit d, example i -> 100 + 10 d + i (only classes 0-2); CIFAR class c, example i ->
    10 c + i. Both splits identical."""
    rng = np.random.default_rng(seed)

    def split(counts, base, shape):
        labels = np.concatenate([np.full(k, c) for c, k in enumerate(counts)])
        order = rng.permutation(len(labels))
        labels = labels[order]
        rank = np.zeros(len(labels), int)
        for c in range(len(counts)):
            rank[labels == c] = np.arange(np.sum(labels == c))
        values = base(labels, rank).astype(np.uint8)
        return np.broadcast_to(values[:, None, None, None], (len(labels), *shape)).copy(), labels

    xm, ym = split(n_mnist, lambda c, i: 100 + 10 * c + i, (28, 28, 1))
    xc, yc = split(n_cifar, lambda c, i: 10 * c + i, (32, 32, 3))
    return (
        Dataset("mnist", xm, ym.astype(np.int32), xm, ym.astype(np.int32), 10),
        Dataset("cifar10", xc, yc.astype(np.int32), xc, yc.astype(np.int32), 10),
    )


def test_builder_pairs_digit_and_object_of_the_label_balanced_and_padded():
    mnist, cifar = fake_sources()
    ds = mnist_cifar.build(mnist, cifar)
    # class 0: min(7 zeros, 6 automobiles) = 6; class 1: min(9 ones, 5 trucks) = 5 -> 5 each.
    assert ds.x_train.shape == (10, 64, 32, 3) and ds.x_train.dtype == np.uint8
    assert np.bincount(ds.y_train).tolist() == [5, 5] and ds.num_classes == 2
    top, bottom = ds.x_train[:, :32].astype(int), ds.x_train[:, 32:].astype(int)
    # The digit sits in rows/cols 2..29, zeros around it, the same in all three channels.
    assert (top[:, :2] == 0).all() and (top[:, 30:] == 0).all() and (top[:, :, :2] == 0).all()
    assert (top == top[..., :1]).all()
    digit_value, object_value = top[:, 16, 16, 0], bottom[:, 0, 0, 0]
    for (digit, obj), label in zip(mnist_cifar.PAIRS, (0, 1), strict=True):
        sel = ds.y_train == label
        assert ((digit_value[sel] - 100) // 10 == digit).all()
        assert (object_value[sel] // 10 == obj).all()
        # digits without replacement, objects the first 5 of their class
        assert len(set(digit_value[sel])) == 5
        assert sorted(object_value[sel] % 10) == [0, 1, 2, 3, 4]
    assert (bottom == bottom[:, :1, :1, :1]).all()  # CIFAR half untouched
    # Deterministic: the same dataset (and fingerprint) every time.
    assert mnist_cifar.build(mnist, cifar).fingerprint() == ds.fingerprint()


def test_randomized_test_set_permutes_digits_keeps_cifar_halves_and_labels():
    rng = np.random.default_rng(1)
    n = 400
    y = np.repeat([0, 1], n // 2).astype(np.int32)
    x = rng.integers(0, 256, (n, 64, 32, 3), dtype=np.uint8)
    x[:, :32] = (y * 255).astype(np.uint8)[:, None, None, None]  # the digit = the label
    xr = mnist_cifar.randomize_mnist(x, seed=3)
    assert xr.shape == x.shape and xr.dtype == np.uint8
    np.testing.assert_array_equal(xr[:, 32:], x[:, 32:])  # CIFAR halves, in the same order
    # The MNIST halves are a permutation of the original ones ...
    key = lambda a: sorted(map(bytes, a[:, :32].reshape(len(a), -1)))
    assert key(xr) == key(x)
    # ... that no longer agrees with the label: ~50%, not 100%.
    agree = np.mean((xr[:, 0, 0, 0] == 255) == (y == 1))
    assert 0.4 < agree < 0.6, agree
    assert not np.array_equal(mnist_cifar.randomize_mnist(x, seed=4), xr)
    with pytest.raises(data.DataError, match="64, 32, 3"):
        mnist_cifar.randomize_mnist(x[:, :32])


def test_missing_files_name_both_and_the_fix(tmp_path):
    config = ml_collections.ConfigDict(
        dict(source="mnist_cifar", name="mnist_cifar", data_dir=str(tmp_path))
    )
    with pytest.raises(data.DataError, match=r"mnist\.npz and cifar10\.npz.*data_dir"):
        data.load(config)
    with pytest.raises(data.DataError, match="data.name='mnist_cifar'"):
        mnist_cifar.load("cifar10", data_dir=str(tmp_path))


def test_real_files_give_balanced_two_class_sets(shared_data_dir):
    ds = data.load(
        ml_collections.ConfigDict(
            dict(source="mnist_cifar", name="mnist_cifar", data_dir=str(shared_data_dir))
        )
    )
    assert ds.x_train.shape == (10000, 64, 32, 3) and ds.x_test.shape == (1960, 64, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000, 5000]
    assert np.bincount(ds.y_test).tolist() == [980, 980]
    # The digit half of class 1 (ones) has far less ink than that of class 0 (zeros).
    ink = ds.x_test[:, :32].reshape(len(ds.y_test), -1).mean(1)
    assert ink[ds.y_test == 0].mean() > 1.5 * ink[ds.y_test == 1].mean()


def test_pgd_at_with_the_mnist_mask_moves_only_the_mnist_half():
    module = models.make("mlp", num_classes=2, width=1 / 32)
    variables = models.init(module, jax.random.key(0), mnist_cifar.IMAGE_SHAPE)
    x = jax.random.uniform(jax.random.key(1), (4, *mnist_cifar.IMAGE_SHAPE))
    batch = {"image": x, "label": jnp.array([0, 1, 0, 1])}
    objective = objectives.make(
        "pgd_at", epsilon=1.0, num_steps=3, step_size=0.25, mask=mnist_cifar.mnist_mask()
    )
    loss, aux = jax.jit(objective, static_argnames="apply_fn")(
        variables, batch, jax.random.key(2), apply_fn=models.make_apply_fn(module)
    )
    delta = np.asarray(aux["adversarial"] - x)
    assert np.isfinite(float(loss))
    assert (delta[:, 32:] == 0).all()  # exactly zero outside the MNIST half
    assert np.mean(np.abs(delta[:, :32]) > 0.05) > 0.5  # and it does move inside it
    adv = np.asarray(aux["adversarial"])
    assert adv.min() >= 0.0 and adv.max() <= 1.0


def test_study_records_both_test_sets_per_run(tmp_path, shared_data_dir):
    spec = importlib.util.spec_from_file_location("sb", REPO / "configs" / "simplicity_bias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    assert config.objectives.at_mnist_half.mask == mnist_cifar.mnist_mask()
    config.data.data_dir = str(shared_data_dir)
    config.data.num_train, config.data.num_test = 100, 60
    config.objectives = {"st": dict(name="erm")}
    config.victim.model = dict(name="mlp", width=1 / 32)
    config.victim.num_seeds = 1
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    s = results["summary"]["st"]
    randomized = results["runs"]["st"]["history"]["test_mnist_randomized/accuracy"]
    assert len(randomized) == config.victim.epochs and len(randomized[0]) == 1
    assert s["final_mnist_randomized_acc"]["mean"] == pytest.approx(randomized[-1][0])
    assert results["runs"]["st"]["evals"]["mnist_randomized"]["accuracy"] == randomized[-1]
    assert 0.0 <= s["final_test_acc"]["mean"] <= 1.0
    for name in ("results.json", "config.json", "curves.png", "curves_mnist_randomized.png"):
        assert (tmp_path / name).is_file()
