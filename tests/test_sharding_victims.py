"""Victims, an evaluator and the compiled steps on 1 and 8 (fake CPU) devices.

Like `test_sharding.py` (whose `run_on_8_devices` runs each program in a fresh Python with 8
devices): training and PGD give the same numbers on 8 devices as on 1, and the compiled train
and craft steps with XLA's convolutions split the batch (the oneDNN calls:
`test_sharding_onednn.py`).
"""

import numpy as np
import pytest
from test_sharding import run_on_8_devices


@pytest.fixture(scope="module")
def trained():
    """Victims (flips, 2 seeds) trained and a PGD evaluator (random starts) run on 1 and 8
    devices, with batches that 8 devices split (16, a CNN) and do not (20, an MLP)."""
    return run_on_8_devices(
        """
        import json, jax, numpy as np, ml_collections
        from jaxpoison import models, sharding, training
        from jaxpoison.evaluation import risk

        rng = np.random.default_rng(0)
        x = rng.random((32, 8, 8, 3), dtype=np.float32)
        y = rng.integers(0, 4, 32).astype(np.int32)
        mlp = dict(name="mlp", width=0.25)
        meshes = {n: sharding.data_mesh(jax.devices()[:n]) for n in (1, 8)}
        out = {}
        cnn = dict(name="cnn_cifar", width=0.125)
        cnn_apply = models.make_apply_fn(models.make("cnn_cifar", num_classes=4, width=0.125))
        evaluator = risk.make("risk", apply_fn=cnn_apply, num_classes=4, epsilon=8 / 255,
                              num_steps=2, batch_size=16)
        for batch_size, model in ((16, cnn), (20, mlp)):
            cfg = ml_collections.ConfigDict(dict(model=model, epochs=1, batch_size=batch_size,
                optimizer=dict(learning_rate=0.05, momentum=0.9, schedule="constant"),
                objective=dict(name="erm")))
            for n in (1, 8):
                trainer = training.Trainer.from_config(
                    cfg, num_classes=4, image_shape=(8, 8, 3), mesh=meshes[n]
                )
                td = training.TrainData.create(x, y, x, y, mesh=meshes[n], flip=True)
                states, history = trainer.fit(
                    td, key=jax.random.key(1), num_seeds=2, progress=False
                )
                out.setdefault(f"train_{batch_size}", {})[n] = history
                if batch_size == 16:
                    scores = evaluator(states, td.x_test, td.y_test, key=jax.random.key(2))
                    out.setdefault("risk", {})[n] = {
                        k: np.asarray(v).tolist() for k, v in scores.items()
                    }
            if batch_size == 16:
                # The 2 seeds split over a ('seed', 'data') mesh of 2 x 4 devices, from the
                # config (mesh=None); the data placed on the 1-d mesh moves to it.
                seeded = ml_collections.ConfigDict(dict(cfg, seed_devices=2))
                trainer = training.Trainer.from_config(seeded, num_classes=4, image_shape=(8, 8, 3))
                td = training.TrainData.create(x, y, x, y, mesh=meshes[8], flip=True)
                states, history = trainer.fit(
                    td, key=jax.random.key(1), num_seeds=2, progress=False
                )
                out[f"train_{batch_size}"]["8s2"] = history
                on_mesh = td.on(trainer.mesh)  # evaluators run on the mesh of their data
                scores = evaluator(states, on_mesh.x_test, on_mesh.y_test, key=jax.random.key(2))
                out["risk"]["8s2"] = {k: np.asarray(v).tolist() for k, v in scores.items()}
                leaf = jax.tree.leaves(states.params)[0]
                out["seed_layout"] = {
                    "axis": leaf.sharding.spec[0],
                    "rows": sorted({s.data.shape[0] for s in leaf.addressable_shards}),
                    "key": trainer.record(td, key=1, num_seeds=2) == training.Trainer.from_config(
                        cfg, num_classes=4, image_shape=(8, 8, 3)).record(td, key=1, num_seeds=2),
                }
                try:
                    trainer.fit(td, key=jax.random.key(1), num_seeds=3, progress=False)
                except ValueError as e:
                    out["seed_layout"]["error"] = str(e)
        print(json.dumps(out))
        """
    )


