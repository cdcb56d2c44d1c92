"""`jaxpoison.ops` against `jax.lax`: values, first- and second-order gradients, via the models.

Tests taking the `backend` fixture run twice: with the oneDNN kernels (`jaxpoison._cpu_kernels`,
which must build here: the test extra installs oneDNN) and with the XLA formulation. Both sides of
every comparison are compiled alike, XLA's cheaper way (`fast_compiles`): compilation is most of
this module's time.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxpoison import _cpu_kernels, attacks, models, objectives, ops, threat, train_state
from jaxpoison._cpu_kernels import onednn
from jaxpoison.poisons import l2c

pytestmark = pytest.mark.usefixtures("fast_compiles")

NHWC = ("NHWC", "HWIO", "NHWC")
RTOL, ATOL = 2e-4, 2e-5

# (input shape, kernel shape, strides, padding, which ops path is expected)
CASES = [
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), "SAME", "gemm"),
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), "gemm"),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), "SAME", "gemm"),
    ((2, 7, 6, 3), (3, 3, 3, 4), (1, 1), "VALID", "gemm"),
    ((2, 6, 6, 3), (3, 2, 3, 4), (1, 2), ((2, 0), (1, 1)), "gemm"),
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), "SAME", "gemm"),
    ((3, 2, 2, 5), (3, 3, 5, 7), (1, 1), "SAME", "dense"),
    ((3, 1, 1, 5), (3, 3, 5, 7), (1, 1), "SAME", "dense"),
    ((3, 3, 3, 5), (3, 3, 5, 7), (2, 2), ((1, 1), (1, 1)), "dense"),
    ((3, 3, 3, 5), (3, 3, 5, 7), (1, 1), "VALID", "dense"),
    ((3, 2, 2, 4), (1, 1, 4, 6), (2, 2), "SAME", "gemm"),
]
# Second order on one case per path and kind of padding (compile time dominates on CPU).
SECOND_ORDER = [CASES[i] for i in (1, 3, 4, 6, 8, 9)]
IDS = [f"{c[4]}-{c[0][1]}x{c[0][2]}-k{c[1][0]}{c[1][1]}-s{c[2][0]}{c[2][1]}" for c in CASES]


def _ops_conv(x, w, strides, padding):
    return ops.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _lax_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


@pytest.fixture(params=["xla", "onednn"])
def backend(request):
    old = ops.set_conv_backend(request.param)
    yield request.param
    ops.set_conv_backend(old)


def _arrays(x_shape, w_shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape), 0.3 * jax.random.normal(kw, w_shape)


def _close(a, b, scale=1.0):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL * scale)


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,path", CASES, ids=IDS)
def test_conv_values_and_gradients(x_shape, w_shape, strides, padding, path, backend):
    x, w = _arrays(x_shape, w_shape)
    pads = ops._explicit_padding(padding, x_shape[1:3], w_shape[:2], strides)
    assert ops._use_dense(x_shape, w_shape) == (path == "dense")
    if path == "dense":
        _close(ops.dense_conv(x, w, strides, pads), _lax_conv(x, w, strides, padding))
    y = _ops_conv(x, w, strides, padding)
    _close(y, _lax_conv(x, w, strides, padding))

    ct = jax.random.normal(jax.random.key(7), y.shape)
    _, vjp_ops = jax.vjp(lambda a, b: _ops_conv(a, b, strides, padding), x, w)
    _, vjp_lax = jax.vjp(lambda a, b: _lax_conv(a, b, strides, padding), x, w)
    for g_ops, g_lax in zip(vjp_ops(ct), vjp_lax(ct), strict=True):
        _close(g_ops, g_lax, scale=10)


@pytest.mark.parametrize(
    "x_shape,w_shape,strides,padding,path",
    SECOND_ORDER,
    ids=[IDS[i] for i in (1, 3, 4, 6, 8, 9)],
)
def test_conv_second_order(x_shape, w_shape, strides, padding, path, backend):
    """d/dx and d/dw of <grad_w loss, v> and of <grad_x loss, u> (the terms of meta-gradients)."""
    del path, backend
    _second_order_matches_lax(x_shape, w_shape, strides, padding)


def _second_order_matches_lax(x_shape, w_shape, strides, padding):
    x, w = _arrays(x_shape, w_shape, seed=1)
    u = jax.random.normal(jax.random.key(2), x.shape)
    v = jax.random.normal(jax.random.key(3), w.shape)

    def second(conv):
        loss = lambda a, b: jnp.sum(jnp.tanh(conv(a, b, strides, padding)) ** 2)
        gw = lambda a, b: jnp.vdot(jax.grad(loss, 1)(a, b), v)
        gx = lambda a, b: jnp.vdot(jax.grad(loss, 0)(a, b), u)
        return jax.grad(gw, (0, 1))(x, w) + jax.grad(gx, (0, 1))(x, w)

    for a, b in zip(second(_ops_conv), second(_lax_conv), strict=True):
        _close(a, b, scale=100)


def test_input_gradient_in_a_scan_keeps_hwio_kernels():
    """Inside `lax.scan` XLA:CPU leaves an OIHW-kernel convolution (JAX's own input gradient) on a
    generic loop, 2-3x slower; the ops' input gradient hands it an HWIO kernel instead."""
    old = ops.set_conv_backend("xla")
    x, w = _arrays((4, 16, 16, 8), (4, 4, 8, 16))

    def step(carry, _):
        loss = lambda a: jnp.sum(jnp.tanh(_ops_conv(a, w + carry, (2, 2), "SAME")) ** 2)
        return carry + 1e-3, jax.grad(loss)(x)

    hlo = jax.jit(lambda: lax.scan(step, 0.0, None, length=3)[1]).lower().compile().as_text()
    labels = [
        line.split("dim_labels=")[1].split(",")[0]
        for line in hlo.splitlines()
        if " convolution(" in line
    ]
    ops.set_conv_backend(old)
    assert labels and all(label == "b01f_01io->b01f" for label in labels), labels


def test_kernel_gradient_matches_lax(backend):
    x, w = _arrays((2, 8, 8, 3), (3, 3, 3, 4))
    pads = ((1, 1), (1, 1))
    ct = jax.random.normal(jax.random.key(5), (2, 8, 8, 4))
    _, vjp = jax.vjp(lambda b: _lax_conv(x, b, (1, 1), pads), w)
    _close(ops.kernel_gradient(x, ct, (3, 3), (1, 1), pads), vjp(ct)[0], scale=10)


def test_kernel_gradient_in_batch_chunks(monkeypatch):
    """Built chunk by chunk of the batch (a scan), the patch matrix gives the one-matrix result,
    for first- and second-order gradients (the XLA formulation)."""
    monkeypatch.setattr(ops, "_conv_backend", "xla")
    x, w = _arrays((6, 9, 9, 4), (3, 3, 4, 6))
    pads = ((1, 1), (1, 1))
    ct = jax.random.normal(jax.random.key(5), (6, 5, 5, 6))
    whole = ops.kernel_gradient(x, ct, (3, 3), (2, 2), pads)
    per_example = 5 * 5 * 9 * 4
    monkeypatch.setattr(ops, "_DW_CHUNK_ELEMENTS", 2 * per_example)
    assert [ops._examples_per_chunk(b, per_example) for b in (2, 6, 7, 8)] == [2, 2, 1, 2]
    chunked = jax.jit(ops.kernel_gradient, static_argnums=(2, 3, 4))
    hlo = chunked.lower(x, ct, (3, 3), (2, 2), pads).as_text()
    assert "while" in hlo  # the chunks really are a loop
    _close(chunked(x, ct, (3, 3), (2, 2), pads), whole)
    _second_order_matches_lax((6, 9, 9, 4), (3, 3, 4, 6), (2, 2), pads)


def test_unplain_convolutions_fall_back_to_lax():
    x, w = _arrays((2, 6, 6, 4), (3, 3, 2, 6))
    args = ((1, 1), "SAME")
    y = ops.conv_general_dilated(x, w, *args, dimension_numbers=NHWC, feature_group_count=2)
    _close(y, lax.conv_general_dilated(x, w, *args, dimension_numbers=NHWC, feature_group_count=2))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 2, 2, 4), (2, 6, 4, 1)])
