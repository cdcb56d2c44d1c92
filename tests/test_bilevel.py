"""jaxpoison.bilevel: every hypergradient kind against central finite differences (float64),
truncation and remat against a Python-loop unroll, unrolled against implicit differentiation on
a strongly convex inner problem, the docs' examples (the data-weighting one's meaning too: its
hypergradient turns flipped labels' weights down, over several streams and initialisations),
and the errors.

The problems are tiny dense models (no convolutions), so compile time stays small on CPU.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxpoison import bilevel
from jaxpoison.threat import LpBall

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fast_compiles")


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), re.M | re.S)


def directional(f, x, grads, *, key, h=1e-5):
    """(central finite difference of f along a random unit direction v, <grads, v>).

    f runs once, vmapped over the two points x ± h·v (one forward program to compile).
    """
    flat, unravel = jax.flatten_util.ravel_pytree(x)
    v = jax.random.normal(key, flat.shape, flat.dtype)
    v = v / jnp.linalg.norm(v)
    values = jax.vmap(lambda z: f(unravel(z)))(jnp.stack([flat + h * v, flat - h * v]))
    return (values[0] - values[1]) / (2 * h), jnp.dot(jax.flatten_util.ravel_pytree(grads)[0], v)


def assert_fd(pair, rtol=1e-6):
    fd, analytic = (float(a) for a in pair)
    assert abs(analytic) > 1e-6, "a vanishing gradient checks nothing"
    assert abs(fd - analytic) <= rtol * max(1.0, abs(analytic)), (fd, analytic)


@pytest.fixture(scope="module")
def docs64():
    """docs/bilevel.md's blocks run in float64, with each example's gradient against FD."""
    with jax.enable_x64(True):
        ns = {"__name__": "bilevel_docs"}
        for i, block in enumerate(python_blocks(REPO / "docs" / "bilevel.md")):
            exec(compile(block, f"docs/bilevel.md, python block {i + 1}", "exec"), ns)
        assert ns["images"].dtype == jnp.float64

        @jax.jit
        def checks():  # forward runs only: the gradients are the docs' own
            keys = jax.random.split(jax.random.key(7), 4)
            lr_objective, hyper, hyper_grads = ns["lr_objective"], ns["hyper"], ns["hyper_grads"]
            return {
                "generator": directional(
                    ns["l2c_objective"], ns["gen_params"], ns["gen_grads"], key=keys[0]
                ),
                "delta_table": directional(
                    ns["table_objective"], ns["delta_table"], ns["table_grads"], key=keys[1]
                ),
                **{
                    name: directional(
                        lambda x, name=name: lr_objective(dict(hyper, **{name: x})),
                        hyper[name],
                        hyper_grads[name],
                        key=keys[2],
                    )
                    for name in ("learning_rate", "weight_decay")
                },
                "implicit": directional(
                    ns["implicit_objective"], ns["phi"], ns["implicit_grads"], key=keys[3]
                ),
                "weights": directional(
                    ns["weighting_objective"],
                    ns["weights"],
                    ns["weight_grads"],
                    key=jax.random.key(8),
                ),
                "held_out_loss": jax.vmap(ns["weighting_objective"])(
                    jnp.stack([ns["weights"], ns["learned"]])
                ),
            }

        out = jax.device_get(checks())
        out["implicit_grads"], out["unrolled_grads"] = ns["implicit_grads"], ns["unrolled_grads"]
        out["reweighting"] = _reweighting_over_seeds(ns, seeds=4)
        for name in ("weight_grads", "learned", "flipped"):
            out[name] = np.asarray(ns[name])
        return out


def _reweighting_over_seeds(ns, *, seeds):
    """Example 5's problem over other streams and initial victims (seeds 0..seeds-1): the
    hypergradient at all-ones weights and the weights after five steps of the docs' descent."""

    def one(seed):
        stream = bilevel.batches(
            ns["noisy_train"],
            num_steps=24,
            batch_size=16,
            key=jax.random.fold_in(jax.random.key(100), seed),
        )
        victim = ns["init"](ns["victim"], jax.random.fold_in(jax.random.key(200), seed))
        state = bilevel.init_inner(victim, ns["slow_sgd"])

        def objective(weights):
            final, _ = bilevel.unroll(ns["weighted_step"], weights, state, stream)
            return ns["cross_entropy"](final.params, ns["clean_held_out"])

        descend = lambda _, w: jnp.clip(w - 10.0 * jax.grad(objective)(w), 0.0, 1.0)
        learned = jax.lax.fori_loop(0, 5, descend, ns["weights"])
        return jax.grad(objective)(ns["weights"]), learned

    grads, learned = jax.jit(jax.vmap(one))(jnp.arange(seeds))
    return np.asarray(grads), np.asarray(learned)


