"""Learning to Confuse: exactness of the meta-gradient, the approximations, the generators.

Everything runs on 8x8 grey images, 3 classes, a 6-unit tanh MLP victim and a 2-channel
autoencoder generator, so compile time stays small on CPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpoison import losses, poisons
from jaxpoison.models import generators
from jaxpoison.poisons import l2c
from jaxpoison.threat import LpBall

K, SHAPE, T, B = 3, (8, 8, 1), 4, 4
LR, MOMENTUM = 0.5, 0.9


class TinyMLP(nn.Module):
    """A smooth victim (tanh), so central finite differences are accurate."""

    num_classes: int = K

    @nn.compact
    def __call__(self, x, train=False):
        x = jnp.tanh(nn.Dense(6)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(x)


class TinyGenerator(nn.Module):
    """A dense generator, ε·tanh bounded: the exactness tests need no convolutions (whose
    second-order programs take XLA:CPU long to compile); the conv generators are tested apart."""

    epsilon: float = 0.3

    @nn.compact
    def __call__(self, x, train=False):
        raw = nn.Dense(x[0].size)(x.reshape(x.shape[0], -1)).reshape(x.shape)
        return generators.bound_output(raw, epsilon=self.epsilon, norm="linf")


class TinyBatchGenerator(nn.Module):
    """TinyGenerator with BatchNorm before the bound, as the released generator normalises: in
    training mode each example's noise depends on its whole batch through the statistics."""

    epsilon: float = 0.3

    @nn.compact
    def __call__(self, x, train=False):
        raw = nn.Dense(x[0].size)(x.reshape(x.shape[0], -1))
        raw = nn.BatchNorm(use_running_average=not train, momentum=0.9)(raw)
        return generators.bound_output(raw.reshape(x.shape), epsilon=self.epsilon, norm="linf")


@contextlib.contextmanager
def logic_only(enable_x64=False):
    """float64 (optional) and XLA's optimisations off: these tests check values, not speed."""
    previous = [jax.config.read(k) for k in ("jax_enable_x64", "jax_disable_most_optimizations")]
    jax.config.update("jax_enable_x64", enable_x64)
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous[0])
        jax.config.update("jax_disable_most_optimizations", previous[1])


def _data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (n, *SHAPE)).astype(dtype)
    y = rng.integers(0, K, n).astype(np.int32)
    return {"image": jnp.asarray(x), "label": jnp.asarray(y), "index": jnp.arange(n)}


def _kwargs(**overrides):
    kwargs = dict(
        threat=LpBall(0.3),
        num_classes=K,
        image_shape=SHAPE,
        generator=TinyGenerator(),
        victim=TinyMLP(),
        inner_optimizer=dict(learning_rate=LR, momentum=MOMENTUM, weight_decay=0.0),
        unroll_steps=T,
    )
    return kwargs | overrides


def _reference_objective(problem, gen_params, victim0, inner, outer, head=0):
    """The same trial as a Python loop with hand-written SGD + momentum (no scan, no optax)."""
    params = victim0.params
    velocity = jax.tree.map(jnp.zeros_like, params)
    module = problem.victim_module
    for t in range(T):
        gp = jax.lax.stop_gradient(gen_params) if t < head else gen_params
        x, y = inner["image"][t], inner["label"][t]
        xp = x + problem.delta_fn(gp, x)
        loss = lambda p, xp=xp, y=y: jnp.mean(
            losses.cross_entropy(module.apply({"params": p}, xp), y)
        )
        grads = jax.grad(loss)(params)
        velocity = jax.tree.map(lambda v, g: MOMENTUM * v + g, velocity, grads)
        params = jax.tree.map(lambda p, v: p - LR * v, params, velocity)
        if t < head:
            params, velocity = jax.lax.stop_gradient((params, velocity))
    logits = module.apply({"params": params}, outer["image"])
    return -jnp.mean(losses.cross_entropy(logits, outer["label"]))


@pytest.fixture(scope="module")
def exact64():
    """Meta-gradients of one float64 trial: scan (remat on/off/segmented), loop, FD.

    Everything is computed inside one `jax.jit` (op-by-op dispatch would compile every
    primitive separately, which is far slower on CPU).
    """
    with logic_only(enable_x64=True):
        problems = {
            name: l2c.meta_problem(**_kwargs(**kw))
            for name, kw in {
                "remat": dict(remat=True),
                "remat_every_step": dict(remat=True, checkpoint_segment=1),
                "no_remat": dict(remat=False),
                "truncated": dict(truncation=2),
                "last_step_only": dict(truncation=1),  # one differentiated step: no loop
            }.items()
        }
        base = problems["remat"]
        batchnorm = l2c.meta_problem(**_kwargs(generator=TinyBatchGenerator()))
        batch = _data(T * B, np.float64)
        h = 1e-5

        def along_direction(f, params, grad, key):
            """A central finite difference of f and the gradient, along a random unit vector."""
            flat, unravel = jax.flatten_util.ravel_pytree(params)
            v = jax.random.normal(key, flat.shape, jnp.float64)
            v = v / jnp.linalg.norm(v)
            fd = (f(unravel(flat + h * v)) - f(unravel(flat - h * v))) / (2 * h)
            return fd, jnp.dot(jax.flatten_util.ravel_pytree(grad)[0], v)

        @jax.jit
        def compute(batch):
            inner, outer = base.split(batch, jax.random.key(1))
            victim0 = base.victim_init(jax.random.key(2), jnp.float64)
            keys = jax.random.split(jax.random.key(3), T)
            gen_params = generators.init(base.gen_module, jax.random.key(4), SHAPE, jnp.float64)
            # Larger weights so the noise is not tiny (tanh still far from saturation).
            gen_params = jax.tree.map(lambda p: 3.0 * p, gen_params)

            def objective(problem):
                return lambda g: problem.meta_objective(g, victim0, inner, outer, keys)[0]

            def reference(head, problem=base):
                return lambda g: _reference_objective(problem, g, victim0, inner, outer, head)

            out = {name: jax.grad(objective(p))(gen_params) for name, p in problems.items()}
            out["loop"] = jax.grad(reference(0))(gen_params)
            out["loop_truncated"] = jax.grad(reference(T - 2))(gen_params)
            out["loop_last_step"] = jax.grad(reference(T - 1))(gen_params)
            out["values"] = (objective(base)(gen_params), reference(0)(gen_params))
            out["fd"], out["directional"] = along_direction(
                objective(base), gen_params, out["remat"], jax.random.key(5)
            )
            # The BatchNorm generator: batch statistics inside the unrolled, differentiated trial.
            bn_params = generators.init(batchnorm.gen_module, jax.random.key(6), SHAPE, jnp.float64)
            out["bn"] = jax.grad(objective(batchnorm))(bn_params)
            out["bn_loop"] = jax.grad(reference(0, batchnorm))(bn_params)
            out["bn_fd"], out["bn_directional"] = along_direction(
                objective(batchnorm), bn_params, out["bn"], jax.random.key(7)
            )
            x = inner["image"][0]
            alone, together = batchnorm.delta_fn(bn_params, x[:2]), batchnorm.delta_fn(bn_params, x)
            out["bn_batch_gap"] = jnp.max(jnp.abs(alone - together[:2]))
            return out

        return jax.device_get(compute(batch))