def test_max_pool_values_and_gradients(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    f_ops = lambda a: ops.max_pool(a, (2, 2), (2, 2))
    f_ref = lambda a: nn.max_pool(a, (2, 2), (2, 2))
    _close(f_ops(x), f_ref(x))
    g = lambda f: jax.grad(lambda a: jnp.vdot(jnp.sin(f(a)).ravel(), jnp.arange(f(a).size)))
    _close(g(f_ops)(x), g(f_ref)(x))
    # Windows that do not tile the image fall back to flax.
    y = ops.max_pool(x[:, :3, :3], (2, 2), (1, 1))
    _close(y, nn.max_pool(x[:, :3, :3], (2, 2), (1, 1)))


@pytest.fixture
def lax_models(monkeypatch):
    """Within the test, the models' convolutions are plain `lax` (the reference)."""

    def use_lax():
        monkeypatch.setattr(ops, "_conv", _lax_conv)
        monkeypatch.setattr(ops, "_use_dense", lambda *_: False)

    return use_lax


@pytest.mark.parametrize("name,width", [("cnn_cifar", 0.25), ("resnet18", 1 / 16)])
def test_models_match_lax(name, width, lax_models, backend):
    """Logits, parameter gradients (train mode) and an input meta-gradient of a whole model."""
    module = models.make(name, num_classes=10, width=width)
    apply_fn = models.make_apply_fn(module)
    variables = models.init(module, jax.random.key(0), (8, 8, 3))
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 3))
    y = jnp.arange(4) % 10

    def loss(params, x):
        logits, _ = apply_fn({**variables, "params": params}, x, train=True)
        return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), y])

    def outputs():
        logits = apply_fn(variables, x, train=False)[0]
        grads = jax.grad(loss)(variables["params"], x)
        # d/dx of the squared norm of the parameter gradient: an L2C-style second-order term.
        meta = jax.grad(
            lambda x_: sum(
                jnp.sum(g**2) for g in jax.tree.leaves(jax.grad(loss)(variables["params"], x_))
            )
        )(x)
        return logits, grads, meta

    fast = jax.jit(outputs)()
    lax_models()
    ref = jax.jit(outputs)()
    _close(fast[0], ref[0])
    for a, b in zip(jax.tree.leaves(fast[1]), jax.tree.leaves(ref[1]), strict=True):
        _close(a, b, scale=10)
    meta_scale = float(jnp.max(jnp.abs(ref[2])))
    np.testing.assert_allclose(fast[2], ref[2], rtol=1e-3, atol=1e-4 * meta_scale)


