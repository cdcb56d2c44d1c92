r"""Time and memory of the exact L2C meta-step per unroll length T, and a PyTorch reference.

  nice -n 10 python benchmarks/l2c_memory.py [--steps 5 20 80] [--width 0.5] [--batch 32]

For every T, a fresh subprocess builds the exact meta-step (`jaxpoison.poisons.l2c`,
method='exact', ``remat`` on by default) on MNIST images with the L2C MNIST CNN victim and the
encoder-decoder generator, compiles it, runs it ``--repeats`` times and prints one JSON line:

  {"T": 5, "seconds_per_meta_step": ..., "peak_memory_mb": ..., "compile_seconds": ..., ...}

``peak_memory_mb`` is the peak resident set size (``ru_maxrss``) of that subprocess: it includes
the Python interpreter, the data, XLA's compiler and the run (jax has no device memory stats on
CPU). ``rss_after_compile_mb`` is the resident size right after compilation, so the difference
bounds what the run itself adds.

Then (unless ``--no-torch``) the same process pair times, interleaved, on the same networks and
batch, in PyTorch (``torch.func.functional_call`` on the stepped parameters,
``create_graph=True``) and in jaxpoison: Algorithm 2's step, the paper's one-step look-ahead
plus the victim's real step (method='algorithm2', per inner step), and the exact meta-step at
T = 1 (method='exact': a fresh victim, one differentiated SGD step, an Adam step of the
generator), and prints the medians and their ratio.

References: Feng, Cai & Zhou, NeurIPS 2019 (Algorithm 2 and its released PyTorch code).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _mnist(n):
    import ml_collections
    import numpy as np

    from jaxpoison import data

    ds = data.load(ml_collections.ConfigDict({"source": "npz", "name": "mnist"}))
    return ds.x_train[:n].astype(np.float32) / 255.0, ds.y_train[:n].astype(np.int32)


def _poison(args, method, steps):
    from jaxpoison.poisons import l2c
    from jaxpoison.threat import LpBall

    return l2c.l2c(
        threat=LpBall(0.3),
        num_classes=10,
        image_shape=(28, 28, 1),
        generator=dict(name="autoencoder", width=args.gen_width),
        victim=dict(name="cnn_mnist", width=args.width),
        inner_optimizer=dict(learning_rate=0.01, momentum=args.momentum, weight_decay=0.0),
        unroll_steps=steps,
        remat=not args.no_remat,
        method=method,
        meta_optimizer=dict(name="adam", learning_rate=1e-4),
    )


def worker(args):
    """One T in this (fresh) process: compile, time, report peak RSS."""
    import jax
    import jax.numpy as jnp

    steps = args.worker_steps
    x, y = _mnist(steps * args.batch)
    batch = {"image": jnp.asarray(x), "label": jnp.asarray(y), "index": jnp.arange(len(y))}
    poison = _poison(args, "exact", steps)
    state = poison.init(jax.random.key(0), batch)
    t0 = time.perf_counter()
    update = jax.jit(poison.update).lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - t0
    rss_compiled = _rss_mb()
    times = []
    for i in range(args.repeats + 1):
        t0 = time.perf_counter()
        state, metrics = update(state, batch, jax.random.key(i + 1))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])
    print(
        json.dumps(
            {
                "T": steps,
                "seconds_per_meta_step": times[len(times) // 2],
                "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "rss_after_compile_mb": rss_compiled,
                "compile_seconds": compile_s,
                "remat": not args.no_remat,
                "victim_width": args.width,
                "generator_width": args.gen_width,
                "inner_batch": args.batch,
                "repeats": args.repeats,
                "memory": "peak RSS of a fresh process (ru_maxrss)",
            }
        ),
        flush=True,
    )


def _torch_models(args):
    """Constructors ``(victim(), generator())`` of the PyTorch twins of the jaxpoison networks."""
    import torch
    from torch import nn

    def c(ch, w):
        return max(1, int(round(ch * w)))

    class MnistCNN(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.c1 = nn.Conv2d(1, c(20, w), 5)
            self.c2 = nn.Conv2d(c(20, w), c(50, w), 5)
            self.f1 = nn.Linear(4 * 4 * c(50, w), c(500, w))
            self.f2 = nn.Linear(c(500, w), 10)

        def forward(self, x):
            x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
            return self.f2(torch.relu(self.f1(x.flatten(1))))

    class Autoencoder(nn.Module):
        """Same layers as jaxpoison.models.generators.ConfuseAutoencoder (SAME padding of an
        even kernel is asymmetric in XLA: pad 1 before, 2 after; here F.pad does the same)."""

        def __init__(self, w, eps):
            super().__init__()
            feats = [c(f, w) for f in (16, 32, 64, 128)]
            self.eps = eps
            chans = [1, *feats]
            self.enc = nn.ModuleList(
                nn.Conv2d(a, b, 4, stride=2) for a, b in zip(chans, feats, strict=False)
            )
            dec = [*feats[-2::-1], 1]
            self.dec = nn.ModuleList(
                nn.Conv2d(a, b, 4) for a, b in zip([feats[-1], *dec[:-1]], dec, strict=True)
            )

        def forward(self, x):
            pad = nn.functional.pad
            h = pad(x, (0, 4, 0, 4))
            for conv in self.enc:
                h = nn.functional.leaky_relu(conv(pad(h, (1, 1, 1, 1))), 0.2)
            for i, conv in enumerate(self.dec):
                h = nn.functional.interpolate(h, scale_factor=2, mode="nearest")
                h = conv(pad(h, (1, 2, 1, 2)))
                if i < len(self.dec) - 1:
                    h = nn.functional.leaky_relu(h, 0.2)
            return self.eps * torch.tanh(h[:, :, :28, :28])

    return (lambda: MnistCNN(args.width)), (lambda: Autoencoder(args.gen_width, 0.3))


def compare_with_torch(args):
    """Median time of Algorithm 2's step: PyTorch (torch.func) vs jaxpoison, interleaved."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from torch.func import functional_call

    torch.set_num_threads(os.cpu_count() or 1)
    steps = args.torch_steps
    x, y = _mnist(steps * args.batch)
    new_victim, new_generator = _torch_models(args)
    clf, gen, frozen = new_victim(), new_generator(), new_generator()
    frozen.load_state_dict(gen.state_dict())
    gen_opt = torch.optim.Adam(gen.parameters(), lr=1e-4)
    clf_opt = torch.optim.SGD(clf.parameters(), lr=0.01, momentum=args.momentum)
    xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2))).contiguous()
    yt = torch.from_numpy(y.astype(np.int64))
    ce = torch.nn.functional.cross_entropy

    def generator_step(victim, xb, yb):
        """One SGD step of `victim` on the poisoned batch, kept in the graph; the stepped
        victim's clean loss differentiated into the generator; an Adam step of the generator."""
        params = dict(victim.named_parameters())
        loss = ce(victim(torch.clamp(xb + gen(xb), 0, 1)), yb)
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        stepped = {k: p - 0.01 * g for (k, p), g in zip(params.items(), grads, strict=True)}
        gen_opt.zero_grad()
        (-ce(functional_call(victim, stepped, (xb,)), yb)).backward()
        gen_opt.step()

    def torch_step(i):
        """Algorithm 2: the look-ahead generator step, then the victim's real step."""
        xb, yb = (
            xt[i * args.batch : (i + 1) * args.batch],
            yt[i * args.batch : (i + 1) * args.batch],
        )
        generator_step(clf, xb, yb)
        with torch.no_grad():
            noisy = torch.clamp(xb + frozen(xb), 0, 1)
        clf_opt.zero_grad()
        ce(clf(noisy), yb).backward()
        clf_opt.step()

    def torch_exact_step(i):
        """The exact meta-step at T = 1, on a fresh victim (as each jaxpoison trial draws one)."""
        generator_step(new_victim(), xt[: args.batch], yt[: args.batch])

    workloads = [
        ("algorithm2 step (one-step look-ahead + victim step)", "algorithm2", steps, torch_step),
        ("exact meta-step, T = 1 (fresh victim, one unrolled step)", "exact", 1, torch_exact_step),
    ]
    for workload, method, unroll, torch_fn in workloads:
        n = unroll * args.batch
        batch = {"image": jnp.asarray(x[:n]), "label": jnp.asarray(y[:n]), "index": jnp.arange(n)}
        poison = _poison(args, method, unroll)
        state = poison.init(jax.random.key(0), batch)
        update = jax.jit(poison.update)
        state, m = update(state, batch, jax.random.key(1))
        jax.block_until_ready(m)
        torch_fn(0)
        jax_t, torch_t = [], []
        for r in range(args.repeats):
            t0 = time.perf_counter()
            state, m = update(state, batch, jax.random.key(r + 2))
            jax.block_until_ready(m)
            jax_t.append((time.perf_counter() - t0) / unroll)
            t0 = time.perf_counter()
            for i in range(unroll):
                torch_fn(i)
            torch_t.append((time.perf_counter() - t0) / unroll)
        jm, tm = float(np.median(jax_t)), float(np.median(torch_t))
        print(
            json.dumps(
                {
                    "workload": workload,
                    "inner_batch": args.batch,
                    "victim_width": args.width,
                    "generator_width": args.gen_width,
                    "remat": not args.no_remat,
                    "torch_seconds_per_step": tm,
                    "jaxpoison_seconds_per_step": jm,
                    "jax_over_torch": jm / tm,
                    "ratios": [j / t for j, t in zip(jax_t, torch_t, strict=True)],
                    "torch_version": torch.__version__,
                    "jax_version": jax.__version__,
                }
            ),
            flush=True,
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 20, 80])
    parser.add_argument("--width", type=float, default=0.5, help="victim width multiplier")
    parser.add_argument("--gen_width", type=float, default=0.5, help="generator width")
    parser.add_argument("--batch", type=int, default=32, help="examples per inner step")
    parser.add_argument("--momentum", type=float, default=0.0, help="victim SGD momentum")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no_remat", action="store_true")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--torch_steps", type=int, default=5)
    parser.add_argument("--worker_steps", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_steps is not None:
        return worker(args)
    passthrough = [
        f"--width={args.width}",
        f"--gen_width={args.gen_width}",
        f"--batch={args.batch}",
        f"--momentum={args.momentum}",
        f"--repeats={args.repeats}",
    ] + (["--no_remat"] if args.no_remat else [])
    for steps in args.steps:
        cmd = [sys.executable, __file__, f"--worker_steps={steps}", *passthrough]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        if out.returncode or not lines:
            print(json.dumps({"T": steps, "error": out.stderr.strip().splitlines()[-1:]}))
        else:
            print(lines[-1], flush=True)
    if not args.no_torch:
        compare_with_torch(args)


if __name__ == "__main__":
    main()