def _assert_tree_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == np.float64
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_scan_meta_gradient_equals_python_loop(exact64):
    np.testing.assert_allclose(*exact64["values"], rtol=0, atol=1e-12)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(exact64["loop"])) > 1e-6
    _assert_tree_close(exact64["remat"], exact64["loop"], 1e-10)


def test_remat_does_not_change_the_gradient(exact64):
    _assert_tree_close(exact64["no_remat"], exact64["loop"], 1e-10)
    _assert_tree_close(exact64["remat_every_step"], exact64["loop"], 1e-10)


def test_truncated_meta_gradient_equals_truncated_loop(exact64):
    _assert_tree_close(exact64["truncated"], exact64["loop_truncated"], 1e-10)
    _assert_tree_close(exact64["last_step_only"], exact64["loop_last_step"], 1e-10)


def test_meta_gradient_matches_finite_difference(exact64):
    fd, directional = float(exact64["fd"]), float(exact64["directional"])
    assert abs(directional) > 1e-6
    assert abs(fd - directional) <= 1e-6 * max(1.0, abs(directional))


def test_batchnorm_meta_gradient_matches_loop_and_finite_difference(exact64):
    """With BatchNorm in the generator the crafting noise of an example depends on its batch
    (training mode), and the scan meta-gradient through those statistics is still exact."""
    assert float(exact64["bn_batch_gap"]) > 1e-3
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(exact64["bn_loop"])) > 1e-6
    _assert_tree_close(exact64["bn"], exact64["bn_loop"], 1e-10)
    fd, directional = float(exact64["bn_fd"]), float(exact64["bn_directional"])
    assert abs(directional) > 1e-6
    assert abs(fd - directional) <= 1e-6 * max(1.0, abs(directional))


@pytest.mark.parametrize(
    "name,norm,epsilon,normalization,channels",
    [
        ("autoencoder", "linf", 0.1, "instance", 2),
        ("unet", "l2", 0.5, "instance", 2),
        ("autoencoder", "linf", 0.1, "batch", 1),
        ("unet", "l2", 0.5, "batch", 3),
    ],
)
def test_generator_output_respects_epsilon(name, norm, epsilon, normalization, channels):
    threat = LpBall(epsilon, norm=norm)
    spec = dict(name=name, features=(2, 2), width=1.0, normalization=normalization)
    module = l2c.make_generator(spec, threat=threat)

    @jax.jit
    def deltas_of(x):
        variables = generators.init_variables(module, jax.random.key(0), x.shape[1:])
        # Scale the weights up so tanh saturates and the bound is actually tested.
        variables["params"] = jax.tree.map(lambda p: 50.0 * p, variables["params"])
        train, _ = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return module.apply(variables, x), train

    x = jax.random.uniform(jax.random.key(1), (5, 9, 10, channels))
    with logic_only():
        deltas = deltas_of(x)
    for delta in deltas:
        assert delta.shape == x.shape
        assert float(jnp.max(threat.norm_of(delta))) <= epsilon * (1 + 1e-6)
        assert float(jnp.max(threat.norm_of(delta))) > 0.5 * epsilon


