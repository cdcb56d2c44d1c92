r"""A/B of `jaxpoison.ops` formulations on whole workloads: the current ops against the ops with
one formulation switched off (the code before it), interleaved, medians.

    python benchmarks/ops_ab.py --models=cnn_cifar,vgg11 --workloads=train,pgd --reps=5
    python benchmarks/ops_ab.py --switch=dw_chunk --models=resnet18@0.25 --workloads=train

``--switch``: ``dense`` (the tiny-image dense-matrix path, `ops._DENSE_MAX_ELEMENTS`),
``dw_chunk`` (the kernel gradient's patch matrix built per cache-sized chunk of the batch,
`ops._DW_CHUNK_ELEMENTS`) or ``onednn`` (the oneDNN kernels of `jaxpoison._cpu_kernels` against the
XLA formulation, `ops.set_conv_backend`). The switch is read when a function is traced, so both
variants are compiled in one process and timed in alternation (the CPU is shared; alternation
exposes both to the same load). The jaxpoison train step here is `Trainer.train_step` jitted for
one seed; PGD is `attacks.pgd`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison import attacks, models, objectives, ops, threat, train_state

BATCH = 128
SHAPE = (32, 32, 3)
# --switch: the `jaxpoison.ops` variable and the value that turns a formulation off.
SWITCHES = {
    "dense": ("_DENSE_MAX_ELEMENTS", 0),
    "dw_chunk": ("_DW_CHUNK_ELEMENTS", 0),
    "onednn": ("_conv_backend", "xla"),
}


def build(name, width, workload):
    module = models.make(name, num_classes=10, width=width)
    apply_fn = models.make_apply_fn(module)
    variables = models.init(module, jax.random.key(0), SHAPE)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.random((BATCH, *SHAPE), np.float32))
    y = jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)
    if workload == "pgd":
        ball = threat.LpBall(8 / 255)
        loss_fn = attacks.model_loss(apply_fn, variables)
        fn = jax.jit(
            lambda x, y, key: attacks.pgd(
                loss_fn, x, y, key=key, threat=ball, num_steps=10, step_size=2 / 255
            )
        )
        fn = fn.lower(x, y, jax.random.key(0)).compile()
        return lambda: fn(x, y, jax.random.key(0)).block_until_ready()
    objective = objectives.make("erm")
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9))
    params = variables.pop("params")
    state = train_state.TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params))

    def step(state, batch, key):
        def loss_fn(p):
            return objective({"params": p, **state.model_state}, batch, key, apply_fn=apply_fn)

        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = train_state.TrainState(
            state.step + 1,
            optax.apply_updates(state.params, updates),
            aux["model_state"],
            opt_state,
        )
        return new, aux["metrics"]

    batch = {"image": x, "label": y}
    fn = jax.jit(step).lower(state, batch, jax.random.key(0)).compile()
    return lambda: jax.block_until_ready(fn(state, batch, jax.random.key(0)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn_cifar,vgg11", help="comma list of name[@width]")
    p.add_argument("--workloads", default="train,pgd")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--switch", default="dense", choices=sorted(SWITCHES))
    args = p.parse_args(argv)
    switch, off = SWITCHES[args.switch]
    default = getattr(ops, switch)
    for spec in args.models.split(","):
        name, _, width = spec.partition("@")
        width = float(width) if width else 1.0
        for workload in args.workloads.split(","):
            fns = {}
            for variant, value in (("before", off), ("now", default)):
                setattr(ops, switch, value)
                fns[variant] = build(name, width, workload)
            setattr(ops, switch, default)
            load = os.getloadavg()[0]
            times = {k: [] for k in fns}
            for f in fns.values():
                f()
            for _ in range(args.reps):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            rec = {
                "model": spec,
                "workload": workload,
                "before_s": med["before"],
                "switch": args.switch,
                "now_s": med["now"],
                "speedup": med["before"] / med["now"],
                "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
                "load1": (round(load, 2), round(os.getloadavg()[0], 2)),
            }
            print(
                f"{spec:14} {workload:6} before {med['before']:8.3f} s  now {med['now']:8.3f} s"
                f"  speedup {rec['speedup']:5.2f}x  load {rec['load1']}"
            )
            print("JSON " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
