r"""Our AutoAttack against torchattacks' on the same trained model and images: robust accuracy
and time.

    python benchmarks/autoattack.py --workdir=W --run=fast_at/clean            # every part
    python benchmarks/autoattack.py --workdir=W --run=fast_at/clean --parts=ours,torchattacks \
        --num_examples=500
    python benchmarks/autoattack.py --workdir=W --run=fast_at/clean --parts=timing \
        --time_examples=100 --reps=3

The model is seed `--seed` of run `--run` of a finished (or checkpointed) grid workdir (e.g. of
``configs/defenses_cifar10.py:family``), restored from its checkpoint, exported to PyTorch with
`jaxpoison.interop.pytorch.to_torch` (the largest logit difference on the images is printed), and
attacked on the first `--num_examples` images of the workdir's test set at the config's ℓ∞ or ℓ2
threat.

Accuracy (``--parts=ours,torchattacks``), each number the robust accuracy (%) on those images:
  - ours: `jaxpoison.evaluation.autoattack.autoattack` with the standard budgets (APGD 100
    iterations, 1 restart, 9 target classes; Square 5,000 queries), jitted over batches of
    `--batch_size`, and its accuracy after each attack; and PGD-20 (20 steps of 2.5 ε / 20 from
    a random start, the ``risk`` evaluator's attack);
  - torchattacks at the reference's budgets: its APGD / APGDT / FAB (multi-targeted) / Square
    in a ``MultiAttack`` (each attack only on the points still robust) with 100 iterations and
    Square's 5,000 queries without the rescaled schedule, the settings of fra31/auto-attack's
    standard version, for the attacks our ensemble has (``autoattack.STANDARD``); its accuracy
    after each attack comes from the ``MultiAttack``'s records;
  - torchattacks' ``AutoAttack(version='standard')`` as shipped (APGD-CE, APGD-T, FAB-T,
    Square): torchattacks 3.5.1 builds its APGD, APGD-T and FAB with their default 10
    iterations (the reference: 100) and Square with the rescaled window schedule.
Timing (``--parts=timing``): our jitted ensemble and torchattacks' MultiAttack of the same
attacks at the same budgets, on the first `--time_examples` images, alternating (`--reps`
rounds after one warm-up call each); our compile time (the first call) is reported apart. The
medians, their ratio (ours / torchattacks) and the 1-minute load average are printed, with one
``JSON {...}`` line per measurement (`--json_out` appends them to a file).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpoison import checkpointing, data, models, specs, threat, training
from jaxpoison.attacks import pgd
from jaxpoison.attacks.pgd import model_loss
from jaxpoison.evaluation import autoattack as aa
from jaxpoison.interop import pytorch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import emit, interleaved, load1, write_json_lines  # noqa: E402

torchattacks = __import__("torchattacks")
torch = pytorch.torch
NORMS = {"linf": "Linf", "l2": "L2"}


def restore(workdir, run, seed):
    """(module, variables of seed `seed`, test images NHWC float, labels, threat) of `run`."""
    workdir = Path(workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    dataset = data.load(config.data)
    sizes = dict(num_classes=dataset.num_classes, image_shape=dataset.image_shape)
    trainer = training.Trainer.from_config(specs.victim(config, **sizes), **sizes)
    root = workdir / "checkpoints" / run.replace("/", "__")
    dirs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    if len(dirs) != 1:
        raise SystemExit(f"{root}: expected one checkpoint directory, found {dirs}.")
    template = trainer.init_seeds(jax.random.key(0), config.victim.num_seeds, 1)
    manager = checkpointing.Manager(dirs[0])
    states, _, step = manager.restore(template)
    manager.close()
    state = jax.tree.map(lambda a: np.asarray(a[seed]), states)
    variables = {"params": state.params, **state.model_state}
    print(f"restored {run} seed {seed} from {dirs[0]} (step {step})")
    tm = threat.LpBall(epsilon=float(config.threat.epsilon), norm=config.threat.norm)
    x = np.asarray(dataset.x_test, np.float32) / 255
    return trainer.module, variables, x, np.asarray(dataset.y_test), tm


def ours_fn(module, variables, tm, num_classes, batch_size):
    """``(x, y, key) -> dict`` of numpy arrays: our ensemble over batches (jitted per batch)."""

    def logits_fn(images):
        return module.apply(variables, images, train=False)

    run = jax.jit(
        lambda x, y, key: aa.autoattack(
            logits_fn, x, y, key=key, threat=tm, num_classes=num_classes
        )
    )

    def attack(x, y, key):
        outs, t0 = [], time.perf_counter()
        for i in range(0, len(x), batch_size):
            out = run(jnp.asarray(x[i : i + batch_size]), jnp.asarray(y[i : i + batch_size]), key)
            outs.append(jax.device_get(out))
            print(f"  ours: batch {i // batch_size + 1} done at {time.perf_counter() - t0:.0f} s")
        return {
            "correct": np.concatenate([o["correct"] for o in outs]),
            "robust": np.concatenate([o["robust"] for o in outs]),
            "flipped": {
                a: np.concatenate([o["flipped"][a] for o in outs]) for a in outs[0]["flipped"]
            },
        }

    return attack


def pgd20(module, variables, x, y, tm, key, batch_size):
    """Robust accuracy under PGD-20 (2.5 ε / 20 steps, random start), as the risk evaluator."""
    loss_fn = model_loss(models.make_apply_fn(module), variables)
    run = jax.jit(
        lambda x, y: (
            jnp.argmax(
                module.apply(
                    variables,
                    x
                    + pgd(
                        loss_fn,
                        x,
                        y,
                        key=key,
                        threat=tm,
                        num_steps=20,
                        step_size=2.5 * tm.epsilon / 20,
                    ),
                ),
                -1,
            )
            == y
        )
    )
    return np.concatenate(
        [
            np.asarray(run(jnp.asarray(x[i : i + batch_size]), jnp.asarray(y[i : i + batch_size])))
            for i in range(0, len(x), batch_size)
        ]
    )


def torch_attacks(net, tm, names, num_classes, seed=0):
    """torchattacks' attacks of our ensemble's `names`, at the reference's standard budgets."""
    norm, eps = NORMS[tm.norm], float(tm.epsilon)
    make = {
        "apgd-ce": lambda: torchattacks.APGD(
            net, norm=norm, eps=eps, steps=100, loss="ce", seed=seed
        ),
        "apgd-dlr": lambda: torchattacks.APGD(
            net, norm=norm, eps=eps, steps=100, loss="dlr", seed=seed
        ),
        "apgd-t": lambda: torchattacks.APGDT(
            net, norm=norm, eps=eps, steps=100, n_classes=num_classes, seed=seed
        ),
        "fab-t": lambda: torchattacks.FAB(
            net,
            norm=norm,
            eps=eps,
            steps=100,
            multi_targeted=True,
            n_classes=num_classes,
            seed=seed,
        ),
        "square": lambda: torchattacks.Square(
            net, norm=norm, eps=eps, n_queries=5000, resc_schedule=False, seed=seed
        ),
    }
    return [make[n]() for n in names]