def test_batchnorm_generator_trains_on_batch_statistics_and_poisons_with_running_averages():
    """normalization='batch' (the released generator's): in training mode an image's noise
    depends on its batch and every pass moves the running averages with PyTorch's momentum
    (0.1 of the batch's statistics); in evaluation mode (the poison as applied) the noise is
    per image, from the running averages. A name outside NORMALIZATIONS is one error line."""
    threat = LpBall(0.3)
    spec = dict(name="autoencoder", features=(4, 4), normalization="batch")
    module = l2c.make_generator(spec, threat=threat)
    x = jax.random.uniform(jax.random.key(1), (6, 16, 16, 1))

    @jax.jit
    def run(x):
        start = generators.init_variables(module, jax.random.key(0), x.shape[1:])

        def train(variables, images):
            delta, updates = module.apply(variables, images, train=True, mutable=["batch_stats"])
            return delta, {**variables, **updates}

        full, once = train(start, x)
        half, _ = train(start, x[:3])
        _, twice = train(once, x)
        stats = [v["batch_stats"] for v in (start, once, twice)]
        return full, half, module.apply(once, x), module.apply(once, x[:3]), stats

    with logic_only():
        full, half, applied, applied_half, (s0, s1, s2) = run(x)
    assert float(jnp.max(jnp.abs(full[:3] - half))) > 1e-3
    np.testing.assert_allclose(applied[:3], applied_half, atol=1e-6)
    assert float(jnp.max(jnp.abs(applied - full))) > 1e-3
    assert len(s0) == 2 * len(spec["features"])  # every convolution, the output one too
    for layer in s0:
        np.testing.assert_array_equal(s0[layer]["mean"], 0.0)
        np.testing.assert_array_equal(s0[layer]["var"], 1.0)
        # From mean 0 / var 1, two passes over one batch (statistics μ, σ²) give 0.1 μ then
        # 0.19 μ, and 0.9 + 0.1 σ² then 0.81 + 0.19 σ².
        np.testing.assert_allclose(s2[layer]["mean"], 1.9 * s1[layer]["mean"], rtol=1e-4)
        sigma2 = (s1[layer]["var"] - 0.9) / 0.1
        np.testing.assert_allclose((s2[layer]["var"] - 0.81) / 0.19, sigma2, rtol=1e-3, atol=1e-5)
        assert float(jnp.max(jnp.abs(s1[layer]["mean"]))) > 0
    with pytest.raises(ValueError, match=r"normalization='layer' is not one of \('instance'"):
        l2c.make_generator(dict(spec, normalization="layer"), threat=threat)


def test_normalized_generator_does_not_saturate_when_its_weights_grow():
    """The bug the normalization fixes: Adam grows the conv weights, the pre-tanh output
    follows, tanh saturates at ±ε and the meta-gradient vanishes. With instance normalization
    after every convolution, scaling every conv's kernel and bias leaves g(x) unchanged."""
    threat = LpBall(0.3)
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))

    def deltas(normalization, scales):
        """g(x) with every conv's kernel and bias scaled, one compiled program per generator."""
        spec = dict(name="autoencoder", features=(4, 4), normalization=normalization)
        module = l2c.make_generator(spec, threat=threat)

        @jax.jit
        def delta_of(scale):
            params = generators.init(module, jax.random.key(0), x.shape[1:])
            params = {
                k: jax.tree.map(lambda p: scale * p, v) if k.startswith("Conv") else v
                for k, v in params.items()
            }
            return module.apply({"params": params}, x)

        return [delta_of(scale) for scale in scales]

    with logic_only():
        base, grown = deltas("instance", (1.0, 50.0))
        (bare,) = deltas("none", (50.0,))
    np.testing.assert_allclose(grown, base, atol=1e-4)
    saturated = [float(jnp.mean(jnp.abs(d) > 0.99 * 0.3)) for d in (grown, bare)]
    assert saturated[0] < 0.2 and saturated[1] > 0.5, saturated


class IdleParamMLP(nn.Module):
    """TinyMLP with a parameter that never gets a gradient (like a dead ReLU channel)."""

    @nn.compact
    def __call__(self, x, train=False):
        idle = self.param("idle", nn.initializers.zeros, (2,))
        return TinyMLP()(x) + 0.0 * jnp.sum(idle)


def test_meta_gradient_through_adam_is_finite():
    """Adam's √v has an infinite derivative at v = 0 (a parameter whose gradient is 0): without
    eps_root the exact meta-gradient through an Adam inner loop is NaN; l2c sets it."""
    batch = _data(T * B, np.float32)
    adam = dict(name="adam", learning_rate=0.01, weight_decay=0.0)
    norms = {}
    with logic_only():
        for label, optimizer in (("default", adam), ("no eps_root", dict(adam, eps_root=0.0))):
            poison = l2c.l2c(**_kwargs(victim=IdleParamMLP(), inner_optimizer=optimizer))
            state = jax.jit(poison.init)(jax.random.key(0), batch)
            _, metrics = jax.jit(poison.update)(state, batch, jax.random.key(1))
            norms[label] = float(metrics["meta/grad_norm"])
    assert np.isfinite(norms["default"]) and norms["default"] > 0
    assert np.isnan(norms["no eps_root"])


def test_persistent_victim_continues_across_trials():
    """victim_reset_every=R: trial 2 starts where trial 1 left the victim; trial R+1 restarts."""
    batch = _data(T * B, np.float32)
    states = {}
    with logic_only():
        for reset_every in (1, 2):
            poison = l2c.l2c(**_kwargs(victim_reset_every=reset_every))
            update = jax.jit(poison.update)
            state = jax.jit(poison.init)(jax.random.key(0), batch)
            trail = []
            for i in range(3):
                state, _ = update(state, batch, jax.random.key(10 + i))
                trail.append(state)
            states[reset_every] = trail
    fresh, kept = states[1], states[2]
    # Same first trial; the second continues the victim (T more steps) or restarts it.
    chex.assert_trees_all_close(kept[0].params, fresh[0].params)
    assert [int(s.victim.step) for s in fresh] == [T, T, T]
    assert [int(s.victim.step) for s in kept] == [T, 2 * T, T]
    gap = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), kept[1].params, fresh[1].params)
    assert max(jax.tree.leaves(gap)) > 0


