r"""Times one PGD-AT and one TRADES training epoch of jaxpoison against PyTorch on this CPU.

    python benchmarks/defenses.py                                # both objectives, defaults
    python benchmarks/defenses.py --objectives=trades --reps=5 --json_out=defenses.jsonl
    python benchmarks/defenses.py --model=cnn_cifar@0.25 --num_examples=256 --steps=2 \
        --reps=1 --warmup=0                                      # a smoke run

Workload: the first `num_examples` CIFAR-10 training images of `--data` (default
../shared/data/cifar10.npz; uniform noise when it is missing: timing does not depend on the
pixels), one epoch = num_examples // 128 steps of batch 128 in a random order, SGD momentum
0.9, lr 0.01, weight decay 5e-4, no augmentation. The defender's ball is ℓ∞ ε=8/255 and its
inner search takes `steps` steps of 2/255 on the eval-mode model; the loss is taken in train
mode:
  pgd_at  Madry et al. 2018: PGD on the cross-entropy from a uniform random start, then the
          mean cross-entropy at x + δ*.
  trades  Zhang et al. 2019, β=6: sign ascent on KL(p(x) ‖ p(x + δ)) from 0.001·N(0, I), then
          CE(f(x), y) + β KL(p(x) ‖ p(x + δ*)) over a clean and an adversarial train-mode pass.
jaxpoison runs the `Trainer`'s compiled step (`Trainer.compiled_step`, one seed) with objective
``pgd_at`` or ``trades`` over the training set resident on the device (`TrainData.create`),
the batch indices and step keys drawn as `Trainer.fit` draws them; PyTorch runs
`torch_reference.make_pgd_at_step` / `make_trades_step` on the same images (batches gathered
by index from the resident set, in its own random order). Compilation is excluded from the
epoch times and reported on its own: the first call of the compiled step (trace, compile and
one step) before any timed epoch.

As in `spine.py`, JAX and PyTorch epochs alternate in one process (the CPU is shared), the
medians are reported with the ratio JAX time / PyTorch time and the 1-minute load average,
and every measurement is also one ``JSON {...}`` line (`--json_out` appends them to a file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

from jaxpoison import data, training

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    DATA,
    emit,
    interleaved,
    load1,
    load_images,
    parse_model,
    torch_reference,
    write_json_lines,
)
from spine import BATCH, victim_config  # noqa: E402

EPSILON = 8 / 255
STEP_SIZE = 2 / 255
LEARNING_RATE = 0.01
BETA = 6.0
INIT_SCALE = 1e-3  # TRADES' Gaussian start


def objective_config(name, num_steps):
    """The `victim.objective` config of `name`, every hyperparameter spelled out."""
    ball = {"norm": "linf", "epsilon": EPSILON, "num_steps": num_steps, "step_size": STEP_SIZE}
    if name == "pgd_at":
        return {"name": "pgd_at", "random_start": True, **ball}
    if name == "trades":
        return {"name": "trades", "beta": BETA, "init_scale": INIT_SCALE, **ball}
    raise ValueError(f"Unknown objective {name!r}; use pgd_at or trades.")


class JaxEpoch:
    """One training epoch with the `Trainer`'s compiled step, resuming where the last one ended."""

    def __init__(self, objective, name, width, images, labels, *, num_steps):
        cfg = victim_config(name, width)
        cfg.objective = objective_config(objective, num_steps)
        cfg.optimizer.learning_rate = LEARNING_RATE
        self.trainer = training.Trainer.from_config(
            cfg, num_classes=10, image_shape=images.shape[1:]
        )
        n = len(labels)
        self.steps = n // BATCH
        # Placed as `Trainer.fit` places them (replicated on the mesh), so the step compiles once.
        self.train_data = training.TrainData.create(
            images, labels, None, None, mesh=self.trainer.mesh
        )
        self.step = self.trainer.compiled_step(self.steps, 0, False)
        self.states = self.trainer.init_seeds(jax.random.key(0), 1, self.steps)
        # Per epoch, as `Trainer.fit` draws them: a permutation cut into batches, one key a step.
        self.plan = jax.jit(
            lambda key: (
                data.epoch_batches(jax.random.fold_in(key, 1), n, BATCH)[:, None],
                jax.random.split(jax.random.fold_in(key, 2), (self.steps, 1)),
            )
        )
        self.key = jax.random.key(1)
        jax.block_until_ready(self.plan(self.key))  # compiled here, not in `compile`
        self.epoch = 0
        self.loss = float("nan")

    def _run(self, steps):
        idx, keys = self.plan(jax.random.fold_in(self.key, self.epoch))
        self.epoch += 1
        total = 0.0
        for i in range(steps):
            self.states, metrics = self.step(
                self.states, self.train_data.x_train, self.train_data.y_train, idx[i], keys[i]
            )
            total = total + metrics["loss"]
        jax.block_until_ready((self.states, total))
        return float(np.mean(total)) / steps

    def compile(self):
        """Seconds of the first call of the compiled step (trace, compile, one step)."""
        t = time.perf_counter()
        self._run(1)
        return time.perf_counter() - t

    def __call__(self):
        self.loss = self._run(self.steps)


