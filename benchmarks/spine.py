r"""Times jaxpoison against the PyTorch reference on one device: train step, PGD-10, seeds study.

    python benchmarks/spine.py                                   # everything, default sizes
    python benchmarks/spine.py --workloads=train,pgd --models=cnn_cifar,vgg11 --reps=5
    python benchmarks/spine.py --workloads=seeds --seeds=1,4,8 --seed_model=cnn_cifar
    python benchmarks/spine.py --models=resnet18@0.25            # a model at a width

On a GPU machine (jax[cuda] and a CUDA build of torch installed), the same table on the GPU,
both frameworks on the one device, PyTorch synchronised after every call as JAX blocks:

    python benchmarks/spine.py --device=cuda --workloads=train,pgd,seeds \
        --models=cnn_cifar,vgg11,resnet18 --reps=20 --json_out=gpu.jsonl

Workloads (batch 128, CIFAR shapes 32x32x3, fp32):
  train  one SGD step (momentum 0.9, weight decay 5e-4, cross-entropy), train-mode model: the
         jaxpoison trainer's compiled multi-seed step at S=1 (`Trainer.compiled_step`) against
         `torch_reference.make_train_step`.
  pgd    PGD-10 ℓ∞ (ε=8/255, step 2/255, random start) on the eval-mode model:
         `jit(attacks.pgd)` against `torch_reference.make_pgd`.
  seeds  the trainer's compiled step for S seeds at once with ``seed_strategy`` 'vmap' and
         'map', against S sequential single-seed steps (S x the S=1 step time); jaxpoison only.

JAX and PyTorch repetitions are interleaved in one process (the CPU is shared, so the load
changes over time; interleaving exposes both frameworks to the same load) and the medians are
reported with the 1-minute load average at the time. Each measurement is also printed as one
JSON line (prefix ``JSON ``), for `--json_out` or grep. FLOP counts are the model's
convolutions and linear layers (2 x multiply-adds): a train step is forward + input gradient +
kernel gradient (3F minus the first layer's input gradient), a PGD step is forward + input
gradient (2F); achieved GFLOP/s is compared with this CPU's measured 2048² sgemm.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison import attacks, models, threat, training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    emit,
    interleaved,
    load1,
    parse_model,
    torch_reference,
    write_json_lines,
)

BATCH = 128
IMAGE_SHAPE = (32, 32, 3)
NUM_TRAIN = 1024


# ----- sgemm --------------------------------------------------------------------------------------


def sgemm(sink, reps, torch_ref, device="cpu"):
    n = 2048
    rng = np.random.default_rng(0)
    a = rng.random((n, n), np.float32)
    b = rng.random((n, n), np.float32)
    fns = {"numpy": lambda: a @ b} if device == "cpu" else {}
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jdot = jax.jit(jnp.dot)
    fns["jax"] = lambda: jdot(ja, jb).block_until_ready()
    if torch_ref is not None:
        torch = torch_ref.torch
        dev = torch.device(device)
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)

        def torch_gemm():
            ta @ tb
            _synchronize(torch, dev)

        fns["torch"] = torch_gemm
    times = interleaved(fns, reps)
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = 2 * n**3 / med / 1e9
        emit(
            {"workload": "sgemm2048", "framework": name, "median_s": med, "gflops": result[name]},
            sink,
        )
    return result


# ----- jaxpoison workloads ------------------------------------------------------------------------


def victim_config(name, width, seed_strategy="auto"):
    config = ml_collections.ConfigDict()
    config.model = {"name": name, "width": width}
    config.objective = {"name": "erm"}
    config.optimizer = {
        "learning_rate": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "constant",
    }
    config.epochs = 1
    config.batch_size = BATCH
    config.seed_strategy = seed_strategy
    return config


class JaxTrain:
    """The trainer's compiled step for `num_seeds` seeds, on a resident random training set."""

    def __init__(self, name, width, *, num_seeds=1, seed_strategy="auto"):
        cfg = victim_config(name, width, seed_strategy)
        self.trainer = training.Trainer.from_config(cfg, num_classes=10, image_shape=IMAGE_SHAPE)
        steps = NUM_TRAIN // BATCH
        self.step = self.trainer.compiled_step(steps, 0, False)
        # Placed as `Trainer.fit` places them, so the first step's output has the input's
        # sharding and the step is compiled once.
        self.states = jax.device_put(
            self.trainer.init_seeds(jax.random.key(0), num_seeds, steps),
            NamedSharding(self.trainer.mesh, P()),
        )
        rng = np.random.default_rng(1)
        self.x = jnp.asarray(rng.random((NUM_TRAIN, *IMAGE_SHAPE), np.float32))
        self.y = jnp.asarray(rng.integers(0, 10, NUM_TRAIN), jnp.int32)
        self.num_seeds = num_seeds
        self.keys = jax.random.split(jax.random.key(2), num_seeds)
        self.i = 0

    def __call__(self):
        self.i += 1
        idx = jax.random.randint(jax.random.key(self.i), (self.num_seeds, BATCH), 0, NUM_TRAIN)
        self.states, metrics = self.step(self.states, self.x, self.y, idx, self.keys)
        jax.block_until_ready((self.states, metrics))