def torch_robust(attack, net, x, y):
    """Per-example robustness (bool [N]) of `net` on the points `attack` returns."""
    xt, yt = pytorch.to_nchw(x), torch.from_numpy(y).long()
    adv = attack(xt, yt)
    with torch.no_grad():
        return (net(adv).argmax(1) == yt).numpy()


def multi_attack(attacks):
    """A torchattacks MultiAttack that keeps the number still robust after each attack."""
    multi = torchattacks.MultiAttack(attacks)
    multi._accumulate_multi_atk_records = True
    multi._multi_atk_records = [0.0] * (len(attacks) + 1)  # as MultiAttack.save sets them up
    return multi


def pct(b):
    return round(100 * float(np.mean(b)), 2)


def accuracy_ours(args, module, variables, x, y, tm, sink):
    """Our ensemble (and its accuracy after each attack) and PGD-20; per-example robustness."""
    n = len(x)
    names = list(aa.STANDARD)
    t = time.perf_counter()
    ours = ours_fn(module, variables, tm, 10, args.batch_size)(x, y, jax.random.key(args.key))
    t_ours = time.perf_counter() - t
    robust, cumulative = ours["correct"], {}
    for a in names:
        robust = robust & ~ours["flipped"][a]
        cumulative[a] = pct(robust)
    emit(
        dict(
            what="ours",
            attacks=names,
            clean=pct(ours["correct"]),
            AA=pct(ours["robust"]),
            robust_idx=np.flatnonzero(ours["robust"]).tolist(),
            after=cumulative,
            seconds=round(t_ours, 1),
            n=n,
        ),
        sink,
    )
    t = time.perf_counter()
    emit(
        dict(
            what="ours PGD-20",
            acc=pct(pgd20(module, variables, x, y, tm, jax.random.key(args.key), args.batch_size)),
            seconds=round(time.perf_counter() - t, 1),
            n=n,
        ),
        sink,
    )
    return ours["robust"]