@pytest.mark.parametrize(
    "kind", ["generator", "delta_table", "learning_rate", "weight_decay", "weights"]
)
def test_docs_unrolled_hypergradients_match_finite_differences(docs64, kind):
    assert_fd(docs64[kind])


def test_docs_implicit_gradient_matches_finite_differences_and_unrolled(docs64):
    assert_fd(docs64["implicit"])
    _close(docs64["implicit_grads"], docs64["unrolled_grads"], atol=1e-9)


def test_docs_data_weighting_turns_flipped_labels_down(docs64):
    """Example 5's claim, measured: the held-out loss's hypergradient is positive on the
    flipped-label examples and below the clean ones', and descent on the weights lowers the
    flipped ones below the clean ones and the held-out loss with them (float64)."""
    flipped = docs64["flipped"]
    grads, learned = docs64["weight_grads"], docs64["learned"]
    assert grads[flipped].mean() > 0.01 and grads[~flipped].mean() < -0.005
    assert (grads[flipped] > 0).sum() >= 9 and (grads[~flipped] < 0).sum() >= 30  # of 12, 36
    assert learned[flipped].mean() < 0.4 and learned[~flipped].mean() > 0.85
    before, after = docs64["held_out_loss"]
    assert after < 0.5 * before
    # Not one lucky stream: four other streams and initialisations, the same direction.
    grads, learned = docs64["reweighting"]
    assert grads.shape == learned.shape == (4, 48)
    for g, w in zip(grads, learned, strict=True):
        assert g[flipped].mean() > max(0.0, g[~flipped].mean() + 0.01), g
        assert w[flipped].mean() < w[~flipped].mean() - 0.3, w


# A tiny problem of our own: a linear model on 4x4x1 images, 3 classes, a per-example δ table,
# the learning rate and the weight decay as φ, SGD with momentum, T = 5 (remat segments of
# round(√5) = 2: 2, 2 and a remainder of 1).
N, T, BATCH, SHAPE = 12, 5, 4, (4, 4, 1)


def _problem(dtype):
    rng = np.random.default_rng(0)
    train = {
        "image": jnp.asarray(rng.uniform(0, 1, (N, *SHAPE)), dtype),
        "label": jnp.asarray(rng.integers(0, 3, N), jnp.int32),
    }
    held_out = {"image": jnp.asarray(rng.uniform(0, 1, (6, *SHAPE)), dtype)}
    held_out["label"] = jnp.asarray(rng.integers(0, 3, 6), jnp.int32)

    def ce(w, batch):
        logits = jnp.tanh(batch["image"].reshape(len(batch["label"]), -1) @ w["a"]) @ w["b"]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))

    def loss_fn(w, hyper, batch, key):
        noise = 1e-3 * jax.random.normal(key, batch["image"].shape, dtype)
        perturbed = bilevel.perturb(hyper["delta"], batch)
        return ce(w, dict(perturbed, image=perturbed["image"] + noise))

    def make_tx(hyper):
        return optax.chain(
            optax.add_decayed_weights(hyper["weight_decay"]),
            optax.sgd(hyper["learning_rate"], momentum=0.9),
        )

    hyper = {
        "delta": jnp.asarray(0.1 * rng.normal(size=(N, *SHAPE)), dtype),
        "learning_rate": jnp.asarray(0.5, dtype),
        "weight_decay": jnp.asarray(0.05, dtype),
    }
    w0 = {
        "a": jnp.asarray(rng.normal(size=(16, 5)), dtype),
        "b": jnp.asarray(rng.normal(size=(5, 3)), dtype),
    }
    stream = bilevel.batches(train, num_steps=T, batch_size=BATCH, key=jax.random.key(1))
    keys = jax.random.split(jax.random.key(2), T)
    return dict(
        ce=ce,
        loss_fn=loss_fn,
        make_tx=make_tx,
        hyper=hyper,
        state0=bilevel.init_inner(w0, make_tx, hyper),
        stream=stream,
        keys=keys,
        held_out=held_out,
    )