class JaxPGD:
    def __init__(self, name, width, *, num_steps=10):
        module = models.make(name, num_classes=10, width=width)
        variables = models.init(module, jax.random.key(0), IMAGE_SHAPE)
        apply_fn = models.make_apply_fn(module)
        ball = threat.LpBall(8 / 255)

        @jax.jit
        def attack(variables, x, y, key):
            loss_fn = attacks.model_loss(apply_fn, variables)
            return attacks.pgd(
                loss_fn, x, y, key=key, threat=ball, num_steps=num_steps, step_size=2 / 255
            )

        rng = np.random.default_rng(1)
        self.args = (
            variables,
            jnp.asarray(rng.random((BATCH, *IMAGE_SHAPE), np.float32)),
            jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32),
        )
        self.attack = attack
        self.i = 0

    def __call__(self):
        self.i += 1
        self.attack(*self.args, jax.random.key(self.i)).block_until_ready()


# ----- PyTorch workloads --------------------------------------------------------------------------


def _synchronize(torch, device):
    """Waits for the device's queued work (CUDA runs asynchronously, as JAX dispatches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchTrain:
    def __init__(self, tr, name, width, channels_last, device="cpu"):
        torch = tr.torch
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = tr.make(name, width=width, channels_last=channels_last).to(self.device)
        self.step = tr.make_train_step(self.model, learning_rate=0.01, channels_last=channels_last)
        self.x = torch.rand(NUM_TRAIN, 3, 32, 32, device=self.device)
        self.y = torch.randint(0, 10, (NUM_TRAIN,), device=self.device)
        self.torch = torch

    def __call__(self):
        self.step(self.x, self.y, self.torch.randint(0, NUM_TRAIN, (BATCH,), device=self.device))
        _synchronize(self.torch, self.device)


class TorchPGD:
    def __init__(self, tr, name, width, channels_last, *, num_steps=10, device="cpu"):
        torch = tr.torch
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = tr.make(name, width=width, channels_last=channels_last).to(self.device)
        self.attack = tr.make_pgd(self.model, num_steps=num_steps, channels_last=channels_last)
        self.x = torch.rand(BATCH, 3, 32, 32, device=self.device)
        self.y = torch.randint(0, 10, (BATCH,), device=self.device)
        self.torch = torch

    def __call__(self):
        self.attack(self.x, self.y)
        _synchronize(self.torch, self.device)


def model_flops(tr, name, width):
    """(forward FLOPs per example, first conv's FLOPs per example), from the torch reference
    (identical architecture); None without torch."""
    if tr is None:
        return None
    return tr.forward_flops(tr.make(name, width=width, channels_last=False))


# ----- studies ------------------------------------------------------------------------------------


def head_to_head(workload, spec, args, tr, sink, rows):
    name, width = parse_model(spec)
    flops = model_flops(tr, name, width)
    if workload == "train":
        fns = {"jax": JaxTrain(name, width)}
        if tr is not None:
            fns["torch"] = TorchTrain(tr, name, width, args.channels_last, args.device)
        work = None if flops is None else BATCH * (3 * flops[0] - flops[1])
    else:
        fns = {"jax": JaxPGD(name, width, num_steps=args.pgd_steps)}
        if tr is not None:
            fns["torch"] = TorchPGD(
                tr, name, width, args.channels_last, num_steps=args.pgd_steps, device=args.device
            )
        work = None if flops is None else BATCH * args.pgd_steps * 2 * flops[0]
    load_before = load1()
    times = interleaved(fns, args.reps, warmup=args.warmup)
    row = {"workload": workload, "model": spec, "load": (load_before, load1())}
    for fw, ts in times.items():
        med = statistics.median(ts)
        rec = {
            "workload": workload,
            "model": name,
            "width": width,
            "framework": fw,
            "batch": BATCH,
            "median_s": med,
            "times_s": [round(t, 4) for t in ts],
            "examples_per_s": BATCH / med,
        }
        if work is not None:
            rec["gflop"] = work / 1e9
            rec["gflops_per_s"] = work / med / 1e9
        emit(rec, sink)
        row[fw] = rec
    if "torch" in row:
        ratio = row["jax"]["median_s"] / row["torch"]["median_s"]
        per_rep = [j / t for j, t in zip(times["jax"], times["torch"], strict=True)]
        emit(
            {
                "workload": workload,
                "model": name,
                "width": width,
                "ratio_jax_over_torch": ratio,
                "ratio_per_rep": [round(r, 3) for r in per_rep],
            },
            sink,
        )
        row["ratio"] = ratio
    rows.append(row)


def seeds_study(args, sink, tr):
    name, width = parse_model(args.seed_model)
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    fns = {}
    for s in seeds:
        for strat in strategies:
            if s == 1 and strat != strategies[0]:
                continue
            fns[(s, strat)] = JaxTrain(name, width, num_seeds=s, seed_strategy=strat)
    load_before = load1()
    times = interleaved(fns, args.reps, warmup=args.warmup)
    t1 = statistics.median(times[(1, strategies[0])])
    rows = []
    for (s, strat), ts in times.items():
        med = statistics.median(ts)
        rec = {
            "workload": "seeds",
            "model": name,
            "width": width,
            "num_seeds": s,
            "seed_strategy": strat if s > 1 else "single",
            "median_s": med,
            "times_s": [round(t, 4) for t in ts],
            "per_seed_examples_per_s": s * BATCH / med,
            "sequential_s": s * t1,
            "speedup_vs_sequential": s * t1 / med,
        }
        emit(rec, sink)
        rows.append(rec)
    return rows, (load_before, load1())


# ----- printing -----------------------------------------------------------------------------------


def print_tables(gemm, rows, seed_rows, seed_load):
    print("\nsgemm 2048² (GFLOP/s): " + ", ".join(f"{k} {v:.1f}" for k, v in gemm.items()))
    if rows:
        print(
            f"\n{'workload':8} {'model':16} {'JAX s':>8} {'torch s':>8} {'JAX ex/s':>9} "
            f"{'torch ex/s':>10} {'JAX/torch':>9} {'JAX GF/s':>9} {'torch GF/s':>10}  load"
        )
        for r in rows:
            j, t = r["jax"], r.get("torch", {})
            print(
                f"{r['workload']:8} {r['model']:16} {j['median_s']:8.3f} "
                f"{t.get('median_s', float('nan')):8.3f} {j['examples_per_s']:9.1f} "
                f"{t.get('examples_per_s', float('nan')):10.1f} "
                f"{r.get('ratio', float('nan')):9.2f} {j.get('gflops_per_s', float('nan')):9.1f} "
                f"{t.get('gflops_per_s', float('nan')):10.1f}  {r['load'][0]}->{r['load'][1]}"
            )
    if seed_rows:
        print(
            f"\nseeds ({seed_rows[0]['model']}@{seed_rows[0]['width']}, batch {BATCH}, "
            f"load {seed_load[0]}->{seed_load[1]})"
        )
        print(
            f"{'S':>3} {'strategy':8} {'step s':>8} {'S x single s':>12} {'per-seed ex/s':>13} "
            f"{'vs sequential':>13}"
        )
        for r in seed_rows:
            print(
                f"{r['num_seeds']:3d} {r['seed_strategy']:8} {r['median_s']:8.3f} "
                f"{r['sequential_s']:12.3f} {r['per_seed_examples_per_s']:13.1f} "
                f"{r['speedup_vs_sequential']:12.2f}x"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="train,pgd,seeds", help="comma list of train,pgd,seeds")
    p.add_argument("--models", default="cnn_cifar,vgg11", help="comma list of name[@width]")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per framework")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    p.add_argument("--pgd_steps", type=int, default=10)
    p.add_argument("--seeds", default="1,4,8", help="seed counts of the seeds study")
    p.add_argument("--strategies", default="map,vmap", help="seed strategies of the seeds study")
    p.add_argument("--seed_model", default="cnn_cifar", help="name[@width] for the seeds study")
    p.add_argument(
        "--channels_last",
        type=int,
        default=1,
        help="PyTorch memory format: 1 = channels-last (the faster here, see docs), 0 = NCHW",
    )
    p.add_argument("--no_torch", action="store_true", help="time jaxpoison only")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where PyTorch runs; JAX runs on its default backend, which must match",
    )
    p.add_argument("--json_out", default="", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    if jax.default_backend() != ("gpu" if args.device == "cuda" else "cpu"):
        p.error(
            f"--device={args.device} but JAX runs on {jax.default_backend()}: both frameworks "
            "must time the same device (install jax[cuda12] for --device=cuda)."
        )
    tr = None if args.no_torch else torch_reference()
    if tr is not None and args.device == "cuda":
        print(f"torch on {tr.torch.cuda.get_device_name()}")
    if tr is not None:
        print(
            f"torch {tr.torch.__version__}, {tr.torch.get_num_threads()} threads, "
            f"channels_last={bool(args.channels_last)}"
        )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()}"
    )
    sink = []
    gemm = sgemm(sink, max(3, args.reps), tr, args.device)
    workloads = args.workloads.split(",")
    rows = []
    for workload in ("train", "pgd"):
        if workload in workloads:
            for spec in args.models.split(","):
                head_to_head(workload, spec, args, tr, sink, rows)
    seed_rows, seed_load = [], None
    if "seeds" in workloads:
        seed_rows, seed_load = seeds_study(args, sink, tr)
    print_tables(gemm, rows, seed_rows, seed_load)
    write_json_lines(args.json_out, sink)


if __name__ == "__main__":
    main()
