"""Convolution and pooling formulated for speed on XLA's CPU backend, exact everywhere.

XLA:CPU computes the kernel gradient of a convolution with few channels and large images through
a slow generic path (measured on 2 cores: 4 GFLOP/s for a 3->32 channel 32x32 layer, against
55 GFLOP/s for the forward conv). `conv_general_dilated` below keeps XLA's convolution for the
forward pass and the input gradient, and computes the kernel gradient as a GEMM over shifted
views of the input (sum over positions of x_shift^T @ cotangent), which runs at matmul speed;
the patch matrix is built a few examples at a time (a scan over cache-sized chunks of the
batch), which made early layers' kernel gradients 2-3.7x faster than one batch-sized matrix.
The input gradient is a convolution with the kernel flipped and transposed explicitly (XLA:CPU
runs JAX's own form, with an OIHW kernel, through a generic loop inside `lax.scan` bodies), and
is itself differentiated by these rules, so derivatives of every order stay on these kernels.
Convolutions on tiny images (at most kh*kw pixels, e.g. the 2x2 maps at the end of the CIFAR
CNN and VGG) are worse still on XLA:CPU (about 1 GFLOP/s, 20x behind oneDNN); there the
convolution is written as one dense matrix product, ``x[B, H*W*Cin] @ W[H*W*Cin, Ho*Wo*Cout]``,
whose matrix is the kernel scattered by a constant 0/1 tap-selection tensor; this needs no more
multiply-adds than the convolution (H*W <= kh*kw) and all its gradients are matrix products.
`max_pool` uses a reshape + max for non-overlapping windows, whose gradient is elementwise,
instead of XLA's select-and-scatter. Both are drop-in: same signature, same numbers up to
floating-point reassociation (tests compare them with `lax`), and both support grad-of-grad
(the meta-gradients of L2C). Anything they do not cover falls back to `lax`.
On the CPU backend, fp32 convolutions call oneDNN through `jax.ffi` instead (forward, input
gradient and kernel gradient from `jaxpoison._cpu_kernels`, each differentiated by the other two
here, so every order of derivative stays on oneDNN) when the library is available;
`set_conv_backend("xla")` or ``JAXPOISON_CONV=xla`` keeps the XLA formulation above.
On a CPU mesh each oneDNN call has a partitioning rule (`_partitioned`, also under ``vmap``):
each device convolves its shard of a batch split along ``data``, and the kernel gradients'
shards meet in one ``psum``, the gradient all-reduce (docs/results/2026-12-scale-out.md).
All of this is for CPUs only: `conv_general_dilated` and `max_pool` choose by the platform a
program is lowered for (`lax.platform_dependent`), and on gpu or tpu they are XLA's own
convolution and pooling, so a program lowered for an accelerator (even by a CPU process) holds
no CPU-only custom call and none of the formulations' loops.
Measurements: docs/performance.md and benchmarks/conv_layers.py.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison import _cpu_kernels

_NHWC = ("NHWC", "HWIO", "NHWC")

# "auto": oneDNN for fp32 on CPU when it builds, else XLA; "onednn": oneDNN or an error; "xla".
_CONV_BACKENDS = ("auto", "onednn", "xla")
_conv_backend = os.environ.get("JAXPOISON_CONV", "auto")


def set_conv_backend(name):
    """Chooses the CPU convolution kernels for functions traced from now on; returns the old one.

    ``"auto"`` (default, or ``$JAXPOISON_CONV``): oneDNN for fp32 on the CPU backend when it is
    available, XLA otherwise; ``"onednn"``: oneDNN, raising if it cannot be built; ``"xla"``.
    Functions already jitted keep the kernels they were traced with.
    """
    global _conv_backend
    if name not in _CONV_BACKENDS:
        raise ValueError(f"conv backend {name!r}: use one of {_CONV_BACKENDS}.")
    old, _conv_backend = _conv_backend, name
    return old


def _use_onednn(*arrays):
    """Whether to stage out oneDNN for these operands (for the CPU platform only: `_on_cpu`).

    A process whose default backend is not the CPU never builds the kernels: it lowers for its
    accelerator, where they do not exist.
    """
    if _conv_backend not in _CONV_BACKENDS:
        raise ValueError(f"JAXPOISON_CONV={_conv_backend!r}: use one of {_CONV_BACKENDS}.")
    if _conv_backend == "xla" or jax.default_backend() != "cpu":
        return False
    if any(a.dtype != jnp.float32 for a in arrays):
        return False
    if _conv_backend == "onednn":
        return _cpu_kernels.require()
    return _cpu_kernels.available()


def _on_cpu(onednn_kernel, xla_kernel, *arrays):
    """``onednn_kernel(*arrays)`` where the program runs on CPU, ``xla_kernel(*arrays)`` elsewhere.

    The choice is made when the program is lowered, for the platform it is lowered for (not the
    process's default backend): a CPU process lowering for cuda or tpu gets XLA's kernel, never a
    CPU-only custom call. Without oneDNN (`_use_onednn`) it is XLA's kernel everywhere.
    """
    if not _use_onednn(*arrays):
        return xla_kernel(*arrays)
    return lax.platform_dependent(*arrays, cpu=onednn_kernel, default=xla_kernel)


# The dimensions of each oneDNN kernel's two operands and result (NHWC / HWIO); ``b`` is the batch.
_KERNEL_DIMS = {
    "conv": ("b h w c", "i j c o", "b p q o"),
    "input_gradient": ("b p q o", "i j c o", "b h w c"),
    "kernel_gradient": ("b h w c", "b p q o", "i j c o"),
}


def _on_shards(kind, kernel, levels=()):
    """`kernel` (a oneDNN kernel ``kind`` of `_KERNEL_DIMS` on rank-4 operands) with a
    partitioning rule, so that on a mesh each device runs it on its shard of the batch.

    A custom call has no rule of its own: XLA would gather a batch split along ``data`` and let
    every device convolve all of it. `_partitioned` gives one; `jax.custom_batching.custom_vmap`
    carries it through ``vmap`` (which `custom_partitioning` does not support): each vmapped
    level, outermost first, is a pair ``levels[k]`` saying which operand it batches, and adds a
    leading dimension to the rule (the kernels take leading dimensions, `_cpu_kernels`).
    """

    @jax.custom_batching.custom_vmap
    def call(a, b):
        return _partitioned(kind, kernel, levels)(a, b)

    @call.def_vmap
    def rule(axis_size, in_batched, a, b):
        del axis_size
        return _on_shards(kind, kernel, (tuple(in_batched), *levels))(a, b), True

    return call


def _partitioned(kind, kernel, levels):
    """`kernel` vmapped over `levels`, as a `custom_partitioning` whose rule keeps the batch's
    sharding: `conv` and `input_gradient` map each device's batch shard to its shard of the
    result (the kernel replicated, no collective); `kernel_gradient` sums the shards' kernel
    gradients with one `psum` over the batch's mesh axes (the gradient all-reduce that data
    parallelism needs anyway). Every other dimension (spatial, channels, vmapped levels) is
    replicated, and so is a batch its mesh axes do not divide. Without a mesh (one device) it is
    `kernel` itself.
    """

    def fun(a, b):
        f = kernel
        for a_batched, b_batched in reversed(levels):
            f = jax.vmap(f, in_axes=(0 if a_batched else None, 0 if b_batched else None))
        return f(a, b)

    leads = [f"l{k}" for k in range(len(levels))]
    a_leads = [name for name, (batched, _) in zip(leads, levels, strict=True) if batched]
    b_leads = [name for name, (_, batched) in zip(leads, levels, strict=True) if batched]
    a_dims, b_dims, out_dims = _KERNEL_DIMS[kind]
    reduce = kind == "kernel_gradient"
    # Where each tensor's batch dimension is (None: it has none).
    batch_dim = (len(a_leads), len(b_leads) if reduce else None, None if reduce else len(leads))

    def shardings(mesh, arg_shapes, result_shape):
        """The batch's mesh axes (None: not split), and the operands' and result's shardings."""
        axes = _batch_axes(mesh, arg_shapes[0], batch_dim[0])

        def sharding(shape, dim):
            spec = [None] * len(shape.shape)
            if axes and dim is not None:
                spec[dim] = axes
            return NamedSharding(mesh, P(*spec))

        operands = (sharding(arg_shapes[0], batch_dim[0]), sharding(arg_shapes[1], batch_dim[1]))
        return axes, operands, sharding(result_shape, batch_dim[2])

    def partition(mesh, arg_shapes, result_shape):
        axes, operands, result = shardings(mesh, arg_shapes, result_shape)

        def lower(a, b):
            out = fun(a, b)
            return lax.psum(out, axes) if axes and reduce else out

        return mesh, lower, result, operands

    call = custom_partitioning(fun)
    operands = (" ".join([*a_leads, a_dims]), " ".join([*b_leads, b_dims]))
    rule = f"{operands[0]}, {operands[1]} -> {' '.join([*leads, out_dims])}"
    # Factors in order of first appearance (Shardy wants them sorted); all but the batch replicated.
    factors = list(dict.fromkeys(rule.replace(",", " ").replace("->", " ").split()))
    call.def_partition(
        partition,
        # GSPMD's propagation (Shardy, the default, reads the rule).
        infer_sharding_from_operands=lambda *args: shardings(*args)[2],
        sharding_rule=rule,
        reduction_factors=("b",) if reduce else (),
        need_replication_factors=tuple(f for f in factors if f != "b"),
    )
    return call


