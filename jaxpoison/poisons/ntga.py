"""Neural tangent generalization attack (NTGA), with the empirical NTK of a finite network.

NTGA (Yuan & Wu 2021) replaces the victim's training by the closed form of a wide network's
gradient flow: the kernel-regression predictor

    f(X_target; t) = Θ(X_target, X̃) Θ(X̃, X̃)⁻¹ (I - exp(-t Θ(X̃, X̃) / (n K))) Y

trained on the poisoned images X̃ = X + Δ (`ntk.kernel_regression`), and ascends its
cross-entropy on a clean target set with projected gradient steps on Δ. The reference
computes Θ in closed form for an infinitely wide network (neural-tangents); here Θ is the
*empirical* NTK of a finite Flax network at initialisation (`ntk.empirical_ntk`, Θ = J Jᵀ
traced over the logits), so any model of `jaxpoison.models` can be the surrogate.

As in the reference (B-NTGA), the training set is attacked block by block: a crafting batch
is one block, with its own kernel, of `batch_size` examples. Fitted to the crafting engine:

* `init` draws the surrogate's parameters and the target set from the key: `target_size`
  examples of the training set (a count or a fraction), kept clean in the state. The
  reference holds out 10,000 of CIFAR-10's 50,000 training images as its validation/target
  set and poisons the other 40,000; the engine poisons every example, so here the targets are
  poisoned too, in their own blocks, and the targets that lie in the current block are left
  out of its loss (a block is never scored on its own clean images);
* `update` runs `num_steps` PGD steps of `step_size` on the block's δ, from its current value
  (0 at first, as the reference), maximising the mean target cross-entropy of the kernel
  predictor; kernels, Cholesky solve, loss, gradient and projection are one jitted step;
* `num_epochs` passes (1, as the reference: every block is attacked once).

The reference's released `projected_gradient_descent` recomputes every iteration from the
clean block with a full-ε step (it passes the clean ``x_train`` and ``eps`` to each FGM call),
so its 10 iterations are one FGSM step; ``num_steps=1, step_size=epsilon`` reproduces that, the
defaults the PGD the paper describes (10 steps of 1.1 ε / 10, the reference's ``eps_iter``).

The kernels are divided by the mean diagonal of the block's kernel (held constant under
differentiation), so `t` is in the units of a unit-diagonal kernel whatever the surrogate's
parameterisation; t = ∞ (``t=None``) is unaffected by the scale.

References:
  Yuan, Wu. "Neural Tangent Generalization Attacks." ICML 2021.
  Reference code: github.com/lionelmessi6410/ntga (generate_attack.py: t = 64, diag_reg = 1e-4,
  block 512, 10 iterations, 10,000 targets, a 5-layer Erf FNN or a 2-conv CNN surrogate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison import attacks, models, ntk
from jaxpoison.poisons.base import Poison, SampleWiseState, apply_sample_wise

# The reference's FNN surrogate is 5 dense layers of 512 units (Erf); ours has ReLU units.
DEFAULT_MODEL = {"name": "mlp", "width": 1.0, "hidden": (512, 512, 512, 512, 512)}


def ntga(
    *,
    threat,
    num_classes,
    image_shape,
    kernel_model=None,
    num_outputs=1,
    t=64.0,
    diag_reg=1e-4,
    target_size=0.2,
    num_steps=10,
    step_size=None,
    num_epochs=1,
    chunk_size=256,
):
    """NTGA (Yuan & Wu 2021) with the empirical NTK of `kernel_model` at initialisation.

    Args:
      threat: an `LpBall` (ℓ∞ or ℓ2).
      num_classes: K, the number of classes (one-hot targets of the kernel predictor).
      image_shape: (H, W, C).
      kernel_model: ``{'name', 'width', ...}`` of the network whose NTK at initialisation is
        the kernel (`models.make`; default `DEFAULT_MODEL`, the reference's FNN with ReLU
        units). Not a trained crafting model: it is drawn from the key and never trained.
      num_outputs: logits of the surrogate; the kernel is their mean per-logit NTK. The
        infinite-width NTK is the same for every logit, so one output (default) estimates it at
        1/num_outputs of the cost.
      t: gradient-flow time of the kernel predictor (reference: 64); None for t = ∞.
      diag_reg: diagonal regulariser of the kernel, relative to its mean diagonal (1e-4).
      target_size: clean training examples the predictor is scored on: a count, or a float
        in (0, 1), a fraction of the training set (default 0.2: the reference's 10,000 of
        CIFAR-10's 50,000).
      num_steps: PGD steps per block and pass (reference: 10).
      step_size: PGD step (default 1.1 ε / num_steps, the reference's).
      num_epochs: passes over the training set (reference: 1).
      chunk_size: examples per Jacobian block of the target kernel (memory ∝ chunk_size · P).

    Returns:
      A `Poison` whose state is a `SampleWiseState` with ``extra`` = the surrogate's variables
      and the target set (``target_index``, ``target_image``, ``target_label``).

    References:
      Yuan & Wu 2021, "Neural Tangent Generalization Attacks", ICML.
    """
    kernel_model = dict(kernel_model or DEFAULT_MODEL)
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in kernel_model.items()}
    name, width = spec.pop("name"), spec.pop("width", 1.0)
    checks = (
        (num_outputs >= 1, f"num_outputs={num_outputs} must be >= 1 (1 is the cheapest)."),
        (t is None or t > 0, f"t={t} must be > 0, or None for t = infinity."),
        (diag_reg > 0, f"diag_reg={diag_reg} must be > 0 (1e-4 is the reference's)."),
        (
            target_size > 0 and (isinstance(target_size, float) or target_size == int(target_size)),
            f"target_size={target_size} must be a count >= 1 or a fraction in (0, 1).",
        ),
        (num_steps >= 1, f"num_steps={num_steps} must be >= 1 (reference: 10)."),
        (chunk_size >= 1, f"chunk_size={chunk_size} must be >= 1."),
    )
    for ok, message in checks:
        if not ok:
            raise ValueError(f"ntga: {message}")
    step_size = 1.1 * threat.epsilon / num_steps if step_size is None else step_size
    module = models.make(name, num_classes=num_outputs, width=width, **spec)
    apply_fn = models.make_apply_fn(module)
    t = None if t is None else float(t)

    def kernel_fn(variables):
        def f(params, x):
            return apply_fn({**variables, "params": params}, x, train=False)[0]

        return lambda x1, x2, chunk: ntk.empirical_ntk(
            f, variables["params"], x1, x2, chunk_size=chunk
        )

    def target_loss(extra, x_block, y_block, index):
        """Mean cross-entropy, on the targets outside the block, of the kernel predictor
        trained on (x_block, y_block)."""
        kernel = kernel_fn(extra["variables"])
        k_bb = kernel(x_block, x_block, None)
        k_tb = kernel(extra["target_image"], x_block, chunk_size)
        scale = jax.lax.stop_gradient(jnp.mean(jnp.diag(k_bb)))
        y_onehot = jax.nn.one_hot(y_block, num_classes)
        logits = ntk.kernel_regression(k_bb / scale, k_tb / scale, y_onehot, t=t, diag_reg=diag_reg)
        losses = -jnp.take_along_axis(
            jax.nn.log_softmax(logits), extra["target_label"][:, None], axis=1
        )[:, 0]
        outside = ~jnp.any(extra["target_index"][:, None] == index[None, :], axis=1)
        weight = outside.astype(losses.dtype)
        correct = jnp.argmax(logits, axis=1) == extra["target_label"]
        accuracy = jnp.sum(weight * correct) / jnp.maximum(jnp.sum(weight), 1.0)
        return jnp.sum(weight * losses) / jnp.maximum(jnp.sum(weight), 1.0), accuracy

    def init(key, dataset):
        x, y = dataset["image"], dataset["label"]
        n = x.shape[0]
        size = round(target_size * n) if isinstance(target_size, float) else target_size
        if not 1 <= size < n:
            raise ValueError(
                f"ntga: target_size={target_size} gives {size} targets of the {n} training "
                "examples; give a count from 1 to n - 1 or a fraction in (0, 1), e.g. 0.2."
            )
        model_key, target_key = jax.random.split(key)
        variables = module.init(model_key, jnp.zeros((1, *image_shape), x.dtype), train=False)
        variables = {k: v for k, v in variables.items() if k != "intermediates"}
        target_index = jax.random.permutation(target_key, n)[:size].astype(jnp.int32)
        extra = {
            "variables": variables,
            "target_index": target_index,
            "target_image": x[target_index],
            "target_label": y[target_index].astype(jnp.int32),
        }
        return SampleWiseState(delta=jnp.zeros_like(x), extra=extra)

    def update(state, batch, key):
        x, y, index = batch["image"], batch["label"], batch["index"]
        extra = state.extra

        def loss_fn(x_block, labels):
            return target_loss(extra, x_block, labels, index)[0]

        new = attacks.pgd(
            loss_fn,
            x,
            y,
            key=key,
            threat=threat,
            num_steps=num_steps,
            step_size=step_size,
            maximize=True,
            init=state.delta[index],
        )
        clean_loss, clean_accuracy = target_loss(extra, x, y, index)
        loss, accuracy = target_loss(extra, x + new, y, index)
        metrics = {
            "clean_target_loss": clean_loss,
            "clean_target_accuracy": clean_accuracy,
            "target_loss": loss,
            "target_accuracy": accuracy,
        }
        return state.replace(delta=state.delta.at[index].set(new)), metrics

    return Poison(init=init, update=update, apply=apply_sample_wise(threat), num_epochs=num_epochs)
