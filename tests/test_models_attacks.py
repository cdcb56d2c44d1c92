import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import attacks, losses, models, threat

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_every_model_builds_and_maps_images_to_logits(name):
    shape = (28, 28, 1) if name == "cnn_mnist" else (8, 8, 3)
    module = models.make(name, num_classes=5, width=0.0625 if name != "mlp" else 0.05)
    variables = jax.jit(lambda k: models.init(module, k, shape))(jax.random.key(0))
    apply_fn = jax.jit(models.make_apply_fn(module), static_argnames="train")
    x = jnp.ones((2, *shape))
    logits, state = apply_fn(variables, x, train=True)
    assert logits.shape == (2, 5) and jnp.isfinite(logits).all()
    if "batch_stats" in variables:  # train mode updates the running statistics, eval uses them
        changed = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], state["batch_stats"]
        )
        assert any(jax.tree.leaves(changed))
        eval_logits, eval_state = apply_fn(variables, x, train=False)
        assert not np.allclose(eval_logits, logits)
        chex.assert_trees_all_equal(eval_state["batch_stats"], variables["batch_stats"])


def test_cifar_cnn_has_the_papers_size():
    module = models.make("cnn_cifar", num_classes=10)
    params = jax.eval_shape(lambda k: models.init(module, k, (32, 32, 3)), jax.random.key(0))
    params = params["params"]
    assert 385_000 < sum(p.size for p in jax.tree.leaves(params)) < 395_000


def test_released_l2c_victim_has_the_released_layers():
    """cnn_mnist with BatchNorm and average pools is DeepConfuse's MNIST/models.py create_net.

    By hand, at width 1 on 28x28x1: conv 1*20*25 + 20 = 520, conv 20*50*25 + 50 = 25,050,
    FC 800*500 + 500 = 400,500, FC 500*10 + 10 = 5,010 (431,080, the plain CNN's count), plus
    a scale and a bias per BatchNorm channel 2*(20 + 50 + 500 + 10) = 1,160; as many running
    statistics (a mean and a variance per channel).
    """
    plain = models.make("cnn_mnist", num_classes=10)
    module = models.make("cnn_mnist", num_classes=10, normalization="batch", pool="avg")
    count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
    base = jax.eval_shape(lambda k: models.init(plain, k, (28, 28, 1)), jax.random.key(0))
    variables = models.init(module, jax.random.key(0), (28, 28, 1))
    assert count(base["params"]) == 431_080 and set(base) == {"params"}
    assert count(variables["params"]) == 432_240 and count(variables["batch_stats"]) == 1_160
    widths = {k: v["mean"].shape for k, v in variables["batch_stats"].items()}
    assert widths == {f"BatchNorm_{i}": (c,) for i, c in enumerate((20, 50, 500, 10))}
    assert variables["params"]["Dense_0"]["kernel"].shape == (4 * 4 * 50, 500)
    # BatchNorm on the logits: in training mode (scale 1, bias 0 at init) every logit has mean 0
    # and variance 1 over the batch.
    x = jax.random.uniform(jax.random.key(1), (64, 28, 28, 1))
    logits, _ = models.make_apply_fn(module)(variables, x, train=True)
    np.testing.assert_allclose(jnp.mean(logits, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(logits, 0), 1.0, atol=1e-3)
    # A bad option fails in one line that names it.
    with pytest.raises(ValueError, match="pool='mean'"):
        models.make("cnn_mnist", num_classes=10, pool="mean").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="normalization='layer'"):
        models.make("cnn_mnist", num_classes=10, normalization="layer").init(jax.random.key(0), x)


@pytest.mark.parametrize("width,size", [(1.0, 36.5e6), (0.1, 0.37e6)])
def test_wide_resnet_has_the_papers_size(width, size):
    """WRN-28-10 has 36.5M parameters (Zagoruyko & Komodakis, Table 5); width 0.1 is WRN-28-1."""
    module = models.make("wrn28_10", num_classes=10, width=width)
    variables = jax.eval_shape(lambda k: models.init(module, k, (32, 32, 3)), jax.random.key(0))
    params = variables["params"]
    assert abs(sum(p.size for p in jax.tree.leaves(params)) - size) < 0.01 * size
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 16)  # the stem is never widened


def test_cifar_cnn_flatten_head_tells_the_halves_apart():
    """On 32x32 the two heads are one network; on 64x32 'mean' sums the halves, 'flatten' not."""
    mean, flat = (
        models.make("cnn_cifar", num_classes=2, width=0.125, head=h) for h in "mean flatten".split()
    )
    square = models.init(mean, jax.random.key(0), (32, 32, 3))
    x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))
    np.testing.assert_allclose(mean.apply(square, x), flat.apply(square, x), rtol=1e-6)
    tall = models.init(flat, jax.random.key(0), (64, 32, 3))
    assert (
        tall["params"]["Dense_0"]["kernel"].shape[0]
        == 2 * square["params"]["Dense_0"]["kernel"].shape[0]
    )
    with pytest.raises(ValueError, match="head='max'"):
        models.init(
            models.make("cnn_cifar", num_classes=2, head="max"), jax.random.key(0), (32, 32, 3)
        )