def _batch_axes(mesh, shape, dim):
    """The mesh axes that split dimension `dim` of `shape` evenly, as a tuple (None if none)."""
    sharding = shape.sharding
    if not isinstance(sharding, NamedSharding) or dim >= len(sharding.spec):
        return None
    axes = sharding.spec[dim]
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if not axes or shape.shape[dim] % int(np.prod([mesh.shape[a] for a in axes])):
        return None
    return axes


def _explicit_padding(padding, in_hw, kernel_hw, strides):
    if not isinstance(padding, str):
        return tuple((int(lo), int(hi)) for lo, hi in padding)
    return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, padding))


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated`; plain NHWC/HWIO convolutions lowered for CPU take the
    formulations above (oneDNN, or XLA with a GEMM kernel gradient), elsewhere XLA's own."""
    plain = (
        lhs.ndim == 4
        and feature_group_count == 1
        and batch_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and _is_nhwc(dimension_numbers)
        and preferred_element_type is None
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            batch_group_count,
            precision,
            preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2], strides)

    def cpu(x, w):
        if _use_dense(x.shape, w.shape):
            return dense_conv(x, w, strides, pads)
        return _conv(x, w, strides, pads)

    def accelerator(x, w):
        return lax.conv_general_dilated(
            x, w, strides, pads, dimension_numbers=_NHWC, precision=precision
        )

    return lax.platform_dependent(lhs, rhs, cpu=cpu, default=accelerator)


# Largest dense matrix (elements) the tiny-image path builds: 2x2 maps of 512 -> 512 channels
# need 4*4*512*512 = 4.2M; the cap keeps a wide network's matrix under 256 MB.
_DENSE_MAX_ELEMENTS = 1 << 26


def _use_dense(x_shape, w_shape):
    _, h, w, cin = x_shape
    kh, kw, _, cout = w_shape
    pixels = h * w
    return pixels <= kh * kw and pixels * pixels * cin * cout <= _DENSE_MAX_ELEMENTS


@functools.cache
def _tap_selection(in_hw, kernel_hw, strides, pads):
    """0/1 array [H*W, Ho*Wo, kh*kw]: 1 where output pixel q reads input pixel p through tap t."""
    (h, w), (kh, kw), (sh, sw) = in_hw, kernel_hw, strides
    ho = (h + pads[0][0] + pads[0][1] - kh) // sh + 1
    wo = (w + pads[1][0] + pads[1][1] - kw) // sw + 1
    sel = np.zeros((h * w, ho * wo, kh * kw), np.float32)
    for oi in range(ho):
        for oj in range(wo):
            for i in range(kh):
                for j in range(kw):
                    ii, jj = oi * sh + i - pads[0][0], oj * sw + j - pads[1][0]
                    if 0 <= ii < h and 0 <= jj < w:
                        sel[ii * w + jj, oi * wo + oj, i * kw + j] = 1.0
    return sel, (ho, wo)


def dense_conv(x, w, strides, pads):
    """The NHWC/HWIO convolution as one matrix product (fast for tiny images on CPU).

    ``y[b, q, d] = sum_{p, c} x[b, p, c] * W[p, c, q, d]`` with ``W[p, c, q, d] = w[t(p, q), c, d]``
    where tap t(p, q) links input pixel p to output pixel q (zero where none does). Plain jnp:
    its gradients of every order are those of two contractions.
    """
    b, h, wd, cin = x.shape
    kh, kw, _, cout = w.shape
    sel, (ho, wo) = _tap_selection((h, wd), (kh, kw), tuple(strides), tuple(pads))
    sel = jnp.asarray(sel, w.dtype)
    dense = jnp.einsum("pqt,tcd->pcqd", sel, w.reshape(kh * kw, cin, cout))
    y = jnp.dot(
        x.reshape(b, h * wd * cin),
        dense.reshape(h * wd * cin, ho * wo * cout),
        preferred_element_type=jnp.float32,
    )
    return y.reshape(b, ho, wo, cout).astype(x.dtype)


def _is_nhwc(dimension_numbers):
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _conv_kernel(x, w, strides, pads):
    return _on_cpu(
        _on_shards("conv", lambda x, w: _cpu_kernels.conv(x, w, strides, pads)),
        lambda x, w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC),
        x,
        w,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, pads):
    return _conv_kernel(x, w, strides, pads)


# Each forward rule computes its output through the custom_vjp function itself, so a derivative
# of higher order that differentiates the rule (grad of grad, as in L2C) meets these rules again,
# never a bare oneDNN call (which has no derivative of its own).
def _conv_fwd(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w)


# Kernel gradients build their patch matrix a few examples at a time, each slice about this
# many elements (2 MB of fp32), so it stays in a core's cache: an early layer's whole matrix is
# tens of MB, and building and reading it, not the GEMM, set the time (docs/performance.md).
# 0 turns the chunking off (one matrix for the whole batch).
_DW_CHUNK_ELEMENTS = 1 << 19


def _examples_per_chunk(batch, per_example):
    """The largest divisor of `batch` whose patch matrix fits `_DW_CHUNK_ELEMENTS` (at least 1)."""
    if not _DW_CHUNK_ELEMENTS or per_example * batch <= _DW_CHUNK_ELEMENTS:
        return batch
    want = max(1, _DW_CHUNK_ELEMENTS // per_example)
    return max(d for d in range(1, want + 1) if batch % d == 0)


def _patch_gemm(xp, ct, kernel_hw, strides, cin):
    """sum over positions of patches(xp)^T @ ct, for an already padded input."""
    kh, kw = kernel_hw
    sh, sw = strides
    b, ho, wo, cout = ct.shape
    shifts = [
        lax.slice(
            xp,
            (0, i, j, 0),
            (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    patches = jnp.stack(shifts, axis=3).reshape(b * ho * wo, kh * kw * cin)
    return jnp.dot(patches.T, ct.reshape(b * ho * wo, cout), preferred_element_type=jnp.float32)


def kernel_gradient(x, ct, kernel_hw, strides, pads):
    """d<conv(x, w), ct>/dw for a kernel of spatial size ``kernel_hw``: oneDNN's on CPU when it
    is chosen (`_on_cpu`), else GEMMs over the patches (`_xla_kernel_gradient`)."""
    kernel_hw = tuple(kernel_hw)
    return _on_cpu(
        lambda x, ct: _onednn_kernel_gradient(x, ct, kernel_hw, strides, pads),
        lambda x, ct: _xla_kernel_gradient(x, ct, kernel_hw, strides, pads),
        x,
        ct,
    )


def _xla_kernel_gradient(x, ct, kernel_hw, strides, pads):
    """d<conv(x, w), ct>/dw as GEMMs: [kh*kw*Cin, B*Ho*Wo] @ [B*Ho*Wo, Cout].

    The batch is cut into chunks whose patch matrix fits in cache (`_DW_CHUNK_ELEMENTS`); a
    `lax.scan` over the chunks sums their products.
    """
    kh, kw = kernel_hw
    b, ho, wo, cout = ct.shape
    cin = x.shape[3]
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    chunk = _examples_per_chunk(b, ho * wo * kh * kw * cin)
    if chunk == b:
        dw = _patch_gemm(xp, ct, kernel_hw, strides, cin)
    else:

        def add_chunk(acc, chunk_pair):
            return acc + _patch_gemm(*chunk_pair, kernel_hw, strides, cin), None

        chunks = (
            xp.reshape(b // chunk, chunk, *xp.shape[1:]),
            ct.reshape(b // chunk, chunk, *ct.shape[1:]),
        )
        dw, _ = lax.scan(add_chunk, jnp.zeros((kh * kw * cin, cout), jnp.float32), chunks)
    return dw.reshape(kh, kw, cin, cout).astype(ct.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _onednn_kernel_gradient(x, ct, kernel_hw, strides, pads):
    return _on_shards(
        "kernel_gradient",
        lambda x, ct: _cpu_kernels.kernel_gradient(x, ct, kernel_hw, strides, pads),
    )(x, ct)


def _onednn_kernel_gradient_fwd(x, ct, kernel_hw, strides, pads):
    return _onednn_kernel_gradient(x, ct, kernel_hw, strides, pads), (x, ct)


def _onednn_kernel_gradient_bwd(kernel_hw, strides, pads, res, g):
    # <kernel_gradient(x, ct), g> = <conv(x, g), ct>: a forward convolution in ct and an input
    # gradient in x.
    x, ct = res
    return _input_gradient(ct, g, x.shape[1:3], strides, pads), _conv(x, g, strides, pads)


_onednn_kernel_gradient.defvjp(_onednn_kernel_gradient_fwd, _onednn_kernel_gradient_bwd)


def _conv_bwd(strides, pads, res, ct):
    x, w = res
    dx = _input_gradient(ct, w, x.shape[1:3], strides, pads)
    return dx, kernel_gradient(x, ct, w.shape[:2], strides, pads).astype(w.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_gradient_kernel(ct, w, in_hw, strides, pads):
    """d<conv(x, w), ct>/dx for an input of spatial size ``in_hw``: oneDNN's on CPU when it is
    chosen (`_on_cpu`), else `_xla_input_gradient`."""
    in_hw = tuple(in_hw)
    return _on_cpu(
        _on_shards(
            "input_gradient", lambda ct, w: _cpu_kernels.input_gradient(ct, w, in_hw, strides, pads)
        ),
        lambda ct, w: _xla_input_gradient(ct, w, in_hw, strides, pads),
        ct,
        w,
    )


def _xla_input_gradient(ct, w, in_hw, strides, pads):
    """d<conv(x, w), ct>/dx: ``ct`` dilated by the strides, convolved with the flipped kernel.

    The kernel is flipped and transposed to HWIO explicitly. JAX's own transpose rule hands XLA
    a convolution with an OIHW-ordered kernel; outside loops XLA:CPU inserts the transpose
    itself, but inside a `lax.scan` body it does not, and the convolution falls back to a
    generic loop (measured: the L2C generator's gradient 2.5x slower inside a scan of length 1
    than outside it).
    """
    kh, kw = w.shape[:2]
    w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
    padding = []
    for (lo, _), k, s, n, n_out in zip(pads, (kh, kw), strides, in_hw, ct.shape[1:3], strict=True):
        # The dilated cotangent spans (n_out - 1) * s + 1 pixels; pad it so the result has n.
        padding.append((k - 1 - lo, n + lo - (n_out - 1) * s - 1))
    return lax.conv_general_dilated(
        ct, w_t, (1, 1), padding, lhs_dilation=strides, dimension_numbers=_NHWC
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _input_gradient(ct, w, in_hw, strides, pads):
    return _input_gradient_kernel(ct, w, in_hw, strides, pads)


def _input_gradient_fwd(ct, w, in_hw, strides, pads):
    return _input_gradient(ct, w, in_hw, strides, pads), (ct, w)


def _input_gradient_bwd(in_hw, strides, pads, res, g):
    # <input_gradient(ct, w), g> = <conv(g, w), ct>: its gradients are a forward convolution in
    # ct and a kernel gradient in w, so derivatives of every order stay on these three kernels.
    ct, w = res
    d_ct = _conv(g, w, strides, pads)
    return d_ct, kernel_gradient(g, ct, w.shape[:2], strides, pads).astype(w.dtype)


_input_gradient.defvjp(_input_gradient_fwd, _input_gradient_bwd)


def max_pool(x, window_shape, strides=None, padding="VALID"):
    """`flax.linen.max_pool`; on CPU, non-overlapping unpadded windows take a reshape + max."""
    import flax.linen as nn

    strides = tuple(strides or window_shape)
    wh, ww = window_shape
    if (
        padding == "VALID"
        and strides == (wh, ww)
        and x.ndim == 4
        and x.shape[1] % wh == 0
        and x.shape[2] % ww == 0
    ):

        def cpu(x):
            b, h, w, c = x.shape
            return jnp.max(x.reshape(b, h // wh, wh, w // ww, ww, c), axis=(2, 4))

        return lax.platform_dependent(
            x, cpu=cpu, default=lambda x: nn.max_pool(x, window_shape, strides, padding)
        )
    return nn.max_pool(x, window_shape, strides, padding)