def test_refresh_every_trains_the_victim_on_one_frozen_poison():
    """refresh_every=R': the victim's noise comes from the generator as it was at the last
    multiple of R' trials. With R' = 2 the first two trials train the victim exactly as a
    generator that never moves would (meta learning rate 0); the third, after the refresh, does
    not."""
    batch = _data(T * B, np.float32)
    victims = {}
    with logic_only():
        for label, refresh, lr in (("still", 1, 0.0), ("two", 2, 0.1)):
            poison = l2c.l2c(
                **_kwargs(
                    method="algorithm2",
                    victim_reset_every=2,
                    refresh_every=refresh,
                    meta_optimizer=dict(name="sgd", learning_rate=lr),
                )
            )
            update = jax.jit(poison.update)
            state = jax.jit(poison.init)(jax.random.key(0), batch)
            trail = []
            for i in range(3):
                previous = state.params
                state, _ = update(state, batch, jax.random.key(10 + i))
                trail.append((state, previous))
            victims[label] = trail
    still, two = victims["still"], victims["two"]
    gap = lambda a, b: max(
        jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b))
    )
    for i in (0, 1):
        chex.assert_trees_all_close(two[i][0].victim.params, still[i][0].victim.params)
    assert gap(two[2][0].victim.params, still[2][0].victim.params) > 1e-6
    # The stored copy: ξ at init through trial 1, then ξ as trial 2 began.
    chex.assert_trees_all_close(two[1][0].frozen, two[0][1])
    chex.assert_trees_all_close(two[2][0].frozen, two[2][1])
    assert gap(two[2][0].params, two[2][0].frozen) > 0
    assert still[0][0].frozen is None
    with pytest.raises(ValueError, match="refresh_every=2 needs a frozen generator copy"):
        l2c.l2c(**_kwargs(method="exact", refresh_every=2))


def test_released_preset_trains_each_crafting_victim_on_one_frozen_poison():
    """configs/l2c_mnist.py:released refreshes the frozen copy exactly when the victim restarts,
    on top of either size, and its spec builds (l2c accepts every key)."""
    from jaxpoison import specs

    path = Path(__file__).resolve().parents[1] / "configs" / "l2c_mnist.py"
    loader = importlib.util.spec_from_file_location("l2c_mnist_config", path)
    l2c_mnist = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(l2c_mnist)
    for arg, reset in (("released", 94), ("cpu,released", 63)):
        config = l2c_mnist.get_config(arg)
        spec = config.poisons.l2c
        assert spec.method == "algorithm2"
        assert spec.refresh_every == spec.victim_reset_every == reset
        ps = specs.poison_spec(config, "l2c", image_shape=(28, 28, 1), num_classes=10)
        poison = specs.make_poison(ps, image_shape=(28, 28, 1), num_classes=10)
        assert poison.num_epochs == spec.num_epochs
    assert "refresh_every" not in l2c_mnist.get_config("cpu").poisons.l2c


def test_released_victim_preset_trains_the_released_evaluation_victim():
    """configs/l2c_mnist.py:released_victim: the victims are the released test_model.py's (the
    BatchNorm CNN with average pools, Adam 0.01 at a constant rate, 2 epochs of 64) on either
    size; the crafting victim and the other presets keep theirs."""
    from functools import partial

    from jaxpoison import models, training

    path = Path(__file__).resolve().parents[1] / "configs" / "l2c_mnist.py"
    loader = importlib.util.spec_from_file_location("l2c_mnist_config", path)
    l2c_mnist = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(l2c_mnist)
    key = jax.random.key(0)
    for base, seeds in ((None, 2), ("cpu", 1)):
        config = l2c_mnist.get_config(f"{base},released_victim" if base else "released_victim")
        victim = config.victim
        assert (victim.model.normalization, victim.model.pool) == ("batch", "avg")
        assert (victim.epochs, victim.batch_size, victim.num_seeds) == (2, 64, seeds)
        opt = victim.optimizer
        assert (opt.name, opt.learning_rate, opt.weight_decay, opt.schedule) == (
            "adam",
            0.01,
            0.0,
            "constant",
        )
        assert config.poisons.l2c == l2c_mnist.get_config(base).poisons.l2c
        trainer = training.Trainer.from_config(victim, num_classes=10, image_shape=(28, 28, 1))
        shapes = jax.eval_shape(partial(models.init, trainer.module, image_shape=(28, 28, 1)), key)
        assert set(shapes) == {"params", "batch_stats"}
    assert "normalization" not in l2c_mnist.get_config("cpu").victim.model


@pytest.fixture(scope="module")
def updated():
    """One jitted update per method, run twice (a retrace would fail assert_max_traces)."""
    batch = _data(T * B, np.float32)
    out = {}
    with logic_only():
        for method in l2c.METHODS:
            poison = l2c.l2c(
                **_kwargs(method=method, meta_optimizer=dict(name="sgd", learning_rate=0.1))
            )
            chex.clear_trace_counter()  # the methods' updates share one code object
            update = jax.jit(chex.assert_max_traces(poison.update, n=1))
            state = jax.jit(poison.init)(jax.random.key(0), batch)
            state, metrics = update(state, batch, jax.random.key(1))
            state, metrics = update(state, batch, jax.random.key(2))
            out[method] = (poison, state, jax.device_get(metrics))
    return out, batch


@pytest.mark.parametrize("method", l2c.METHODS)
def test_every_method_updates_with_finite_metrics(updated, method):
    out, batch = updated
    poison, state, metrics = out[method]
    assert int(state.step) == 2
    assert set(metrics) >= {"meta/objective", "meta/grad_norm", "victim/clean_accuracy"}
    assert all(np.isfinite(v) for v in metrics.values()), metrics
    assert float(metrics["meta/grad_norm"]) > 0
    image = jax.jit(poison.apply)(state, batch)["image"]
    delta = image - batch["image"]
    assert float(jnp.max(jnp.abs(delta))) <= 0.3 + 1e-6
    assert float(jnp.min(image)) >= 0.0 and float(jnp.max(image)) <= 1.0


