"""UEraser: train on the worst of K heavily augmented copies of each example.

While ``batch['progress'] < repeat_fraction`` the loss is the mean over the batch of
max_k CE(f(A_k(x)), y) over K = `num_copies` independent draws A_k of UEraser's augmentation
(`transforms.ueraser_ops.ueraser`: plasma brightness and contrast, channel shuffle,
TrivialAugment); after it, CE of one augmented copy. The K copies are augmented and forwarded
vectorised (vmap over K: one compiled forward of K x B images, each copy normalised by its own
batch statistics), so the cost is about K forward and backward passes per step.
"""

import jax
import jax.numpy as jnp

from jaxpoison import losses
from jaxpoison.objectives import inner
from jaxpoison.transforms import ueraser_ops


def make(*, num_copies=5, repeat_fraction=1.0, jpeg=False):
    """Returns the UEraser objective.

    APBench's ``train.py --ueraser`` takes the max over 5 copies for the first ``repeat_epoch``
    epochs and trains on one copy after: ``--repeat_epoch 300`` (its default and strongest
    variant, "UEraser-Max"; longer than its 200 epochs, so always the max) is
    ``repeat_fraction=1``, 50 of 200 ("UEraser") 0.25, 0 ("UEraser-Lite") 0.

    BatchNorm: each copy is normalised by its own batch statistics, as the reference's K
    separate training-mode passes are. The reference's running statistics take K momentum
    steps per batch, one per copy; here they take one step towards the mean of the K copies'
    batch statistics (the mean of the K updated states), the same update as a plain step with
    one copy. The accuracy metric is that of the first copy.

    Args:
      num_copies: K, the augmented copies per example (APBench: 5).
      repeat_fraction: the fraction of training with the max over copies; after it, plain
        cross-entropy on one copy. Read from ``batch['progress']`` inside the compiled step
        (``lax.cond``: one compilation, one copy's cost after the switch).
      jpeg: UEraser_jpeg (APBench uses it against TAP and AR): a JPEG at a random quality in
        10..99 per example before the augmentation, and the plasma ops with p = 0.8.

    Returns:
      ``objective(variables, batch, key, *, apply_fn) -> (loss, aux)``; the metrics add
      ``max_over_copies`` (1 while the max is taken).

    References:
      Qin, Chen, Wang, Tan, Li, Zhu. "Learning the Unlearnable: Adversarial Augmentations
      Suppress Unlearnable Example Attacks." arXiv:2303.15127, 2023 (lafeat/ueraser; APBench's
      ``defense/ueraser.py`` and ``train.py``).
    """
    if isinstance(num_copies, bool) or not isinstance(num_copies, int) or num_copies < 1:
        raise ValueError(
            f"ueraser: num_copies={num_copies!r} must be a positive integer (APBench uses 5)."
        )
    if isinstance(repeat_fraction, bool) or not isinstance(repeat_fraction, int | float):
        raise ValueError(
            f"ueraser: repeat_fraction={repeat_fraction!r} must be a number in [0, 1]."
        )
    if not 0.0 <= repeat_fraction <= 1.0:
        raise ValueError(
            f"ueraser: repeat_fraction={repeat_fraction} must be in [0, 1] (1: the max over "
            "copies all training, 0: one copy)."
        )
    if not isinstance(jpeg, bool):
        raise ValueError(f"ueraser: jpeg={jpeg!r} must be True or False.")

    def augment(key, x):
        return ueraser_ops.ueraser(key, x, jpeg=jpeg)

    def objective(variables, batch, key, *, apply_fn):
        x, y = batch["image"], batch["label"]
        keys = jax.random.split(key, num_copies)
        use_max = inner.progress_of(batch, name="ueraser") < repeat_fraction

        def max_over_copies():
            copies = jax.vmap(augment, in_axes=(0, None))(keys, x)
            logits, states = jax.vmap(lambda xk: apply_fn(variables, xk, train=True))(copies)
            ce = jax.vmap(losses.cross_entropy, in_axes=(0, None))(logits, y)
            return jnp.max(ce, axis=0), logits[0], jax.tree.map(_mean_of_copies, states)

        def one_copy():
            logits, state = apply_fn(variables, augment(keys[0], x), train=True)
            return losses.cross_entropy(logits, y), logits, state

        per_example, logits, model_state = jax.lax.cond(use_max, max_over_copies, one_copy)
        loss = jnp.mean(per_example)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(losses.accuracy(logits, y)),
            "max_over_copies": use_max.astype(jnp.float32),
        }
        return loss, {"model_state": model_state, "metrics": metrics}

    return objective


def _mean_of_copies(leaf):
    """The copies' updated model state (BatchNorm running statistics): their mean."""
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.mean(leaf, axis=0)
    return leaf[0]