class TorchEpoch:
    """One training epoch of the PyTorch reference on the same images."""

    def __init__(self, tr, objective, name, width, images, labels, *, num_steps, channels_last):
        torch = tr.torch
        torch.manual_seed(0)
        model = tr.make(name, width=width, channels_last=channels_last)
        common = {
            "epsilon": EPSILON,
            "step_size": STEP_SIZE,
            "num_steps": num_steps,
            "learning_rate": LEARNING_RATE,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "channels_last": channels_last,
        }
        if objective == "pgd_at":
            self.step = tr.make_pgd_at_step(model, **common)
        else:
            self.step = tr.make_trades_step(model, beta=BETA, init_scale=INIT_SCALE, **common)
        self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.y = torch.from_numpy(labels).long()
        self.steps = len(labels) // BATCH
        self.generator = torch.Generator().manual_seed(1)
        self.torch = torch
        self.loss = float("nan")

    def __call__(self):
        order = self.torch.randperm(len(self.y), generator=self.generator)
        total = 0.0
        for i in range(self.steps):
            idx = order[i * BATCH : (i + 1) * BATCH]
            total = total + self.step(self.x, self.y, idx, self.generator)
        self.loss = float(total) / self.steps


def time_objective(objective, args, tr, images, labels, sink):
    name, width = parse_model(args.model)
    jax_epoch = JaxEpoch(objective, name, width, images, labels, num_steps=args.steps)
    compile_s = jax_epoch.compile()
    fns = {"jax": jax_epoch}
    if tr is not None:
        fns["torch"] = TorchEpoch(
            tr,
            objective,
            name,
            width,
            images,
            labels,
            num_steps=args.steps,
            channels_last=bool(args.channels_last),
        )
    load_before = load1()
    times = interleaved(fns, args.reps, warmup=args.warmup)
    row = {"objective": objective, "load": (load_before, load1()), "compile_s": compile_s}
    examples = jax_epoch.steps * BATCH
    for framework, ts in times.items():
        med = statistics.median(ts)
        record = {
            "workload": objective,
            "model": name,
            "width": width,
            "framework": framework,
            "num_examples": examples,
            "batch": BATCH,
            "steps_per_epoch": jax_epoch.steps,
            "inner_steps": args.steps,
            "median_s": med,
            "times_s": [round(t, 4) for t in ts],
            "examples_per_s": examples / med,
            "last_epoch_loss": fns[framework].loss,
        }
        if framework == "jax":
            record["compile_s"] = compile_s
        emit(record, sink)
        row[framework] = record
    if "torch" in row:
        row["ratio"] = row["jax"]["median_s"] / row["torch"]["median_s"]
        per_rep = [j / t for j, t in zip(times["jax"], times["torch"], strict=True)]
        emit(
            {
                "workload": objective,
                "model": name,
                "width": width,
                "ratio_jax_over_torch": row["ratio"],
                "ratio_per_rep": [round(r, 3) for r in per_rep],
            },
            sink,
        )
    return row


def print_table(rows, args):
    nan = float("nan")
    print(
        f"\n{args.model}, {rows[0]['jax']['num_examples']} examples "
        f"({rows[0]['jax']['steps_per_epoch']} steps of {BATCH}), {args.steps} inner steps, "
        f"median of {args.reps}"
    )
    print(
        f"{'objective':9} {'JAX s/ep':>9} {'torch s/ep':>10} {'JAX ex/s':>9} {'torch ex/s':>10} "
        f"{'JAX/torch':>9} {'compile s':>9}  load"
    )
    for r in rows:
        j, t = r["jax"], r.get("torch", {})
        print(
            f"{r['objective']:9} {j['median_s']:9.2f} {t.get('median_s', nan):10.2f} "
            f"{j['examples_per_s']:9.1f} {t.get('examples_per_s', nan):10.1f} "
            f"{r.get('ratio', nan):9.2f} {r['compile_s']:9.1f}  {r['load'][0]}->{r['load'][1]}"
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--objectives", default="pgd_at,trades", help="comma list of pgd_at,trades")
    p.add_argument("--model", default="cnn_cifar", help="name[@width]")
    p.add_argument("--data", default=DATA, help="a CIFAR-10 .npz (x_train, y_train)")
    p.add_argument("--num_examples", type=int, default=1024, help="training set = one epoch")
    p.add_argument("--steps", type=int, default=10, help="steps of the inner maximisation")
    p.add_argument("--reps", type=int, default=3, help="timed epochs per framework")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs after compilation")
    p.add_argument(
        "--channels_last",
        type=int,
        default=1,
        help="PyTorch memory format: 1 = channels-last (the faster here, see docs), 0 = NCHW",
    )
    p.add_argument("--no_torch", action="store_true", help="time jaxpoison only")
    p.add_argument("--json_out", default="", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    objectives = args.objectives.split(",")
    for objective in objectives:
        objective_config(objective, args.steps)  # fail before any work on a typo
    if args.num_examples < BATCH:
        raise SystemExit(f"--num_examples must be at least the batch size {BATCH}.")
    tr = None if args.no_torch else torch_reference()
    if tr is not None:
        print(
            f"torch {tr.torch.__version__}, {tr.torch.get_num_threads()} threads, "
            f"channels_last={bool(args.channels_last)}"
        )
    print(
        f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()}"
    )
    images, labels, source = load_images(args.num_examples, args.data)
    print(f"data: {source}")
    sink = []
    rows = [time_objective(o, args, tr, images, labels, sink) for o in objectives]
    print_table(rows, args)
    write_json_lines(args.json_out, sink)


if __name__ == "__main__":
    main()