def accuracy_torchattacks(args, net, x, y, tm, sink):
    """torchattacks at the reference's budgets and as shipped; per-example robustness."""
    n = len(x)
    names = list(aa.STANDARD)
    multi = multi_attack(torch_attacks(net, tm, names, 10))
    t = time.perf_counter()
    theirs = torch_robust(multi, net, x, y)
    t_theirs = time.perf_counter() - t
    # The first record counts the points, each next one those still robust after an attack
    # (none after an attack that left no point).
    left = [int(r) for r in multi._multi_atk_records[1:]]
    emit(
        dict(
            what="torchattacks, reference budgets",
            attacks=names,
            AA=pct(theirs),
            robust_idx=np.flatnonzero(theirs).tolist(),
            after={a: round(100 * r / n, 2) for a, r in zip(names, left, strict=False)},
            seconds=round(t_theirs, 1),
            n=n,
        ),
        sink,
    )
    shipped = torchattacks.AutoAttack(
        net, norm=NORMS[tm.norm], eps=float(tm.epsilon), version="standard", n_classes=10, seed=0
    )
    t = time.perf_counter()
    robust_shipped = torch_robust(shipped, net, x, y)
    emit(
        dict(
            what="torchattacks AutoAttack(version='standard') as shipped",
            AA=pct(robust_shipped),
            seconds=round(time.perf_counter() - t, 1),
            n=n,
        ),
        sink,
    )
    return theirs


def timing(args, module, variables, net, x, y, tm, sink):
    x, y = x[: args.time_examples], y[: args.time_examples]
    names = list(aa.STANDARD)
    ours = ours_fn(module, variables, tm, 10, len(x))
    key = jax.random.key(args.key)
    t = time.perf_counter()
    ours(x, y, key)
    emit(
        dict(what="ours compile + first call", seconds=round(time.perf_counter() - t, 2), n=len(x)),
        sink,
    )
    multi = torchattacks.MultiAttack(torch_attacks(net, tm, names, 10))
    times = interleaved(
        {"ours": lambda: ours(x, y, key), "torchattacks": lambda: torch_robust(multi, net, x, y)},
        args.reps,
        warmup=0,
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    emit(
        dict(
            what="timing",
            attacks=names,
            n=len(x),
            reps=args.reps,
            ours=[round(t, 2) for t in times["ours"]],
            torchattacks=[round(t, 2) for t in times["torchattacks"]],
            median_ours=round(med["ours"], 2),
            median_torchattacks=round(med["torchattacks"], 2),
            ratio=round(med["ours"] / med["torchattacks"], 3),
            torch_threads=torch.get_num_threads(),
        ),
        sink,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--run", default="fast_at/clean")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="ours,torchattacks,timing")
    parser.add_argument("--num_examples", type=int, default=500)
    parser.add_argument("--time_examples", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--key", type=int, default=0)
    parser.add_argument("--json_out", default="")
    args = parser.parse_args(argv)
    module, variables, x, y, tm = restore(args.workdir, args.run, args.seed)
    x, y = x[: args.num_examples], y[: args.num_examples]
    net = pytorch.to_torch(module, variables)
    sink = []
    emit(
        dict(
            what="export",
            max_logit_difference=pytorch.max_logit_difference(net, module, variables, x),
            n=len(x),
            threat=f"{tm.norm} {tm.epsilon:.5f}",
            standard=list(aa.STANDARD),
        ),
        sink,
    )
    parts = args.parts.split(",")
    robust = {}
    if "ours" in parts:
        robust["ours"] = accuracy_ours(args, module, variables, x, y, tm, sink)
    if "torchattacks" in parts:
        robust["theirs"] = accuracy_torchattacks(args, net, x, y, tm, sink)
    if len(robust) == 2:
        ours, theirs = robust["ours"], robust["theirs"]
        emit(
            dict(
                what="agreement",
                robust_both=int((ours & theirs).sum()),
                only_ours=int((ours & ~theirs).sum()),
                only_theirs=int((theirs & ~ours).sum()),
                n=len(x),
            ),
            sink,
        )
    if "timing" in parts:
        timing(args, module, variables, net, x, y, tm, sink)
    write_json_lines(args.json_out, sink)
    print(f"load average now {load1()}")


if __name__ == "__main__":
    main()
