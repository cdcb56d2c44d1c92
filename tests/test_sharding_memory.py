"""Training images on a mesh of 8 fake CPU devices: uint8, split along ``data``, gathered by index.

`test_sharding_victims.py` checks that victims trained on `TrainData` give the numbers of one
device on 2 and 8; this module checks where the images live and what the compiled step moves.
"""

from test_sharding import run_on_8_devices


def test_training_images_stay_uint8_split_along_the_devices_and_batches_are_gathered_by_index():
    out = run_on_8_devices(
        """
        import json, re, jax, jax.numpy as jnp, ml_collections, numpy as np
        from jaxpoison import sharding, training

        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (128, 8, 8, 3), dtype=np.uint8)
        y = rng.integers(0, 4, 128).astype(np.int32)
        cfg = ml_collections.ConfigDict(dict(model=dict(name="mlp", width=0.125), epochs=1,
            batch_size=64, optimizer=dict(learning_rate=0.05, momentum=0.9,
            schedule="constant"), objective=dict(name="erm")))
        trainer = training.Trainer.from_config(cfg, num_classes=4, image_shape=(8, 8, 3))
        td = training.TrainData.create(x, y, x[:40], y[:40], mesh=trainer.mesh)
        odd = sharding.place_examples(x[:100], trainer.mesh)  # 100 rows: not divisible by 8
        idx = jnp.asarray(rng.integers(0, 100, (2, 64)), jnp.int32)
        with jax.set_mesh(trainer.mesh):
            gather = jax.jit(sharding.gather_examples)
            split_ok = bool((np.asarray(gather(td.x_train, idx)) == x[np.asarray(idx)]).all())
            odd_ok = bool((np.asarray(gather(odd, idx)) == x[np.asarray(idx)]).all())
            states = trainer.init_seeds(jax.random.key(0), 2, 2)
            step = trainer.compiled_step(2, 0, False)
            keys = jax.random.split(jax.random.key(1), 2)
            text = step.lower(states, td.x_train, td.y_train, idx, keys).compile().as_text()
        collectives = re.findall(
            r"= (.+?) (all-reduce|all-gather|all-to-all|collective-permute)(?:-start)?\\(", text
        )
        print(json.dumps(dict(
            dtypes=[str(td.x_train.dtype), str(td.x_test.dtype)],
            train_rows=sorted({s.data.shape[0] for s in td.x_train.addressable_shards}),
            test_rows=sorted({s.data.shape[0] for s in td.x_test.addressable_shards}),
            odd_rows=sorted({s.data.shape[0] for s in odd.addressable_shards}),
            split_ok=split_ok, odd_ok=odd_ok, collectives=collectives)))
        """
    )
    assert out["dtypes"] == ["uint8", "uint8"]
    assert out["train_rows"] == [128 // 8] and out["test_rows"] == [40]
    assert out["odd_rows"] == [100]  # rows the devices do not divide stay whole on each
    assert out["split_ok"] and out["odd_ok"]
    kinds = sorted(kind for _, kind in out["collectives"])
    assert kinds == ["all-reduce", "all-reduce"], out["collectives"]
    # One all-reduce sums the gradients; the other assembles the batch, [seeds, B] uint8 images.
    assert any(shape.startswith("u8[2,64,8,8,3]") for shape, _ in out["collectives"]), out
