r"""Per-layer breakdown: forward conv, input gradient, kernel gradient and 2x2 max-pool, in
jaxpoison (`jaxpoison.ops`), plain `jax.lax`, and PyTorch (oneDNN), interleaved, medians.

    python benchmarks/conv_layers.py --model=cnn_cifar --reps=5
    python benchmarks/conv_layers.py --model=vgg11 --batch=128 --parts=fwd,dx,dw
    python benchmarks/conv_layers.py --model=resnet18_w025 --parts=dw --impls=ops@0,ops@19,torch
    taskset -c 0 python benchmarks/conv_layers.py ...   # one core: less noise on a shared CPU

Each row is one 3x3 SAME convolution of the model at CIFAR shapes (batch 128 by default) and
reports milliseconds and GFLOP/s (2 x multiply-adds / time) of each part. ``dw`` for
jaxpoison is `ops.kernel_gradient`; ``ops@k`` is jaxpoison with its patch matrix built per
chunk of 2^k elements (`ops._DW_CHUNK_ELEMENTS`; ``ops@0``: one matrix for the whole
batch); for lax it is the kernel half of `jax.vjp` of `lax.conv_general_dilated`; for torch
it is `aten.convolution_backward` with only the weight output requested (likewise ``dx``).
``pool`` is a 2x2 max-pool forward + backward on the conv's output. One JSON line per
measurement (prefix ``JSON ``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxpoison import ops

NHWC = ("NHWC", "HWIO", "NHWC")

LAYERS = {
    # (H=W of the input, Cin, Cout) of each 3x3 SAME convolution, CIFAR 32x32 input.
    "cnn_cifar": [(32, 3, 32), (16, 32, 64), (8, 64, 128), (4, 128, 128), (2, 128, 128)],
    "vgg11": [
        (32, 3, 64),
        (16, 64, 128),
        (8, 128, 256),
        (8, 256, 256),
        (4, 256, 512),
        (4, 512, 512),
        (2, 512, 512),
        (2, 512, 512),
    ],
    "resnet18_w025": [(32, 3, 16), (32, 16, 16), (16, 32, 32), (8, 64, 64), (4, 128, 128)],
}


def _time(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def jax_parts(x, w, which):
    """Zero-argument callables for each part, for jaxpoison ops ('ops', 'ops@k') or plain lax
    ('lax'), compiled here (so with the ops settings of the moment)."""
    which = "ops" if which.startswith("ops") else which
    pads = ((1, 1), (1, 1))
    conv = (
        (lambda a, b: ops.conv_general_dilated(a, b, (1, 1), pads, dimension_numbers=NHWC))
        if which == "ops"
        else (lambda a, b: lax.conv_general_dilated(a, b, (1, 1), pads, dimension_numbers=NHWC))
    )
    ct = jnp.ones(jax.eval_shape(conv, x, w).shape, x.dtype) * 0.01
    fwd = jax.jit(conv)
    dx = jax.jit(lambda a, b, c: jax.vjp(lambda a_: conv(a_, b), a)[1](c)[0])
    if which == "ops":
        dw = jax.jit(lambda a, c: ops.kernel_gradient(a, c, (3, 3), (1, 1), pads))
    else:
        dw = jax.jit(lambda a, b, c: jax.vjp(lambda b_: conv(a, b_), b)[1](c)[0])
    pool_fn = ops.max_pool if which == "ops" else nn.max_pool
    pool = jax.jit(lambda a: jax.vjp(lambda a_: pool_fn(a_, (2, 2), (2, 2)), a)[1](a[:, ::2, ::2]))
    y = fwd(x, w)
    parts = {
        "fwd": lambda: fwd(x, w).block_until_ready(),
        "dx": lambda: dx(x, w, ct).block_until_ready(),
        "dw": (lambda: dw(x, ct).block_until_ready())
        if which == "ops"
        else (lambda: dw(x, w, ct).block_until_ready()),
        "pool": lambda: pool(y)[0].block_until_ready(),
    }
    return parts


def torch_parts(torch, x_np, w_np):
    F = torch.nn.functional
    x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.from_numpy(np.ascontiguousarray(w_np.transpose(3, 2, 0, 1))).contiguous(
        memory_format=torch.channels_last
    )
    with torch.no_grad():
        y = F.conv2d(x, w, padding=1)
    ct = (torch.ones_like(y) * 0.01).contiguous(memory_format=torch.channels_last)
    bw = torch.ops.aten.convolution_backward

    def back(mask):
        return bw(ct, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask)

    yp = y.clone().requires_grad_(True)

    def pool():
        out = F.max_pool2d(yp, 2)
        (g,) = torch.autograd.grad(out, yp, torch.ones_like(out))
        return g

    with torch.no_grad():
        parts = {
            "fwd": lambda: F.conv2d(x, w, padding=1),
            "dx": lambda: back([True, False, False]),
            "dw": lambda: back([False, True, False]),
        }
    parts["pool"] = pool
    return {k: (lambda f=f: _no_grad(torch, f)) if k != "pool" else f for k, f in parts.items()}


def _no_grad(torch, f):
    with torch.no_grad():
        return f()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cnn_cifar", choices=sorted(LAYERS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--parts", default="fwd,dx,dw,pool")
    p.add_argument("--impls", default="ops,lax,torch")
    args = p.parse_args(argv)
    parts = args.parts.split(",")
    impls = args.impls.split(",")
    torch = None
    if "torch" in impls:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        try:
            import torch_reference

            torch = torch_reference.torch
        except ImportError as e:
            print(f"PyTorch unavailable, skipping it: {e}", file=sys.stderr)
            impls.remove("torch")
    print(f"{args.model}, batch {args.batch}, load {os.getloadavg()}")
    head = " ".join(f"{i + ':' + q:>14}" for q in parts for i in impls)
    print(f"{'H Cin Cout':>14} {head}   (ms; GFLOP/s for convs)")
    rng = np.random.default_rng(0)
    for hw, cin, cout in LAYERS[args.model]:
        x = rng.standard_normal((args.batch, hw, hw, cin), np.float32)
        w = rng.standard_normal((3, 3, cin, cout), np.float32) * 0.1
        flop = 2 * args.batch * hw * hw * 9 * cin * cout
        fns = {}
        default_chunk = ops._DW_CHUNK_ELEMENTS
        for impl in impls:
            if impl.startswith("ops@"):
                exponent = int(impl[4:])
                ops._DW_CHUNK_ELEMENTS = 2**exponent if exponent else 0
            ps = (
                torch_parts(torch, x, w)
                if impl == "torch"
                else jax_parts(jnp.asarray(x), jnp.asarray(w), impl)
            )
            for q in parts:
                if q == "pool" and hw == 1:
                    continue
                fns[(impl, q)] = ps[q]
                ps[q]()  # compile / warm up
            ops._DW_CHUNK_ELEMENTS = default_chunk
        times = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, f in fns.items():
                times[k] += _time(f, 1)
        cells = []
        for q in parts:
            for impl in impls:
                if (impl, q) not in times:
                    cells.append(f"{'-':>14}")
                    continue
                med = statistics.median(times[(impl, q)])
                rec = {
                    "model": args.model,
                    "layer": [hw, cin, cout],
                    "impl": impl,
                    "part": q,
                    "median_ms": med * 1e3,
                    "load1": round(os.getloadavg()[0], 2),
                }
                if q != "pool":
                    rec["gflops_per_s"] = flop / med / 1e9
                print("JSON " + json.dumps(rec), file=sys.stderr)
                gf = f"/{rec['gflops_per_s']:.0f}" if q != "pool" else ""
                cells.append(f"{med * 1e3:>9.1f}{gf:>5}")
        print(f"{f'{hw} {cin} {cout}':>14} " + " ".join(cells), flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