def test_algorithms_1_and_2_compute_the_same_updates(updated):
    """Both replay the trajectory of the frozen generator; they differ only in memory."""
    out, _ = updated
    a1, a2 = out["algorithm1"][1].params, out["algorithm2"][1].params
    for x, y in zip(jax.tree.leaves(a1), jax.tree.leaves(a2), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def batchnorm_updated():
    """One trial of every method with the BatchNorm generator (SGD 0.1 on ξ, so it moves)."""
    batch = _data(T * B, np.float32)
    out = {}
    with logic_only():
        for method in l2c.METHODS:
            kwargs = _kwargs(
                generator=TinyBatchGenerator(),
                method=method,
                meta_optimizer=dict(name="sgd", learning_rate=0.1),
            )
            poison = l2c.l2c(**kwargs)
            start = jax.jit(poison.init)(jax.random.key(0), batch)
            state, _ = jax.jit(poison.update)(start, batch, jax.random.key(1))
            out[method] = (poison, start, state)
        problem = l2c.meta_problem(**_kwargs(generator=TinyBatchGenerator()))

        @jax.jit
        def by_hand(start, batch, key):
            """The running averages after training-mode passes of ξ (as the trial starts) over
            the trial's inner batches, and the victim trained on ξ's noise with either
            statistics (the update's own key schedule: victim, split and steps folded from its
            key)."""
            victim0 = problem.victim_init(jax.random.fold_in(key, 0), jnp.float32)
            inner, _ = problem.split(batch, jax.random.fold_in(key, 1))
            keys = jax.random.split(jax.random.fold_in(key, 2), T)
            stats, victims = start.stats, {}
            for t in range(T):
                stats = problem.generate(start.params, inner["image"][t], stats)[1]
            for train in (False, True):
                vstate = victim0
                for t in range(T):
                    x = inner["image"][t]
                    noise = problem.generate(start.params, x, start.stats, train=train)[0]
                    b = {"image": x + noise, "label": inner["label"][t]}
                    vstate = problem.inner_step(vstate, b, keys[t])[0]
                victims[train] = vstate.params
            return stats, victims

        out["by_hand"] = by_hand(out["exact"][1], batch, jax.random.key(1))
    return out, batch


def test_batchnorm_generator_crafting_keeps_running_averages(batchnorm_updated):
    """The exact method leaves the running averages of T training-mode passes of ξ over the
    trial's inner batches; in Algorithm 2 the victim trains on the frozen copy's noise from the
    running averages (evaluation mode, as the released code's atkmodel.eval()), not from batch
    statistics; Algorithms 1 and 2 still compute the same generator and statistics."""
    out, _ = batchnorm_updated
    stats, victims = out["by_hand"]
    start, exact = out["exact"][1:]
    chex.assert_trees_all_close(exact.stats, stats, rtol=1e-5, atol=1e-6)
    gap = lambda a, b: max(
        jax.tree.leaves(jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a, b))
    )
    assert gap(exact.stats, start.stats) > 1e-3
    chex.assert_trees_all_close(out["algorithm2"][2].victim.params, victims[False], atol=1e-6)
    assert gap(victims[True], victims[False]) > 1e-4
    a1, a2 = out["algorithm1"][2], out["algorithm2"][2]
    for x, y in zip(
        jax.tree.leaves((a1.params, a1.stats)), jax.tree.leaves((a2.params, a2.stats)), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert gap(a2.params, start.params) > 1e-6 and gap(a2.stats, start.stats) > 1e-3


@pytest.mark.parametrize("method", l2c.METHODS)
def test_batchnorm_poison_is_per_image_and_bounded(batchnorm_updated, method):
    out, batch = batchnorm_updated
    poison, _, state = out[method]
    apply = jax.jit(poison.apply)
    with logic_only():
        poisoned, first = apply(state, batch), apply(state, {k: v[:3] for k, v in batch.items()})
    np.testing.assert_allclose(poisoned["image"][:3], first["image"], atol=1e-6)
    np.testing.assert_array_equal(poisoned["label"], batch["label"])
    delta = poisoned["image"] - batch["image"]
    assert 0.05 < float(jnp.max(jnp.abs(delta))) <= 0.3 + 1e-6
    assert float(jnp.min(poisoned["image"])) >= 0.0 and float(jnp.max(poisoned["image"])) <= 1.0


class ImagesOnly(nn.Module):
    """A user's generator of the images alone, no `train` argument (as docs/guide.md's)."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), x.shape[1:])
        return generators.bound_output(jnp.broadcast_to(w, x.shape), epsilon=0.3, norm="linf")


@pytest.mark.parametrize("generator", [ImagesOnly(), TinyBatchGenerator()], ids=["own", "bn"])
def test_perturbations_are_the_noise_apply_adds(generator):
    data = _data(T * B, np.float32)
    poison = l2c.l2c(**_kwargs(generator=generator, method="algorithm2"))
    with logic_only():
        state = poison.init(jax.random.key(0), data)
        state, _ = jax.jit(poison.update)(state, data, jax.random.key(1))
        delta = poison.apply(state, data)["image"] - data["image"]
        noise = l2c.perturbations(
            state, np.asarray(data["image"]), generator=generator, threat=LpBall(0.3)
        )
    assert float(jnp.max(jnp.abs(delta))) > 0.0
    np.testing.assert_allclose(noise, delta, atol=1e-6)


def test_batchnorm_crafting_resumes_to_the_same_state(tmp_path):
    """A craft killed after its first epoch resumes, through its orbax checkpoint, to the state
    of an uninterrupted one: running averages and the frozen copy's included."""
    data = _data(2 * T * B, np.float32)
    x, y = np.asarray(data["image"]), np.asarray(data["label"])

    def make(num_epochs):
        kwargs = _kwargs(
            generator=TinyBatchGenerator(),
            method="algorithm2",
            victim_reset_every=2,
            refresh_every=2,
            meta_optimizer=dict(name="adam", learning_rate=1e-2),
            num_epochs=num_epochs,
        )
        return l2c.l2c(**kwargs)

    def craft(poison, **kwargs):
        key = jax.random.key(0)
        return poisons.craft(poison, x, y, key=key, batch_size=T * B, progress=False, **kwargs)

    poison = make(3)
    with logic_only():
        whole, whole_history = craft(poison)
        craft(make(1), ckpt_dir=tmp_path / "one")
        resumed, history = craft(poison, ckpt_dir=tmp_path / "one")
        # A longer craft continues a finished shorter one kept elsewhere (start_from): L2C's
        # epochs do not depend on num_epochs. Its own checkpoints win once it has any.
        assert poison.extendable
        craft(make(2), ckpt_dir=tmp_path / "two")
        continued, continued_history = craft(
            poison, ckpt_dir=tmp_path / "three", start_from=tmp_path / "two"
        )
        again, _ = craft(poison, ckpt_dir=tmp_path / "three", start_from=tmp_path / "one")
    assert len(history["meta/objective"]) == 3
    assert whole.stats is not None and whole.frozen_stats is not None
    jax.tree.map(np.testing.assert_array_equal, whole, resumed)
    jax.tree.map(np.testing.assert_array_equal, whole, continued)
    jax.tree.map(np.testing.assert_array_equal, whole, again)
    assert continued_history == whole_history
    assert [p.name for p in (tmp_path / "three").iterdir() if p.name.isdigit()] == ["3"]


def test_start_from_is_refused_where_it_cannot_be_the_start(tmp_path):
    """A poison whose epochs depend on num_epochs, a directory without checkpoints, and a craft
    longer than this one are each refused in one line."""
    data = _data(T * B, np.float32)
    x, y = np.asarray(data["image"]), np.asarray(data["label"])
    kwargs = dict(key=jax.random.key(0), batch_size=T * B, progress=False)
    em = poisons.make(
        "error_minimizing", threat=LpBall(0.3), num_classes=K, image_shape=x.shape[1:]
    )
    short = l2c.l2c(**_kwargs(method="algorithm2", num_epochs=1))
    with logic_only():
        poisons.craft(
            l2c.l2c(**_kwargs(method="algorithm2", num_epochs=2)),
            x,
            y,
            ckpt_dir=tmp_path / "two",
            **kwargs,
        )
        for poison, start, match in (
            (em, tmp_path / "two", "only for extendable poisons"),
            (short, tmp_path / "none", "holds no crafting checkpoint"),
            (short, tmp_path / "two", "holds 2 epochs, more than this craft's 1"),
        ):
            with pytest.raises(ValueError, match=match) as error:
                poisons.craft(poison, x, y, start_from=start, **kwargs)
            assert "\n" not in str(error.value)


def test_a_longer_craft_finds_the_finished_shorter_one_in_its_workdir(tmp_path):
    """`trainers.poisoning.shorter_craft`: of the finished crafts in the workdir, the longest
    one shorter than this craft whose record differs only in num_epochs and whose last
    checkpoint is kept."""
    from jaxpoison.trainers.poisoning import shorter_craft
    from jaxpoison.workdir import canonical, content_key, keyed_dir

    def record(epochs, lr=0.1):
        return {"kind": "poison", "name": "l2c", "kwargs": {"num_epochs": epochs, "lr": lr}}

    def finished(rec, keep_last=True):
        key = content_key(rec)
        artifact = tmp_path / "poison" / "l2c" / key[:16]
        artifact.mkdir(parents=True)
        (artifact / "metadata.json").write_text(json.dumps({"record": canonical(rec)}))
        ckpt = keyed_dir(tmp_path / "checkpoints" / "craft_l2c", rec)
        (ckpt / str(rec["kwargs"]["num_epochs"] - (0 if keep_last else 1))).mkdir(parents=True)
        return ckpt

    assert shorter_craft(tmp_path, "l2c", record(8)) is None  # nothing crafted yet
    finished(record(2))
    four = finished(record(4))
    finished(record(6, lr=0.2))  # another spec
    finished(record(7), keep_last=False)  # its last checkpoint is gone
    finished(record(16))  # longer
    (tmp_path / "poison" / "l2c" / "damaged").mkdir()
    (tmp_path / "poison" / "l2c" / "damaged" / "metadata.json").write_text("{")
    assert shorter_craft(tmp_path, "l2c", record(8)) == four
    assert shorter_craft(tmp_path, "l2c", record(2)) is None


def test_shorter_craft_passes_over_a_spec_without_num_epochs(tmp_path):
    """A spec that leaves num_epochs at the factory's default has none in its record: such a
    finished craft, or such a craft asked for, is no start (crafted afresh), not a KeyError or a
    TypeError that stops the run."""
    from jaxpoison.trainers.poisoning import shorter_craft
    from jaxpoison.workdir import canonical, content_key, keyed_dir

    def record(**epochs):
        return {"kind": "poison", "name": "l2c", "kwargs": {"lr": 0.1, **epochs}}

    def finished(rec, last):
        artifact = tmp_path / "poison" / "l2c" / content_key(rec)[:16]
        artifact.mkdir(parents=True)
        (artifact / "metadata.json").write_text(json.dumps({"record": canonical(rec)}))
        (keyed_dir(tmp_path / "checkpoints" / "craft_l2c", rec) / str(last)).mkdir(parents=True)

    finished(record(), 1)  # the default: one epoch
    assert shorter_craft(tmp_path, "l2c", record(num_epochs=3)) is None
    finished(record(num_epochs=2), 2)
    assert shorter_craft(tmp_path, "l2c", record()) is None


def test_label_specific_objective_targets_next_class():
    problem = l2c.meta_problem(**_kwargs(label_specific=True))

    @jax.jit
    def both(batch):
        state = problem.victim_init(jax.random.key(0))
        logits = problem.victim_module.apply({"params": state.params}, batch["image"])
        expected = jnp.mean(losses.cross_entropy(logits, (batch["label"] + 1) % K))
        return problem.outer_objective(state, batch), expected

    np.testing.assert_allclose(*both(_data(B, np.float32)), rtol=1e-6)


def test_registry_and_noise_accuracy():
    assert poisons.POISONS["l2c"] is l2c.l2c
    # A classifier that reads the class off the sign of the noise is perfect on that noise.
    labels = np.array([0, 1, 0, 1])
    noise = np.where(labels[:, None, None, None] == 1, 0.1, -0.1) * np.ones((4, *SHAPE))

    def apply_fn(variables, x, *, train):
        m = jnp.mean(x, axis=(1, 2, 3))
        return jnp.stack([-m, m], -1), variables

    assert l2c.noise_accuracy(apply_fn, {}, noise, labels) == 1.0


def test_noise_accuracy_with_batch_statistics_reads_batchnorm_as_the_released_code():
    """A BatchNorm classifier whose running averages (mean 0, variance 1) miss an offset of 5
    on the first feature predicts class 0 for every noise image in evaluation mode (1/3 right);
    normalised by the batch's own statistics it reads every label. A classifier without
    BatchNorm reads the same either way, and noise_diagnostic's batch-statistics reading skips
    it."""
    from jaxpoison import models
    from jaxpoison.trainers import l2c_victims

    class Identity(nn.Module):
        normalize: bool

        @nn.compact
        def __call__(self, x, train=False):
            eye = lambda key, shape, dtype=jnp.float32: jnp.eye(3, dtype=dtype)
            h = nn.Dense(3, use_bias=False, kernel_init=eye)(x)
            if self.normalize:
                h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
            return h

    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(3), 10))
    noise = np.eye(3, dtype=np.float32)[labels] + np.array([5.0, 0.0, 0.0], np.float32)
    classifiers = {}
    for normalize in (True, False):
        module = Identity(normalize)
        variables = dict(module.init(jax.random.key(0), noise[:1]))
        classifiers[normalize] = (models.make_apply_fn(module), variables)
    bn_fn, bn_vars = classifiers[True]
    assert l2c.noise_accuracy(bn_fn, bn_vars, noise, labels, batch_size=30) == pytest.approx(1 / 3)
    assert (
        l2c.noise_accuracy(bn_fn, bn_vars, noise, labels, batch_size=30, batch_statistics=True)
        == 1.0
    )
    plain = [
        l2c.noise_accuracy(*classifiers[False], noise, labels, batch_statistics=b)
        for b in (False, True)
    ]
    assert plain == [pytest.approx(1 / 3)] * 2
    read = l2c_victims.noise_diagnostic(classifiers, noise, labels, batch_statistics=True)
    assert read == {True: 1.0}