@pytest.mark.parametrize("batch_size", [16, 20])
def test_training_and_evaluation_give_the_same_numbers_on_8_devices(trained, batch_size):
    """Batches of 16 are split over 8 devices (up to float reassociation); batches of 20 are
    computed whole on each. The PGD evaluator's batches of 16 are split."""
    runs = trained[f"train_{batch_size}"]
    for n in {"8", "8s2"} & set(runs):
        for key, values in runs["1"].items():
            np.testing.assert_allclose(runs[n][key], values, rtol=1e-4, err_msg=(n, key))
        for key, values in trained["risk"]["1"].items():
            np.testing.assert_allclose(trained["risk"][n][key], values, atol=1e-6, err_msg=key)


def test_seeds_split_along_a_seed_axis(trained):
    """``victim.seed_devices=2`` on 8 devices: each victim's state lives on its group of 4
    devices (one seed's rows per device), with the numbers of one device (above) and the
    checkpoint key of the 1-d mesh; seeds that the groups do not divide are refused."""
    layout = trained["seed_layout"]
    assert layout["axis"] == "seed", layout
    assert layout["rows"] == [1] and layout["key"], layout
    assert "num_seeds=3" in layout["error"] and "multiple of 2" in layout["error"], layout


def test_compiled_steps_split_the_batch_and_reduce_gradients_once():
    """With XLA's convolutions on 8 devices, the victim's train step and the error-minimizing
    craft step convolve B/8 examples per device; the train step holds one (combined) gradient
    all-reduce and gathers nothing."""
    out = run_on_8_devices(
        """
        import json, re, jax, jax.numpy as jnp, numpy as np, ml_collections
        from jaxpoison import poisons, sharding, threat, training
        from jaxpoison.poisons import engine

        def census(text):
            ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
            counts = {op: len(re.findall(rf"\\b{op}(-start)?\\(", text)) for op in ops}
            conv = r"= f32\\[(\\d+),[\\d,]+\\][^\\n]*convolution\\("
            batches = sorted({int(b) for b in re.findall(conv, text)})
            return dict(counts, conv_batches=batches)

        cfg = ml_collections.ConfigDict(dict(model=dict(name="cnn_cifar", width=0.125),
            epochs=1, batch_size=64, optimizer=dict(learning_rate=0.05, momentum=0.9,
            schedule="constant"), objective=dict(name="erm")))
        trainer = training.Trainer.from_config(cfg, num_classes=4, image_shape=(8, 8, 3))
        x = jnp.zeros((128, 8, 8, 3))
        y = jnp.zeros(128, jnp.int32)
        with jax.set_mesh(trainer.mesh):
            # Placed as TrainData places them: the training images split over the devices.
            x = sharding.place_examples(x, trainer.mesh)
            y = jax.device_put(y, sharding.replicated(trainer.mesh))
            states = trainer.init_seeds(jax.random.key(0), 2, 2)
            step = trainer.compiled_step(2, 0, False)
            idx = jnp.zeros((2, 64), jnp.int32)
            keys = jax.random.split(jax.random.key(1), 2)
            train = step.lower(states, x, y, idx, keys).compile().as_text()

            poison = poisons.make("error_minimizing", threat=threat.make(epsilon=8 / 255),
                num_classes=4, image_shape=(8, 8, 3), model=dict(name="cnn_cifar", width=0.125),
                num_steps=2, train_steps=1)
            state = engine._compiled_init(poison)(jax.random.key(0), x, y)
            update = engine._compiled_update(poison)
            craft = update.lower(state, x, y, jnp.arange(64), jax.random.key(1)).compile()
        print(json.dumps({"train": census(train), "craft": census(craft.as_text())}))
        """,
        JAXPOISON_CONV="xla",
    )
    train, craft = out["train"], out["craft"]
    assert train["conv_batches"] == [64 // 8], train
    # One all-reduce sums the gradients, one assembles the batch from the split training images
    # (`sharding.gather_examples`); nothing is all-gathered.
    assert train["all-reduce"] == 2 and train["all-gather"] == 0, train
    assert train["all-to-all"] == 0 and train["collective-permute"] == 0, train
    assert craft["conv_batches"] == [64 // 8], craft