def test_onednn_kernels_replace_xla_convolutions_in_loops_vmap_and_remat():
    """With oneDNN on, an L2C-shaped program (a scan of rematerialised SGD steps, vmapped over two
    seeds, differentiated to second order) has no XLA convolution left and matches XLA's."""
    x, w = _arrays((2, 4, 8, 8, 3), (2, 3, 3, 3, 4))

    def inner(w, x):
        def step(w, _):
            loss = lambda w_: jnp.sum(jnp.tanh(_ops_conv(x, w_, (1, 1), "SAME")) ** 2)
            return w - 1e-3 * jax.grad(loss)(w), None

        w_final, _ = lax.scan(jax.checkpoint(step), w, None, length=3)
        return jnp.sum(_ops_conv(x, w_final, (2, 2), "SAME") ** 2)

    meta = jax.jit(jax.vmap(jax.grad(inner, argnums=(0, 1))))
    old = ops.set_conv_backend("onednn")
    try:
        hlo = meta.lower(w, x).compile().as_text()
        fast = meta(w, x)
    finally:
        ops.set_conv_backend(old)
    assert "custom-call" in hlo and " convolution(" not in hlo
    ops.set_conv_backend("xla")
    try:
        ref = jax.jit(jax.vmap(jax.grad(inner, argnums=(0, 1))))(w, x)
    finally:
        ops.set_conv_backend(old)
    for a, b in zip(fast, ref, strict=True):
        _close(a, b, scale=100)


def test_onednn_is_chosen_for_the_lowering_platform(monkeypatch):
    """oneDNN's custom calls exist on CPU only: lowered for cuda or tpu from this CPU process, a
    vmapped second-order conv program has XLA convolutions and no custom call; for cpu, oneDNN."""
    monkeypatch.setattr(ops, "_conv_backend", "onednn")
    x, w = _arrays((2, 8, 8, 3), (2, 3, 3, 3, 4))

    def meta(w, x):
        loss = lambda w_, x_: jnp.sum(jnp.tanh(_ops_conv(x_, w_, (1, 1), "SAME")) ** 2)
        return jax.grad(lambda w_, x_: jnp.vdot(jax.grad(loss)(w_, x_), w_), (0, 1))(w, x)

    traced = jax.jit(jax.vmap(meta, (0, None))).trace(w, x)
    text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda", "tpu")}
    for name in ("forward", "backward_data", "backward_weights"):
        assert f"custom_call @jaxpoison_conv_{name}" in text["cpu"], name
    assert "stablehlo.convolution" not in text["cpu"]
    for platform in ("cuda", "tpu"):
        assert "custom_call" not in text[platform], platform
        assert "stablehlo.convolution" in text[platform], platform


