"""The oneDNN convolutions on a mesh of 8 fake CPU devices: each device convolves its batch shard.

`test_sharding_victims.py` checks the same numbers on 1 and 8 devices (its `trained` fixture
trains a CNN victim whose batch of 16 the 8 devices split, with oneDNN, the default) and the
collectives of the compiled steps with XLA's convolutions; this module checks the compiled train
step with the oneDNN custom calls and their partitioning rule (`jaxpoison.ops._partitioned`).
"""

from test_sharding import run_on_8_devices


def test_onednn_custom_calls_see_the_batch_shard_and_gradients_meet_once():
    """On 8 devices, every oneDNN call of the CIFAR CNN's train step (batch 64, 2 seeds) reads
    8 examples, the kernel gradients are summed in one (combined) all-reduce, nothing is
    gathered; so do a vmapped second-order program's calls, with the numbers of 1 device."""
    out = run_on_8_devices(
        """
        import json, re, jax, jax.numpy as jnp, ml_collections, numpy as np
        from jaxpoison import ops, sharding, training

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
            text = step.lower(states, x, y, idx, keys).compile().as_text()

        def census(text):
            # Each oneDNN call with its operands' shapes (XLA prints them as layout constraints).
            calls = re.findall(
                r'custom_call_target="jaxpoison_conv_(\\w+)", '
                r"operand_layout_constraints=\\{((?:[^{}]|\\{[^{}]*\\})*)\\}",
                text,
            )
            shape = r"f32\\[([\\d,]+)\\]"
            shapes = [
                [kind, [[int(d) for d in s.split(",")] for s in re.findall(shape, o)]]
                for kind, o in calls
            ]
            ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
            counts = {op: len(re.findall(rf"\\b{op}(-start)?\\(", text)) for op in ops}
            return dict(counts, calls=shapes)

        # An L2C-shaped program (vmapped over 2 seeds: the rule's vmapped levels; second order;
        # a scan of rematerialised steps) on a batch of 16 split over the 8 devices, and on 1.
        def inner(w, x):
            x = sharding.batch(x)
            conv = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            def step(w, _):
                loss = lambda w_: jnp.sum(jnp.tanh(conv(x, w_)) ** 2)
                return w - 1e-3 * jax.grad(loss)(w), None
            w_final, _ = jax.lax.scan(jax.checkpoint(step), w, None, length=2)
            return jnp.sum(conv(x, w_final) ** 2)

        rng = np.random.default_rng(0)
        w = jnp.asarray(rng.standard_normal((2, 3, 3, 3, 4), dtype=np.float32) / 5)
        x = jnp.asarray(rng.random((2, 16, 8, 8, 3), dtype=np.float32))
        meta = jax.jit(jax.vmap(jax.grad(inner, argnums=(0, 1))))
        one = meta(w, x)
        with jax.set_mesh(trainer.mesh):
            w, x = jax.device_put((w, x), sharding.replicated(trainer.mesh))
            meta_text = meta.lower(w, x).compile().as_text()
            eight = meta(w, x)
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(one, eight))
        print(json.dumps(dict(train=census(text), meta=census(meta_text), meta_error=err)))
        """
    )
    for program, batch in (("train", 64), ("meta", 16)):
        census = out[program]
        calls = census.pop("calls")
        kinds = {kind for kind, _ in calls}
        assert kinds == {"forward", "backward_data", "backward_weights"}, (program, kinds)
        for kind, (a, b) in calls:
            # forward(x, w), backward_data(ct, w): the batch is the first operand's; the kernel
            # gradient backward_weights(x, ct) reads two (NHWC after any vmapped dims).
            batches = [a[-4], b[-4]] if kind == "backward_weights" else [a[-4]]
            assert batches == [batch // 8] * len(batches), (program, kind, a, b)
        assert census["all-gather"] == census["all-to-all"] == 0, (program, census)
    # One all-reduce sums the gradients, one assembles the batch from the split training images
    # (`sharding.gather_examples`).
    assert out["train"]["all-reduce"] == 2, out["train"]
    assert out["meta_error"] < 1e-5, out["meta_error"]
