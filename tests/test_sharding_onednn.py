"""The oneDNN convolutions on a mesh of 8 fake CPU devices: each device convolves its batch shard.

`test_sharding.py` checks the same numbers on 1, 2 and 8 devices (its `crafted` fixture trains a
CNN victim whose batch of 16 the 8 devices split, with oneDNN, the default) and the collectives
of the compiled steps with XLA's convolutions; this module checks the compiled train step with
the oneDNN custom calls and their partitioning rule (`jaxpoison.ops._partitioned`).
"""

from test_sharding import run_on_8_devices


def test_onednn_custom_calls_see_the_batch_shard_and_gradients_meet_once():
    """On 8 devices, every oneDNN call of the CIFAR CNN's train step (batch 64, 2 seeds) reads
    8 examples, the kernel gradients are summed in one (combined) all-reduce, nothing is
    gathered."""
    out = run_on_8_devices(
        """
        import json, re, jax, jax.numpy as jnp, ml_collections
        from jaxpoison import sharding, training

        cfg = ml_collections.ConfigDict(dict(model=dict(name="cnn_cifar", width=0.125),
            epochs=1, batch_size=64, optimizer=dict(learning_rate=0.05, momentum=0.9,
            schedule="constant"), objective=dict(name="erm")))
        trainer = training.Trainer.from_config(cfg, num_classes=4, image_shape=(8, 8, 3))
        x = jnp.zeros((128, 8, 8, 3))
        y = jnp.zeros(128, jnp.int32)
        with jax.set_mesh(trainer.mesh):
            x, y = jax.device_put((x, y), sharding.replicated(trainer.mesh))
            states = trainer.init_seeds(jax.random.key(0), 2, 2)
            step = trainer.compiled_step(2, 0, False)
            idx = jnp.zeros((2, 64), jnp.int32)
            keys = jax.random.split(jax.random.key(1), 2)
            text = step.lower(states, x, y, idx, keys).compile().as_text()

        # Each oneDNN call with its operands' shapes (XLA prints them as layout constraints).
        calls = re.findall(
            r'custom_call_target="jaxpoison_conv_(\\w+)", '
            r"operand_layout_constraints=\\{((?:[^{}]|\\{[^{}]*\\})*)\\}",
            text,
        )
        shapes = [
            [kind, [[int(d) for d in s.split(",")] for s in re.findall(r"f32\\[([\\d,]+)\\]", ops)]]
            for kind, ops in calls
        ]
        ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute")
        counts = {op: len(re.findall(rf"\\b{op}(-start)?\\(", text)) for op in ops}
        print(json.dumps(dict(counts, calls=shapes)))
        """
    )
    calls = out.pop("calls")
    kinds = {kind for kind, _ in calls}
    assert kinds == {"forward", "backward_data", "backward_weights"}, kinds
    for kind, (a, b) in calls:
        # forward(x, w), backward_data(ct, w): the batch is the first operand's; the kernel
        # gradient backward_weights(x, ct) reads two batches (NHWC after any vmapped dims).
        batches = [a[-4], b[-4]] if kind == "backward_weights" else [a[-4]]
        assert batches == [64 // 8] * len(batches), (kind, a, b)
    assert out == {"all-reduce": 1, "all-gather": 0, "all-to-all": 0, "collective-permute": 0}
