import jax
import ml_collections
import numpy as np
import pytest

from jaxpoison import data


def cfg(**kw):
    return ml_collections.ConfigDict(kw)


def test_embedded_subset_is_balanced_and_uint8():
    ds = data.load(cfg(source="embedded", name="cifar10"))
    assert ds.x_train.shape == (2500, 32, 32, 3) and ds.x_test.shape == (1000, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(ds.y_train), [250] * 10)
    np.testing.assert_array_equal(np.bincount(ds.y_test), [100] * 10)
    assert ds.class_names[0] == "airplane"


def test_npz_source_reads_shared_data_with_balanced_subset(shared_data_dir):
    ds = data.load(
        cfg(source="npz", name="mnist", data_dir=str(shared_data_dir), num_train=1000, num_test=200)
    )
    assert ds.x_train.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.y_train), [100] * 10)
    assert ds.x_test.shape[0] == 200


def test_missing_npz_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="data_dir"):
        data.load(cfg(source="npz", name="cifar10", data_dir=str(tmp_path)))


def test_unknown_source_is_refused():
    with pytest.raises(data.DataError, match="Unknown data.source"):
        data.load(cfg(source="imagenet_from_memory", name="x"))


def test_bad_arrays_are_refused(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(
        path,
        x_train=np.zeros((4, 8, 8), np.float32),
        y_train=np.zeros(4),
        x_test=np.zeros((2, 8, 8), np.float32),
        y_test=np.zeros(2),
    )
    with pytest.raises(data.DataError, match="uint8"):
        data.load(cfg(source="npz", name="bad", path=str(path)))
    np.savez(
        path,
        x_train=np.zeros((4, 8, 8, 1), np.uint8),
        y_train=np.zeros(3),
        x_test=np.zeros((2, 8, 8, 1), np.uint8),
        y_test=np.zeros(2),
    )
    with pytest.raises(data.DataError, match="do not match"):
        data.load(cfg(source="npz", name="bad", path=str(path)))


def test_channel_first_npz_is_refused_with_the_fix(tmp_path):
    """Bug 4's regression: an (N, 3, 32, 32) file loaded as 32-channel images."""
    path = tmp_path / "nchw.npz"
    x = np.zeros((4, 3, 32, 32), np.uint8)
    np.savez(path, x_train=x, y_train=np.zeros(4), x_test=x[:2], y_test=np.zeros(2))
    with pytest.raises(data.DataError, match=r"channel-first.*np.transpose\(x, \(0, 2, 3, 1\)\)"):
        data.load(cfg(source="npz", name="nchw", path=str(path)))
    x = x.transpose(0, 2, 3, 1)
    np.savez(path, x_train=x, y_train=np.zeros(4), x_test=x[:2], y_test=np.zeros(2))
    assert data.load(cfg(source="npz", name="nchw", path=str(path))).image_shape == (32, 32, 3)


def test_load_takes_a_config_dict_a_plain_dict_or_keywords():
    from_config = data.load(cfg(source="embedded", name="cifar10", num_train=20))
    from_dict = data.load(dict(source="embedded", name="cifar10", num_train=20))
    from_keywords = data.load(source="embedded", name="cifar10", num_train=20)
    overridden = data.load(cfg(source="embedded", name="cifar10", num_train=50), num_train=20)
    for ds in (from_dict, from_keywords, overridden):
        np.testing.assert_array_equal(ds.x_train, from_config.x_train)
        np.testing.assert_array_equal(ds.y_train, from_config.y_train)
    assert from_config.x_train.shape[0] == 20
    with pytest.raises(data.DataError, match="data.name is missing"):
        data.load(source="embedded")


def test_digits_source():
    ds = data.load(cfg(source="digits", name="digits"))
    assert ds.x_train.shape == (1397, 8, 8, 1) and ds.x_test.shape == (400, 8, 8, 1)
    assert ds.x_train.max() == 255 and ds.num_classes == 10


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_with_mock_data(name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load(cfg(source="tfds", name=name))
    assert ds.x_train.shape == (12, *shape) and ds.x_train.dtype == np.uint8
    assert ds.num_classes == 10 and ds.y_train.shape == (12,)


def test_tfds_offline_without_download_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="data.source='npz'"):
        data.load(cfg(source="tfds", name="cifar10", data_dir=str(tmp_path)))


def test_validation_split_is_balanced_disjoint_and_fixed():
    y = np.repeat(np.arange(5), 20)
    train, val = data.split_validation(y, 10, 5, seed=0)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 100
    np.testing.assert_array_equal(np.bincount(y[val]), [2] * 5)
    np.testing.assert_array_equal(val, data.split_validation(y, 10, 5, seed=0)[1])


def test_epoch_batches_and_augment():
    import jax
    import jax.numpy as jnp

    batches = data.epoch_batches(jax.random.key(0), 10, 3)
    assert batches.shape == (3, 3) and len(set(np.asarray(batches).ravel())) == 9
    x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 3)), jnp.float32)
    a = data.augment(jax.random.key(1), x, crop_padding=2, flip=True)
    b = data.augment(jax.random.key(1), x, crop_padding=2, flip=True)
    assert a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    flipped = data.augment(jax.random.key(1), x, flip=True)
    for i in range(4):  # each image is either itself or its mirror
        assert np.allclose(flipped[i], x[i]) or np.allclose(flipped[i], x[i, :, ::-1])


def test_loaded_images_are_placed_on_a_cpu_device_without_a_copy():
    # 64-byte aligned host images are aliased by XLA's CPU client; numpy's own are copied.
    ds = data.load(source="embedded", name="cifar10")
    for x in (ds.x_train, ds.x_test):
        placed = jax.device_put(x, jax.devices("cpu")[0])
        assert placed.unsafe_buffer_pointer() == x.ctypes.data
    empty = data.aligned_empty((3, 5), np.float32)
    assert empty.ctypes.data % 64 == 0 and empty.shape == (3, 5) and empty.dtype == np.float32