def test_noise_accuracy_with_batch_statistics_refuses_dropout_in_one_line():
    """Training mode would draw dropout masks, for which the batch-statistics reading has no
    key: one ValueError line naming the fix, not flax's error; the default reading works."""
    from jaxpoison import models

    class WithDropout(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x))
            return nn.Dropout(0.5, deterministic=not train)(h)

    noise, labels = np.zeros((6, 3), np.float32), np.zeros(6, np.int32)
    module = WithDropout()
    apply_fn = models.make_apply_fn(module)
    variables = dict(module.init(jax.random.key(0), noise[:1]))
    assert 0.0 <= l2c.noise_accuracy(apply_fn, variables, noise, labels) <= 1.0
    with pytest.raises(ValueError) as error:
        l2c.noise_accuracy(apply_fn, variables, noise, labels, batch_statistics=True)
    message = str(error.value)
    assert "\n" not in message and "dropout" in message and "batch_statistics=False" in message


def test_noise_structure_tells_class_wise_from_label_free_noise():
    """Class-wise noise: all its variance between classes, read perfectly by the nearest class
    mean; noise independent of the label: a share near K/N and chance accuracy; noise that is
    minus the image correlates -1 with it."""
    from jaxpoison.trainers.l2c_victims import noise_structure

    rng = np.random.default_rng(0)
    k, n, m = 4, 400, 200
    y_train, y_test = rng.integers(0, k, n), rng.integers(0, k, m)
    patterns = rng.uniform(-0.3, 0.3, (k, *SHAPE))
    images = rng.uniform(0.0, 1.0, (n, *SHAPE))
    classwise = noise_structure(patterns[y_train], y_train, patterns[y_test], y_test, images=images)
    assert classwise["between_class_share"] == pytest.approx(1.0, abs=1e-5)
    assert classwise["nearest_class_mean_accuracy"] == 1.0
    assert abs(classwise["image_correlation"]) < 0.1
    free = noise_structure(
        rng.uniform(-0.3, 0.3, (n, *SHAPE)),
        y_train,
        rng.uniform(-0.3, 0.3, (m, *SHAPE)),
        y_test,
        images=images,
        num_classes=k,
    )
    assert free["between_class_share"] < 3 * k / n
    assert free["nearest_class_mean_accuracy"] < 0.4
    erase = noise_structure(-0.3 * images, y_train, patterns[y_test], y_test, images=images)
    assert erase["image_correlation"] == pytest.approx(-1.0, abs=1e-5)
    assert erase["mean_abs"] == pytest.approx(0.3 * np.mean(images), rel=1e-5)


