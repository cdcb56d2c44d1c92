"""Pieces shared by the benchmarks that time jaxpoison against PyTorch (`spine.py`,
`crafting.py`, `defenses.py`): the optional PyTorch reference, interleaved timing, the
``JSON {...}`` records, model specs and the CIFAR-10 images.

The benchmarks are scripts, not a package: each puts this folder on ``sys.path`` and imports
``harness``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "cifar10.npz")


def torch_reference():
    """The lazily imported PyTorch reference module, or None (with a message) without torch."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    try:
        import torch_reference
    except ImportError as e:
        print(f"PyTorch reference unavailable, timing jaxpoison only: {e}", file=sys.stderr)
        return None
    return torch_reference


def load1():
    """The 1-minute load average, rounded (recorded with every measurement: the CPU is shared)."""
    return round(os.getloadavg()[0], 2)


def emit(record, sink):
    """Prints `record` (with the current load) as one ``JSON {...}`` line and appends it to sink."""
    record = {**record, "load1": load1()}
    print("JSON " + json.dumps(record), flush=True)
    sink.append(record)


def write_json_lines(path, sink):
    """Appends the records of `sink` to `path`, one JSON object a line (no-op for an empty path)."""
    if path:
        with open(path, "a") as f:
            for record in sink:
                f.write(json.dumps(record) + "\n")


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns, reps, warmup=1):
    """Runs each of `fns` (a dict of zero-argument callables that block until done) `warmup`
    times, then `reps` rounds of one call each, and returns the per-call times per name."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def parse_model(spec):
    """``"name@width"`` (or ``"name"``, width 1) -> (name, width)."""
    name, _, width = spec.partition("@")
    return name, float(width) if width else 1.0


def load_images(n, path=DATA):
    """(images float [n, 32, 32, 3] in [0, 1], labels int [n], source description): the first
    `n` training images of the CIFAR-10 .npz at `path`, or uniform noise when it is missing
    (timing does not depend on the pixels)."""
    if os.path.exists(path):
        with np.load(path) as f:
            images, labels = f["x_train"][:n], f["y_train"][:n]
        return images.astype(np.float32) / 255, labels.astype(np.int32), os.path.abspath(path)
    rng = np.random.default_rng(0)
    images = rng.random((n, 32, 32, 3), np.float32)
    return images, (np.arange(n) % 10).astype(np.int32), "uniform noise (no cifar10.npz)"
