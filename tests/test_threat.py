import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import threat


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_projection_and_random_init_respect_ball_and_box(tiny_images, norm, eps):
    x = jnp.asarray(tiny_images[0])
    ball = threat.make(norm=norm, epsilon=eps)
    big = jax.random.normal(jax.random.key(1), x.shape) * 3
    for delta in (ball.project(big, x), ball.random_init(jax.random.key(2), x)):
        assert float(ball.norm_of(delta).max()) <= eps + 1e-6
        assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0


def test_random_init_is_a_function_of_the_key(tiny_images):
    x = jnp.asarray(tiny_images[0])
    ball = threat.make(norm="l2", epsilon=0.5)
    a, b = ball.random_init(jax.random.key(3), x), ball.random_init(jax.random.key(3), x)
    c = ball.random_init(jax.random.key(4), x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_mask_freezes_pixels(tiny_images):
    x = jnp.asarray(tiny_images[0])
    mask = np.zeros((8, 8, 1), np.float32)
    mask[:4] = 1.0  # only the top half may move
    ball = threat.make(norm="linf", epsilon=0.1, mask=mask)
    delta = ball.project(jnp.full_like(x, 0.05), x)
    assert float(jnp.abs(delta[:, 4:]).max()) == 0.0
    assert float(jnp.abs(delta[:, :4]).max()) > 0.0
    assert float(jnp.abs(ball.step_direction(jnp.ones_like(x))[:, 4:]).max()) == 0.0


def test_quantize_lands_on_8bit_grid_inside_ball():
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)) / 255.0, jnp.float32)
    ball = threat.make(norm="linf", epsilon=8 / 255, quantize=True)
    delta = ball.random_init(jax.random.key(0), x)
    scaled = np.asarray((x + delta) * 255.0)
    np.testing.assert_allclose(scaled, np.round(scaled), atol=1e-3)
    assert float(ball.norm_of(delta).max()) <= 8 / 255 + 1e-6


def test_step_direction_has_unit_norm(tiny_images):
    g = jax.random.normal(jax.random.key(0), tiny_images[0].shape)
    np.testing.assert_allclose(
        threat.make(norm="l2", epsilon=1.0).norm_of(
            threat.make(norm="l2", epsilon=1.0).step_direction(g)
        ),
        1.0,
        rtol=1e-5,
    )
    assert set(np.unique(threat.make(epsilon=0.1).step_direction(g))) <= {-1.0, 0.0, 1.0}


@pytest.mark.parametrize(
    "eps,norm,match", [(-0.1, "linf", ">= 0"), (8.0, "linf", "8/255"), (0.1, "l1", "Unknown norm")]
)
def test_bad_threat_models_are_refused(eps, norm, match):
    with pytest.raises(ValueError, match=match):
        threat.make(norm=norm, epsilon=eps)


def test_resolve_takes_a_ball_or_its_fields_never_both_nor_neither():
    mask = np.ones((8, 8, 1), np.float32)
    ball = threat.make(norm="l2", epsilon=0.5, mask=mask)
    assert threat.resolve(ball, what="x") is ball  # the object itself, not a copy
    built = threat.resolve(norm="l2", epsilon=0.5, mask=mask, what="x")
    assert (built.norm, built.epsilon, built.quantize) == ("l2", 0.5, False)
    np.testing.assert_array_equal(built.mask, ball.mask)
    assert threat.resolve(epsilon=0.1, what="x").norm == "linf"  # the norm alone has a default
    with pytest.raises(ValueError, match=r"pgd_at needs a radius: pass threat= .* or epsilon="):
        threat.resolve(norm="linf", what="pgd_at")
    for fields in (dict(epsilon=0.5), dict(norm="l2"), dict(mask=mask)):
        with pytest.raises(ValueError, match=f"got threat= and {next(iter(fields))}=.*not both"):
            threat.resolve(ball, **fields, what="x")
    with pytest.raises(ValueError, match="must be a threat.LpBall, got dict"):
        threat.resolve({"epsilon": 0.5}, what="x")
    with pytest.raises(ValueError, match="8/255"):  # the fields are checked as `make` checks them
        threat.resolve(epsilon=8, what="x")