def test_l2c_victims_reads_batchnorm_victims_of_a_run(tmp_path):
    """configs/l2c_mnist.py:released_victim,tiny end to end on random 16x16 images (clean and
    poisoned victims: the BatchNorm cnn_mnist), then `evaluate_workdir`: both victims are read
    on their running averages and on each noise batch's statistics, every number in [0, 1].
    The crafting victim is a small MLP and the method Algorithm 2, which compile fastest."""
    import math

    from jaxpoison import trainers
    from jaxpoison.trainers import l2c_victims

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 16, 16, 1), dtype=np.uint8)
    y = np.arange(120) % 10
    np.savez(tmp_path / "mnist.npz", x_train=x[:80], y_train=y[:80], x_test=x[80:], y_test=y[80:])
    path = Path(__file__).resolve().parents[1] / "configs" / "l2c_mnist.py"
    loader = importlib.util.spec_from_file_location("l2c_mnist_config", path)
    l2c_mnist = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(l2c_mnist)
    config = l2c_mnist.get_config("released_victim,tiny")
    config.data.update(source="npz", data_dir=str(tmp_path), num_train=80, num_test=40)
    config.victim.update(epochs=1, num_seeds=1, batch_size=20, eval_batch_size=40)
    config.poisons.l2c.update(method="algorithm2", batch_size=20, outer_batch_size=20)
    config.poisons.l2c.victim = dict(name="mlp", width=0.125)
    assert config.victim.model.normalization == "batch"
    with logic_only():
        results = trainers.train_and_evaluate(config, tmp_path / "run", progress=False)
        out = l2c_victims.evaluate_workdir(tmp_path / "run", max_train=40, victims=())
    assert set(results["summary"]) == {"clean", "l2c"}
    for key in ("noise_only_test_accuracy", "noise_only_test_accuracy_batch_statistics"):
        assert set(out[key]) == {"victim_clean", "victim_l2c"}, key
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in out[key].values()), out[key]
    assert (
        math.isfinite(out["noise_structure"]["mean_abs"]) and out["noise_structure"]["mean_abs"] > 0
    )
    # A longer craft in the same workdir (its results.json moved away) continues the finished
    # one from its last checkpoint instead of crafting from the start.
    run = tmp_path / "run"
    (run / "results.json").rename(tmp_path / "results_short.json")
    done = config.poisons.l2c.num_epochs
    config.poisons.l2c.num_epochs = done + 1
    with logic_only():
        longer = trainers.train_and_evaluate(config, run, progress=False)
    assert f"craft l2c: continues the {done}-epoch craft of " in (run / "log.txt").read_text()
    assert longer["poisons"]["l2c"]["key"] != results["poisons"]["l2c"]["key"]
    new = run / "checkpoints" / "craft_l2c" / longer["poisons"]["l2c"]["key"][:16]
    assert [p.name for p in new.iterdir() if p.name.isdigit()] == [str(done + 1)]