def test_conv_backend_choice_and_dtypes(monkeypatch):
    with pytest.raises(ValueError, match="conv backend 'mkl'"):
        ops.set_conv_backend("mkl")
    monkeypatch.setattr(ops, "_conv_backend", "onedn")
    with pytest.raises(ValueError, match="JAXPOISON_CONV='onedn'"):
        ops._use_onednn(jnp.zeros(2))
    monkeypatch.setattr(ops, "_conv_backend", "onednn")
    assert ops._use_onednn(jnp.zeros(2, jnp.float32))
    # Other dtypes (the float64 exactness tests of L2C) stay on XLA.
    assert not ops._use_onednn(jnp.zeros(2, jnp.bfloat16))
    monkeypatch.setattr(ops, "_conv_backend", "xla")
    assert not ops._use_onednn(jnp.zeros(2, jnp.float32))


def test_missing_onednn_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXPOISON_ONEDNN_ROOT", str(tmp_path))
    monkeypatch.setattr(onednn.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(onednn.sysconfig, "get_paths", lambda: {"data": str(tmp_path)})
    fix = r"pip install onednn-cpu-gomp.*JAXPOISON_CONV=xla"
    with pytest.raises(_cpu_kernels.OneDNNUnavailable, match=fix):
        onednn._onednn_root()


def _lowered_programs():
    """The train step, PGD and the exact L2C meta-step of small conv models, traced."""
    module = models.make("cnn_cifar", num_classes=10, width=0.125)
    apply_fn = models.make_apply_fn(module)
    tx = train_state.make_optimizer(
        epochs=1, steps_per_epoch=1, learning_rate=0.1, momentum=0.9, schedule="constant"
    )
    # Shapes only (`eval_shape`): nothing here is compiled or run.
    key = jax.random.key(1)
    state = jax.eval_shape(lambda k: train_state.init_state(module, k, (32, 32, 3), tx), key)
    batch = {
        "image": jnp.zeros((16, 32, 32, 3)),
        "label": jnp.zeros(16, jnp.int32),
        "index": jnp.arange(16),
    }
    erm = objectives.make("erm")
    ball = threat.make(epsilon=8 / 255)

    def step(s, b, k):
        return train_state.train_step(s, b, k, apply_fn=apply_fn, objective=erm, tx=tx)

    def pgd(s, x, y, k):
        loss_fn = attacks.model_loss(apply_fn, {"params": s.params, **s.model_state})
        return attacks.pgd(loss_fn, x, y, key=k, threat=ball, num_steps=2, step_size=2 / 255)

    poison = l2c.l2c(
        threat=ball,
        num_classes=10,
        image_shape=(16, 16, 3),
        generator=dict(name="autoencoder", width=0.125),
        victim=dict(name="cnn_cifar", width=0.125),
        unroll_steps=2,
    )
    small = {k: v[:, :16, :16] if k == "image" else v for k, v in batch.items()}
    l2c_state = jax.eval_shape(poison.init, key, small)
    return {
        "train_step": jax.jit(step).trace(state, batch, key),
        "pgd": jax.jit(pgd).trace(state, batch["image"], batch["label"], key),
        "l2c_meta_step": jax.jit(poison.update).trace(l2c_state, small, key),
    }


def test_accelerator_lowerings_hold_plain_convolutions_only(monkeypatch):
    """Lowered for cuda or tpu from this CPU process, the train step, PGD and the L2C meta-step
    hold XLA's own convolutions and pooling: no jaxpoison custom call and none of the CPU
    formulation's loops (forced here by a tiny kernel-gradient chunk, which adds loops on CPU)."""
    monkeypatch.setattr(ops, "_conv_backend", "xla")
    monkeypatch.setattr(ops, "_DW_CHUNK_ELEMENTS", 64)
    # The loops each program has by itself: PGD's steps; L2C's unrolled inner loop, its remat
    # segments and their transposes.
    for name, traced in _lowered_programs().items():
        text = {p: traced.lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "cuda")}
        loops = {p: text[p].count("stablehlo.while") for p in text}
        assert loops["cpu"] > loops["cuda"], (name, loops)
        assert "stablehlo.convolution" in text["cuda"] and "select_and_scatter" in text["cuda"]
        assert "custom_call @jaxpoison" not in text["cuda"], name
        if name == "train_step":
            assert loops["cuda"] == 0
        if name == "pgd":
            assert loops["cuda"] == 1
    monkeypatch.setattr(ops, "_conv_backend", "onednn")
    for name, traced in _lowered_programs().items():
        for platform in ("cuda", "tpu"):
            assert (
                "custom_call @jaxpoison"
                not in traced.lower(lowering_platforms=(platform,)).as_text()
            ), (name, platform)
