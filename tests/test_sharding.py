"""Data parallelism on 1, 2 and 8 (fake CPU) devices: the same poisons, split along the examples.

The fixture runs a fresh Python with ``--xla_force_host_platform_device_count=8`` (the device
count is fixed when jax starts) and compares meshes over the first 1, 2 or 8 devices. Victims,
the evaluator and the compiled steps are `test_sharding_victims.py`'s, two processes and joining
a cluster `test_sharding_processes.py`'s, the oneDNN calls `test_sharding_onednn.py`'s: each
module is one unit of work for pytest-xdist, so they run beside each other.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def run_on_8_devices(code, **env):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **env},
        timeout=1800,  # a hang, not a slow start: beside other work a fixture took over 900 s
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def crafted():
    """Poisons crafted and applied on 1, 2 and 8 devices."""
    return run_on_8_devices(
        """
        import json, jax, numpy as np
        from jaxpoison import models, poisons, sharding, threat

        rng = np.random.default_rng(0)
        x = rng.random((32, 8, 8, 3), dtype=np.float32)
        y = rng.integers(0, 4, 32).astype(np.int32)
        ball = threat.make(epsilon=8 / 255)
        shape = dict(threat=ball, num_classes=4, image_shape=(8, 8, 3))
        # MLPs: a CNN compiles for a minute per mesh; convolutions are split as tested below.
        mlp = dict(name="mlp", width=0.25)
        module = models.make("mlp", num_classes=4, width=0.25)
        apply_fn = models.make_apply_fn(module)
        variables = models.init(module, jax.random.key(5), (8, 8, 3))
        em = dict(model=mlp, num_epochs=2, num_steps=2, train_steps=1)
        made = {
            "random": poisons.make("random", **shape),
            "error_minimizing": poisons.make("error_minimizing", **shape, **em),
            "error_minimizing_class_wise": poisons.make(
                "error_minimizing", **shape, **em, class_wise=True
            ),
            "adversarial": poisons.make(
                "adversarial", **shape, apply_fn=apply_fn, variables=variables, num_steps=2
            ),
        }
        out = {"poisons": {}, "specs": {}}
        meshes = {n: sharding.data_mesh(jax.devices()[:n]) for n in (1, 2, 8)}
        for name, poison in made.items():
            for n in (1, 2, 8) if name == "error_minimizing" else (1, 8):
                state, history = poisons.craft(
                    poison, x, y, key=jax.random.key(0), batch_size=16, progress=False,
                    mesh=meshes[n],
                )
                images, _ = poisons.apply_all(poison, state, x, y, mesh=meshes[n])
                out["poisons"].setdefault(name, {})[n] = [images.tolist(), history]
                if name == "error_minimizing":
                    out["specs"][n] = str(state.delta.sharding.spec)
        print(json.dumps(out))
        """
    )


POISONED = ["random", "error_minimizing", "error_minimizing_class_wise", "adversarial"]


@pytest.mark.parametrize("name", POISONED)
def test_crafting_gives_the_same_poison_on_any_number_of_devices(crafted, name):
    runs = crafted["poisons"][name]
    images, history = runs["1"]
    for n in set(runs) - {"1"}:
        other_images, other_history = runs[n]
        # Up to float reassociation: batch sums are split across devices.
        np.testing.assert_allclose(other_images, images, atol=2e-6, err_msg=n)
        for key, values in history.items():
            np.testing.assert_allclose(other_history[key], values, rtol=1e-4, err_msg=key)


def test_sample_wise_perturbations_are_split_along_the_examples(crafted):
    assert crafted["specs"] == {"1": "P()", "2": "P('data',)", "8": "P('data',)"}