@pytest.mark.slow  # 2 minutes: the U-Net generator's meta-step compiles
def test_l2c_victims_of_a_transfer_run(tmp_path):
    """The CIFAR-10 config's transfer study end to end on the embedded subset, then the
    scikit-learn victims and the noise diagnostic for every architecture's victims."""
    import importlib.util
    from pathlib import Path

    from jaxpoison import trainers
    from jaxpoison.trainers import l2c_victims

    path = Path(__file__).resolve().parents[1] / "configs" / "l2c_cifar10.py"
    spec = importlib.util.spec_from_file_location("l2c_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("transfer,tiny")
    config.select.victims = ("mlp",)
    config.data.source = "embedded"
    config.victim.update(epochs=1, num_seeds=1)
    # Compiled with XLA's optimizations: under `logic_only` (jax_disable_most_optimizations)
    # the U-Net's gradient is NaN once its weights have moved by one Adam step. The gradient of
    # `ops.max_pool` (jnp.max: cotangent x (x == max) / count) divides 0 by 0 there: unoptimized,
    # XLA computes the normalized activations twice with different rounding, so no element of
    # the window equals the max. Optimized (one copy) and op by op the gradient is finite.
    results = trainers.train_and_evaluate(config, tmp_path, progress=False)
    out = l2c_victims.evaluate_workdir(tmp_path, max_train=100, victims=("random_forest",))
    assert set(results["summary"]) == {"mlp/clean", "mlp/l2c"}
    # The transfer table names the architecture that crafted the poison: L2C's own victim.
    assert results["transfer"]["crafted_with"]["l2c"] == config.poisons.l2c.victim.name
    assert out["num_train"] == 100 and set(out["sklearn"]) == {"clean", "l2c"}
    assert 0.0 <= out["sklearn"]["l2c"]["random_forest"]["test_accuracy"] <= 1.0
    noise = out["noise_only_test_accuracy"]
    assert set(noise) == {"mlp_clean", "mlp_l2c"}
    assert all(0.0 <= v <= 1.0 for v in noise.values())
    assert (tmp_path / "l2c_victims.json").is_file()