@pytest.fixture(scope="module")
def linear_model():
    """A fixed linear softmax model on 4x4x1 images: fast, with useful gradients."""
    w = jax.random.normal(jax.random.key(0), (16, 3))

    def apply_fn(variables, x, *, train):
        return x.reshape(x.shape[0], -1) @ variables["w"], {}

    x = jax.random.uniform(jax.random.key(1), (32, 4, 4, 1))
    y = jnp.argmax(apply_fn({"w": w}, x, train=False)[0], -1)
    return apply_fn, {"w": w}, x, y


@pytest.mark.parametrize("norm,eps,step", [("linf", 0.1, 0.025), ("l2", 0.5, 0.1)])
def test_pgd_maximizes_and_minimizes_inside_the_ball(linear_model, norm, eps, step):
    apply_fn, variables, x, y = linear_model
    ball = threat.make(norm=norm, epsilon=eps)
    loss_fn = attacks.model_loss(apply_fn, variables)
    clean = loss_fn(x, y)
    kw = dict(key=jax.random.key(2), threat=ball, num_steps=10, step_size=step)
    up = attacks.pgd(loss_fn, x, y, maximize=True, **kw)
    down = attacks.pgd(loss_fn, x, y, maximize=False, **kw)
    for d in (up, down):
        assert float(ball.norm_of(d).max()) <= eps + 1e-6
        assert 0.0 <= float((x + d).min()) and float((x + d).max()) <= 1.0
    assert (
        float(loss_fn(x + up, y).mean()) > float(clean.mean()) > float(loss_fn(x + down, y).mean())
    )


def test_pgd_init_continues_an_attack_exactly(linear_model):
    apply_fn, variables, x, y = linear_model
    ball = threat.make(epsilon=0.1)
    loss_fn = attacks.model_loss(apply_fn, variables)
    kw = dict(key=jax.random.key(2), threat=ball, step_size=0.02, random_start=False)
    ten = attacks.pgd(loss_fn, x, y, num_steps=10, **kw)
    five = attacks.pgd(loss_fn, x, y, num_steps=5, **kw)
    assert float(jnp.abs(five - ten).max()) > 1e-3
    resumed = attacks.pgd(loss_fn, x, y, num_steps=5, init=five, **kw)
    np.testing.assert_allclose(resumed, ten, atol=1e-7)
    outside = attacks.pgd(loss_fn, x, y, num_steps=0, init=jnp.full_like(x, 0.5), **kw)
    assert float(jnp.abs(outside).max()) <= 0.1 + 1e-7  # the start is projected


def test_targeted_pgd_and_mifgsm(linear_model):
    apply_fn, variables, x, y = linear_model
    ball = threat.make(epsilon=0.3)
    target = lambda labels: (labels + 1) % 3
    toward = attacks.model_loss(apply_fn, variables, target=target)
    d = attacks.pgd(
        toward,
        x,
        y,
        key=jax.random.key(0),
        threat=ball,
        num_steps=20,
        step_size=0.05,
        maximize=False,
    )
    hit = jnp.argmax(apply_fn(variables, x + d, train=False)[0], -1) == target(y)
    assert float(hit.mean()) > 0.5
    m = attacks.mifgsm(
        attacks.model_loss(apply_fn, variables),
        x,
        y,
        key=jax.random.key(0),
        threat=ball,
        num_steps=10,
        step_size=0.03,
    )
    assert float(ball.norm_of(m).max()) <= 0.3 + 1e-6
    assert float(losses.accuracy(apply_fn(variables, x + m, train=False)[0], y).mean()) < 1.0


def test_pgd_compiles_once(linear_model):
    apply_fn, variables, x, y = linear_model
    ball = threat.make(epsilon=0.1)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def attack(variables, x, y, key):
        return attacks.pgd(
            attacks.model_loss(apply_fn, variables),
            x,
            y,
            key=key,
            threat=ball,
            num_steps=3,
            step_size=0.03,
        )

    for i in range(3):
        attack(variables, x, y, jax.random.key(i))
    chex.clear_trace_counter()


def test_margin_loss_sign():
    logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    np.testing.assert_allclose(losses.margin(logits, jnp.array([0, 0])), [-1.0, 3.0])


def test_bfloat16_computation_keeps_float32_parameters_and_logits():
    # A config's model spec names the computation's precision: dtype="bfloat16" (mixed
    # precision: activations in bf16, parameters and logits float32), refused when unknown.
    x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))
    f32 = models.make("cnn_mnist", num_classes=10, width=0.25)
    bf16 = models.make("cnn_mnist", num_classes=10, width=0.25, dtype="bfloat16")
    assert bf16.dtype == jnp.bfloat16
    variables = models.init(f32, jax.random.key(1), (28, 28, 1))
    assert all(
        p.dtype == jnp.float32
        for p in jax.tree.leaves(models.init(bf16, jax.random.key(1), (28, 28, 1)))
    )
    low = jax.jit(lambda v: bf16.apply(v, x, train=False))(variables)
    high = jax.jit(lambda v: f32.apply(v, x, train=False))(variables)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, atol=0.05 * float(jnp.abs(high).max()))
    assert not np.array_equal(low, high)
    with pytest.raises(ValueError, match="dtype='float8'"):
        models.make("mlp", num_classes=10, dtype="float8")
