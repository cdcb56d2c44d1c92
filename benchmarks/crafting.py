r"""Crafting throughput of P1, TAP, error-minimizing and REM noise, against PyTorch.

    python benchmarks/crafting.py                                # all four workloads, defaults
    python benchmarks/crafting.py --workloads=p1 --p1_steps=100 --reps=3
    python benchmarks/crafting.py --model=cnn_cifar@0.5 --num_examples=2048

Workloads (CIFAR-10 shapes, fp32, the first `num_examples` images of `--data` (default
../shared/data/cifar10.npz) when it exists, uniform noise images otherwise: timing does not
depend on the pixels):
  p1     the `adversarial` poison (P1, Tao et al. 2021): targeted PGD ℓ∞ toward y+1 mod 10,
         ε=8/255, step ε/5, `p1_steps` steps, random start, on the eval-mode crafting model,
         over all examples in batches of `batch_size`: `poisons.craft` (the library's crafting
         engine, one jitted call per batch) against `torch_reference.make_pgd(maximize=False)`
         on the same batches.
  minmin one pass of sample-wise `error_minimizing` noise (Huang et al. 2021): per batch an SGD
         step of the crafting model on the perturbed batch (10 per pass, spread over it), PGD
         descent on δ (`minmin_steps` steps of ε/10), the accuracy on the perturbed batch:
         `poisons.craft` with ``num_epochs=1`` against
         `torch_reference.make_error_minimizing_pass`.
  tap    the `tap` poison (Fowl et al. 2021): P1 with a random translation and flip inside the
         loss at every step and `tap_restarts` restarts (the best kept per example), `tap_steps`
         steps of ε/20 (paper: 250 steps, 8 restarts): `poisons.craft` against
         `torch_reference.make_tap_attack`.
  rem    one pass of `robust_error_minimizing` noise (Fu et al. 2022), the model trained on every
         batch with PGD-AT at ε/2: per batch `rem_steps` descent steps on δ of 2ε/`rem_steps`,
         each over `rem_samples` augmentations with a `rem_adversarial_steps`-step PGD adversary
         (paper: 10, 5, 10): `poisons.craft` with ``num_epochs=1`` against
         `torch_reference.make_rem_pass`.

JAX and PyTorch repetitions alternate in one process and the medians are reported with the
ratio JAX time / PyTorch time and the 1-minute load average; each measurement is also one
``JSON {...}`` line. Compilation is excluded (one untimed warm-up call of each).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp

from jaxpoison import models, poisons, threat

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (  # noqa: E402
    DATA,
    emit,
    interleaved,
    load1,
    load_images,
    parse_model,
    torch_reference,
)

EPSILON = 8 / 255


def jax_p1(name, width, images, labels, args):
    module = models.make(name, num_classes=10, width=width)
    variables = models.init(module, jax.random.key(0), images.shape[1:])
    ball = threat.make(epsilon=EPSILON)
    poison = poisons.make(
        "adversarial",
        threat=ball,
        num_classes=10,
        image_shape=images.shape[1:],
        apply_fn=models.make_apply_fn(module),
        variables=variables,
        num_steps=args.p1_steps,
    )
    return _jax_craft(poison, images, labels, args)


def jax_minmin(name, width, images, labels, args):
    poison = poisons.make(
        "error_minimizing",
        threat=threat.make(epsilon=EPSILON),
        num_classes=10,
        image_shape=images.shape[1:],
        model={"name": name, "width": width},
        num_epochs=1,
        num_steps=args.minmin_steps,
        train_steps=10,
    )
    return _jax_craft(poison, images, labels, args)


def torch_p1(tr, name, width, images, labels, args):
    model = tr.make(name, width=width, channels_last=args.channels_last)
    attack = tr.make_pgd(
        model,
        epsilon=EPSILON,
        step_size=EPSILON / 5,
        num_steps=args.p1_steps,
        maximize=False,
        channels_last=args.channels_last,
    )
    return _torch_targeted(tr, attack, images, labels, args)


def _torch_targeted(tr, attack, images, labels, args):
    """Runs `attack` toward y + 1 mod 10 over the images in batches."""
    torch = tr.torch
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    targets = torch.from_numpy((labels + 1) % 10).long()
    gen = torch.Generator().manual_seed(0)

    def run():
        for i in range(0, len(x), args.batch_size):
            attack(x[i : i + args.batch_size], targets[i : i + args.batch_size], gen)

    return run


def torch_minmin(tr, name, width, images, labels, args):
    torch = tr.torch
    model = tr.make(name, width=width, channels_last=args.channels_last)
    craft_pass = tr.make_error_minimizing_pass(
        model,
        epsilon=EPSILON,
        step_size=EPSILON / 10,
        num_steps=args.minmin_steps,
        train_steps=10,
        batch_size=args.batch_size,
        channels_last=args.channels_last,
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))

    def run():
        delta = (torch.rand(x.shape) * 2 - 1) * EPSILON
        craft_pass(x, y, delta, order)

    return run


def jax_tap(name, width, images, labels, args):
    module = models.make(name, num_classes=10, width=width)
    poison = poisons.make(
        "tap",
        threat=threat.make(epsilon=EPSILON),
        num_classes=10,
        image_shape=images.shape[1:],
        apply_fn=models.make_apply_fn(module),
        variables=models.init(module, jax.random.key(0), images.shape[1:]),
        num_steps=args.tap_steps,
        num_restarts=args.tap_restarts,
    )
    return _jax_craft(poison, images, labels, args)


def jax_rem(name, width, images, labels, args):
    poison = poisons.make(
        "robust_error_minimizing",
        threat=threat.make(epsilon=EPSILON),
        num_classes=10,
        image_shape=images.shape[1:],
        model={"name": name, "width": width},
        num_epochs=1,
        num_steps=args.rem_steps,
        num_samples=args.rem_samples,
        adversarial_steps=args.rem_adversarial_steps,
    )
    return _jax_craft(poison, images, labels, args)


def _jax_craft(poison, images, labels, args):
    x, y = jnp.asarray(images), jnp.asarray(labels)

    def run():
        state, _ = poisons.craft(
            poison, x, y, key=jax.random.key(1), batch_size=args.batch_size, progress=False
        )
        jax.block_until_ready(state)

    return run


def torch_tap(tr, name, width, images, labels, args):
    model = tr.make(name, width=width, channels_last=args.channels_last)
    attack = tr.make_tap_attack(
        model,
        epsilon=EPSILON,
        step_size=EPSILON / 20,
        num_steps=args.tap_steps,
        num_restarts=args.tap_restarts,
        channels_last=args.channels_last,
    )
    return _torch_targeted(tr, attack, images, labels, args)


def torch_rem(tr, name, width, images, labels, args):
    torch = tr.torch
    model = tr.make(name, width=width, channels_last=args.channels_last)
    craft_pass = tr.make_rem_pass(
        model,
        epsilon=EPSILON,
        step_size=2 * EPSILON / args.rem_steps,
        num_steps=args.rem_steps,
        adversarial_epsilon=EPSILON / 2,
        adversarial_step_size=EPSILON / args.rem_adversarial_steps,
        adversarial_steps=args.rem_adversarial_steps,
        num_samples=args.rem_samples,
        batch_size=args.batch_size,
        channels_last=args.channels_last,
    )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=gen)

    def run():
        delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * EPSILON
        craft_pass(x, y, delta, order, gen)

    return run


WORKLOADS = {
    "p1": (jax_p1, torch_p1),
    "minmin": (jax_minmin, torch_minmin),
    "tap": (jax_tap, torch_tap),
    "rem": (jax_rem, torch_rem),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma list of workloads")
    p.add_argument("--model", default="cnn_cifar", help="crafting model, name[@width]")
    p.add_argument("--data", default=DATA, help="a CIFAR-10 .npz (x_train, y_train)")
    p.add_argument("--num_examples", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--p1_steps", type=int, default=20, help="PGD steps of P1 (paper: 100)")
    p.add_argument("--minmin_steps", type=int, default=20, help="PGD steps per batch and pass")
    p.add_argument("--tap_steps", type=int, default=20, help="PGD steps of TAP (paper: 250)")
    p.add_argument("--tap_restarts", type=int, default=2, help="restarts of TAP (paper: 8)")
    p.add_argument("--rem_steps", type=int, default=5, help="REM descent steps (paper: 10)")
    p.add_argument("--rem_samples", type=int, default=2, help="REM augmentations (paper: 5)")
    p.add_argument("--rem_adversarial_steps", type=int, default=5, help="REM PGD (paper: 10)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--channels_last", type=int, default=1)
    p.add_argument("--no_torch", action="store_true", help="time jaxpoison only")
    args = p.parse_args(argv)

    tr = None if args.no_torch else torch_reference()
    if tr is not None:
        tr.torch.set_num_threads(os.cpu_count())
    name, width = parse_model(args.model)
    images, labels, source = load_images(args.num_examples, args.data)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs")
    print(f"data: {source}")
    sink, rows = [], []
    for workload in args.workloads.split(","):
        if workload not in WORKLOADS:
            raise SystemExit(f"Unknown workload {workload!r}; use {','.join(WORKLOADS)}.")
        make_jax, make_torch = WORKLOADS[workload]
        fns = {"jax": make_jax(name, width, images, labels, args)}
        if tr is not None:
            fns["torch"] = make_torch(tr, name, width, images, labels, args)
        load_before = load1()
        times = interleaved(fns, args.reps)
        med = {k: statistics.median(v) for k, v in times.items()}
        for framework, t in med.items():
            emit(
                {
                    "workload": workload,
                    "model": args.model,
                    "framework": framework,
                    "num_examples": args.num_examples,
                    "median_s": t,
                    "examples_per_s": args.num_examples / t,
                    "times_s": times[framework],
                },
                sink,
            )
        ratio = med["jax"] / med["torch"] if "torch" in med else float("nan")
        rows.append((workload, med, ratio, f"{load_before}->{load1()}"))

    n = args.num_examples
    steps = {
        "p1": f"{args.p1_steps} PGD steps",
        "minmin": f"1 pass, {args.minmin_steps} steps",
        "tap": f"{args.tap_steps} steps x {args.tap_restarts}",
        "rem": f"1 pass, {args.rem_steps}x{args.rem_samples}x{args.rem_adversarial_steps}",
    }
    print(f"\n{'workload':8} {'what':22} {'JAX s':>8} {'torch s':>8} {'JAX ex/s':>9} "
          f"{'torch ex/s':>10} {'JAX/torch':>9}  load")  # fmt: skip
    for workload, med, ratio, load in rows:
        t_torch = med.get("torch", float("nan"))
        print(
            f"{workload:8} {steps[workload]:22} {med['jax']:8.2f} {t_torch:8.2f} "
            f"{n / med['jax']:9.1f} {n / t_torch:10.1f} {ratio:9.2f}  {load}"
        )


if __name__ == "__main__":
    main()