def _loop_objective(p, hyper, head=0):
    """The same run as a Python loop with hand-written SGD + momentum + coupled weight decay."""
    w = p["state0"].params
    velocity = jax.tree.map(jnp.zeros_like, w)
    for t in range(T):
        h = jax.lax.stop_gradient(hyper) if t < head else hyper
        batch = jax.tree.map(lambda a, t=t: a[t], p["stream"])
        grads = jax.grad(p["loss_fn"])(w, h, batch, p["keys"][t])
        grads = jax.tree.map(lambda g, x, h=h: g + h["weight_decay"] * x, grads, w)
        velocity = jax.tree.map(lambda v, g: 0.9 * v + g, velocity, grads)
        w = jax.tree.map(lambda x, v, h=h: x - h["learning_rate"] * v, w, velocity)
        if t < head:
            w, velocity = jax.lax.stop_gradient((w, velocity))
    return p["ce"](w, p["held_out"])


@pytest.fixture(scope="module")
def own64():
    with jax.enable_x64(True):
        p = _problem(jnp.float64)
        step = bilevel.optax_step(p["loss_fn"], p["make_tx"])

        def objective(**kwargs):
            def f(hyper):
                final, aux = bilevel.unroll(
                    step, hyper, p["state0"], p["stream"], p["keys"], **kwargs
                )
                return p["ce"](final.params, p["held_out"]), aux["loss"]

            return f

        @jax.jit
        def compute():
            variants = {
                "remat": {},
                "K=T": dict(truncation=T),
                "K=2": dict(truncation=2),
            }
            out = {
                name: jax.value_and_grad(objective(**kw), has_aux=True)(p["hyper"])
                for name, kw in variants.items()
            }
            out["loop"] = jax.value_and_grad(lambda h: _loop_objective(p, h))(p["hyper"])
            out["loop_K=2"] = jax.grad(lambda h: _loop_objective(p, h, head=T - 2))(p["hyper"])
            return out

        return jax.device_get(compute())


def _close(a, b, atol=1e-11):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == np.float64
        np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_unroll_equals_python_loop(own64):
    """δ table, learning rate and weight decay at once, through SGD with momentum, coupled
    weight decay and per-step keys, against hand-written updates (no optax, no scan)."""
    out = own64
    (value, _), grads = out["remat"]
    loop_value, loop_grads = out["loop"]
    np.testing.assert_allclose(value, loop_value, rtol=0, atol=1e-12)
    _close(grads, loop_grads)
    # T = 5 in remat segments of round(√5) = 2: 2, 2 and a remainder of 1. (Without remat,
    # with one level of it and with K = 1, a step without a loop: tests/test_l2c.py, through
    # the same `bilevel.unroll`.)
    assert all(np.abs(g).max() > 1e-6 for g in jax.tree.leaves(grads))


def test_truncation(own64):
    out = own64
    _close(out["K=T"][1], out["remat"][1], atol=0)  # K = T is the full unroll
    _close(out["K=2"][1], out["loop_K=2"])
    # The inner losses of every step are reported whatever K is.
    np.testing.assert_array_equal(out["K=2"][0][1], out["remat"][0][1])
    assert out["K=2"][0][1].shape == (T,)
    # Truncation changes the answer here (the gradient of the first steps is not negligible).
    assert np.abs(out["K=2"][1]["delta"] - out["remat"][1]["delta"]).max() > 1e-6


