r"""Peak host memory of a full CIFAR-10 poison + training run, on 1 and on 8 (fake) CPU devices.

  nice -n 5 python benchmarks/memory.py                       # random poison, 1 and 8 devices
  nice -n 5 python benchmarks/memory.py --devices=1 --runs=random,error_minimizing --epochs=2

For every (run, device count), a fresh ``jaxpoison`` process runs configs/poison_family.py on all
50,000 training and 10,000 test images of shared/data/cifar10.npz (the CNN at width 0.5, one
seed, ``--epochs`` victim epochs): each run, a poison name (a `config_lib.FAMILY_SPECS` key,
e.g. ``random``), crafts that poison and trains a victim on it only. The
device count is set with ``--xla_force_host_platform_device_count``, so 8 devices are 8 CPU
"devices" in one process: every replicated array is held 8 times in host memory, as it would be
once per GPU.

Each measurement prints one ``JSON {...}`` line: ``peak_rss_mb`` is the child's peak resident set
size (``ru_maxrss`` from ``wait4``: interpreter, XLA, data, compiled programs and the run),
``wall_s`` its wall time, ``final_test_accuracy`` the victim's, to show the runs did the work.
The issue's targets (scale-out): a full CIFAR-10 poison + training run at most 1.5 GB, and 8
devices adding at most 1 GB over one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(run, devices, epochs, workdir):
    """One fresh jaxpoison process: (peak RSS in MB, wall seconds, its results.json)."""
    args = [
        sys.executable,
        "-m",
        "jaxpoison.main",
        "--config=configs/poison_family.py",
        f"--workdir={workdir}",
        "--quiet",
        f"--config.select.poisons=('{run}',)",
        "--config.include_clean=False",
        "--config.data.num_train=0",
        "--config.data.num_test=0",
        f"--config.victim.epochs={epochs}",
        "--config.victim.num_seeds=1",
    ]
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    t0 = time.time()
    proc = subprocess.Popen(args, cwd=REPO, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{run} on {devices} devices failed with exit code {proc.returncode}")
    results = json.loads((Path(workdir) / "results.json").read_text())
    return usage.ru_maxrss / 1024, time.time() - t0, results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="random", help="comma-separated poison names")
    parser.add_argument("--devices", default="1,8", help="comma-separated device counts")
    parser.add_argument("--epochs", type=int, default=1, help="victim epochs per run")
    args = parser.parse_args()
    for run in args.runs.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            with tempfile.TemporaryDirectory(prefix="jaxpoison_memory_") as workdir:
                peak, wall, results = measure(run, devices, args.epochs, workdir)
            acc = next(iter(results["summary"].values()))["final_test_acc"]["mean"]
            record = {
                "run": run,
                "devices": devices,
                "epochs": args.epochs,
                "peak_rss_mb": round(peak, 1),
                "wall_s": round(wall, 1),
                "final_test_accuracy": acc,
                "load1": round(os.getloadavg()[0], 2),
            }
            print("JSON " + json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