def test_delta_table_gradient_only_on_drawn_rows():
    data = {"image": jnp.ones((10, *SHAPE)), "label": jnp.zeros(10, jnp.int32)}
    stream = bilevel.batches(data, num_steps=2, batch_size=3, key=jax.random.key(0))
    drawn = set(np.asarray(stream["index"]).ravel().tolist())

    @jax.jit
    @jax.grad
    def grad_of(table):
        per_step = jax.vmap(lambda batch: jnp.sum(bilevel.perturb(table, batch)["image"]))
        return jnp.sum(per_step(stream))

    rows = np.abs(np.asarray(grad_of(jnp.zeros((10, *SHAPE))))).sum(axis=(1, 2, 3))
    assert set(np.flatnonzero(rows).tolist()) == drawn and len(drawn) == 6


def test_batches_walk_epochs_and_carry_dataset_indices():
    data = {"image": jnp.arange(6.0)[:, None], "label": jnp.arange(6), "index": 100 + jnp.arange(6)}
    stream = bilevel.batches(data, num_steps=4, batch_size=3, key=jax.random.key(0))
    assert stream["image"].shape == (4, 3, 1) and stream["index"].shape == (4, 3)
    index = np.asarray(stream["index"])
    np.testing.assert_array_equal(index, 100 + np.asarray(stream["label"]))
    assert sorted(index[:2].ravel()) == list(range(100, 106))  # an epoch, every example once
    assert sorted(index[2:].ravel()) == list(range(100, 106))
    again = bilevel.batches(data, num_steps=4, batch_size=3, key=jax.random.key(0))
    np.testing.assert_array_equal(again["index"], index)


@pytest.mark.parametrize("norm,epsilon", [("linf", 0.1), ("l2", 0.5)])
def test_perturb_projects_rows_into_the_ball_and_box(norm, epsilon):
    threat = LpBall(epsilon, norm=norm)
    x = jax.random.uniform(jax.random.key(0), (5, 4, 4, 3))
    batch = {"image": x, "label": jnp.zeros(5, jnp.int32), "index": jnp.array([4, 0, 2, 2, 7])}
    table = 3.0 * jax.random.normal(jax.random.key(1), (8, 4, 4, 3))
    image = bilevel.perturb(table, batch, threat=threat)["image"]
    assert float(jnp.max(threat.norm_of(image - x))) <= epsilon * (1 + 1e-6)
    assert float(jnp.min(image)) >= 0.0 and float(jnp.max(image)) <= 1.0
    raw = bilevel.perturb(table, batch)["image"]
    np.testing.assert_allclose(raw, x + table[batch["index"]])


def test_implicit_ridge_matches_closed_form_and_damping_changes_it():
    """Ridge regression: w*(λ, δ) = (XᵀX/n + λI)⁻¹ Xᵀy/n in closed form, differentiable by
    `jnp.linalg.solve`; the implicit gradient of a converged GD solver equals it."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.normal(size=(20, 5)))
        y = jnp.asarray(rng.normal(size=20))
        x_val, y_val = jnp.asarray(rng.normal(size=(8, 5))), jnp.asarray(rng.normal(size=8))

        def inner(w, hyper, x, y):
            r = (x + hyper["delta"]) @ w - y
            return 0.5 * jnp.mean(r**2) + 0.5 * hyper["wd"] * jnp.sum(w**2)

        gd = optax.sgd(0.5)
        step = bilevel.optax_step(lambda w, h, b, key: inner(w, h, b["x"], b["y"]), gd)

        def solver(hyper, w0, x, y):
            # 80 steps: the error contracts by 0.5 or less per step (H's eigenvalues in 1..3).
            steps = {"x": jnp.broadcast_to(x, (80, *x.shape)), "y": jnp.broadcast_to(y, (80, 20))}
            return bilevel.unroll(step, hyper, bilevel.init_inner(w0, gd), steps)[0].params

        def closed(hyper, x, y):
            xd = x + hyper["delta"]
            a = xd.T @ xd / len(y) + hyper["wd"] * jnp.eye(5)
            return jnp.linalg.solve(a, xd.T @ y / len(y))

        outer = lambda w: jnp.mean((x_val @ w - y_val) ** 2)
        hyper = {"wd": jnp.asarray(0.7), "delta": jnp.asarray(0.1 * rng.normal(size=(20, 5)))}
        w0 = jnp.zeros(5)

        @jax.jit
        def grads():
            exact = bilevel.implicit_argmin(solver, inner)
            damped = bilevel.implicit_argmin(solver, inner, damping=1.0)
            return (
                jax.grad(lambda h: outer(exact(h, w0, x, y)))(hyper),
                jax.grad(lambda h: outer(closed(h, x, y)))(hyper),
                jax.grad(lambda h: outer(solver(h, w0, x, y)))(hyper),
                jax.grad(lambda h: outer(damped(h, w0, x, y)))(hyper),
                jax.grad(lambda y: outer(exact(hyper, w0, x, y)))(y),  # w.r.t. data args too
                jax.grad(lambda y: outer(closed(hyper, x, y)))(y),
            )

        implicit, closed_form, unrolled, damped, implicit_y, closed_y = jax.device_get(grads())
    _close(implicit, closed_form, atol=1e-10)
    _close(unrolled, closed_form, atol=1e-10)
    np.testing.assert_allclose(implicit_y, closed_y, rtol=0, atol=1e-10)
    assert abs(float(damped["wd"]) - float(closed_form["wd"])) > 1e-3


def test_bad_inputs_raise_one_clear_error():
    step = lambda h, s, b, k: (s, 0.0)
    stream = {"image": jnp.zeros((3, 2, 1))}
    with pytest.raises(ValueError, match="stream is empty"):
        bilevel.unroll(step, 0.0, 0.0, {"image": jnp.zeros((0, 2, 1))})
    with pytest.raises(ValueError, match="stream is empty"):
        bilevel.unroll(step, 0.0, 0.0, {})
    with pytest.raises(ValueError, match="disagree on the number of steps"):
        bilevel.unroll(step, 0.0, 0.0, {"image": jnp.zeros((3, 2)), "label": jnp.zeros(4)})
    with pytest.raises(ValueError, match="2 keys for a stream of T=3"):
        bilevel.unroll(step, 0.0, 0.0, stream, jax.random.split(jax.random.key(0), 2))
    for k in (0, 4):
        with pytest.raises(ValueError, match=f"truncation={k} must be in 1..T=3"):
            bilevel.unroll(step, 0.0, 0.0, stream, truncation=k)
    with pytest.raises(ValueError, match="segment=0 must be >= 1"):
        bilevel.unroll(step, 0.0, 0.0, stream, segment=0)
    batch = {"image": jnp.zeros((2, 4, 4, 1)), "index": jnp.arange(2)}
    with pytest.raises(ValueError, match=r"rows have shape \(4, 4, 3\) but the batch's images"):
        bilevel.perturb(jnp.zeros((5, 4, 4, 3)), batch)
    with pytest.raises(ValueError, match="batch\\['index'\\]"):
        bilevel.perturb(jnp.zeros((5, 4, 4, 1)), {"image": batch["image"]})
    data = {"image": jnp.zeros((5, 2)), "label": jnp.zeros(5)}
    with pytest.raises(ValueError, match="batch_size=6 must be in 1..5"):
        bilevel.batches(data, num_steps=2, batch_size=6, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        bilevel.batches(data, num_steps=0, batch_size=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="one leading size"):
        bilevel.batches(dict(data, label=jnp.zeros(4)), num_steps=1, batch_size=2, key=None)
    with pytest.raises(ValueError, match="damping=-1.0 must be >= 0"):
        bilevel.implicit_argmin(lambda h, p: p, lambda p, h: 0.0, damping=-1.0)
