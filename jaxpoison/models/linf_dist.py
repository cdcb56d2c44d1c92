r"""ℓ∞-dist nets (Zhang, Cai, Lu, He & Wang, ICML 2021): 1-Lipschitz in ℓ∞ by construction.

An ℓ∞-dist neuron computes :math:`u(x) = \|x - w\|_\infty + b` instead of
:math:`\sigma(w^\top x + b)`. By the triangle inequality :math:`|u(x) - u(x')| \le
\|x - x'\|_\infty`, so a layer of such neurons maps the ℓ∞ ball of radius r into the ℓ∞ ball
of radius r, and so does a stack of them: every output of an ℓ∞-dist net is 1-Lipschitz w.r.t.
the ℓ∞ norm of its input. The logits are the negated last-layer outputs,
:math:`g_k(x) = -u_k(x)`, so a prediction whose top logit beats the runner-up by more than
:math:`2\varepsilon` cannot change inside the ε-ball (`jaxpoison.evaluation.certified`).

The architecture follows the paper and its reference code (zbh2047/L_inf-dist-net):

- ``depth`` ℓ∞-dist layers on the flattened image, ``depth - 1`` hidden ones of
  ``hidden * width`` neurons and one of ``num_classes`` neurons. The reference CIFAR-10
  ℓ∞-dist Net is ``depth=6, hidden=5120`` (``functools.partial(LinfDistNet, depth=6)``).
- *Mean shift* on the hidden layers: batch norm without the division by the standard deviation
  and without an affine part, :math:`u \leftarrow u - \mu`, with μ the batch mean in training and
  the running mean (``batch_stats``, momentum 0.9, PyTorch's 0.1) in eval mode. Subtracting a
  constant keeps each neuron 1-Lipschitz; it replaces the hidden biases, which are dropped. The
  output layer has a bias and no mean shift.
- *Identity initialisation*: weights N(0, 1), and when a layer has at least as many outputs as
  inputs, neuron o gets weight −10 on input ``o % n``: then :math:`\|x - w\|_\infty = x_{o \bmod
  n} + 10` (while the other :math:`|x_k - w_k|` stay below that) and the layer starts as a
  shifted copy of its input, which keeps deep stacks trainable.
- *Input normalisation* :math:`(x - \text{input\_mean}) / \text{input\_std}` with a scalar
  std, as in the reference code (CIFAR-10: mean ≈ 0.473 over channels, std 0.2009; MNIST 0.1307,
  0.3081). The logits are multiplied back by ``input_std``, so the network stays 1-Lipschitz in
  the [0, 1] pixel units of the library and its certified radii are in those units. The two
  constants only change the parameterisation (initial weights and the units the optimiser
  steps in), never the function class; the defaults (0, 1) use pixel units throughout.
- *ℓp relaxation*: the paper trains with :math:`\|x - w\|_p`, p growing from 8 to ∞, because
  the ℓ∞ gradient reaches one input per neuron. ``p`` is a static attribute (∞ by default).
  Only the ``p = inf`` network is 1-Lipschitz in ℓ∞ (an ℓp neuron is :math:`n^{1/p}`-Lipschitz),
  so certify and evaluate at ``p = inf``. The parameters do not depend on ``p``: the same
  variables can be applied by modules with different ``p``, e.g. one `Trainer` per stage of a
  schedule, since the trainer builds its module once.

Cost. A layer's output is a reduction over the input of ``|x_i - w_io|`` for every (example,
output) pair: B·N·M elementwise operations, which no matmul can do. The [B, M, N] array of
differences (B=128, N=3072, M=5120: 2·10⁹ floats, 8 GiB) must not be materialised, so

- the forward pass loops (`lax.map`) over blocks of output neurons with at most
  ``chunk_elements`` entries of that array each (one block when it fits);
- for ``p = inf`` a `jax.custom_vjp` keeps only the argmax input of every (example, neuron)
  pair, [B, M] integers, and the backward pass is a gather and two scatter-adds of B·M entries:
  :math:`\partial u_{bo} / \partial x_{bi} = \operatorname{sign}(x_{bi} - w_{io})` at
  :math:`i = \arg\max`, zero elsewhere (ties go to the first maximal input, a valid
  subgradient);
- for ``p < inf`` the gradient is dense, so each block is `jax.checkpoint`-ed: the backward pass
  recomputes it instead of storing it. The norm is taken as
  :math:`m \, \|d / m\|_p` with :math:`m = \max_i d_i`, which cannot overflow for large p.

Measured with XLA's compile-time memory analysis on CPU, gradient of one 3072 → 5120 layer at
B=128: autodiff of a dense ``jnp.max`` needs 16.9 GiB of temporaries, this layer 0.12 GiB
(ℓ∞) and 0.19 GiB (ℓ8; 7.7 GiB unblocked); a whole ``erm`` step of the width-1 net on CIFAR
shapes needs 0.55 GiB. XLA fuses the ℓ∞ forward even unblocked, but on CPU that fused loop ran
6-10x slower (B=64, 3072 → 1024, forward and backward, on a busy 2-core machine: 6 s against
0.5-1 s) than blocks of 2^22-2^26 entries; the default is 2^24. Not measured on a GPU.

References:
  Zhang, Cai, Lu, He & Wang 2021, "Towards Certifying ℓ∞ Robustness using Neural Networks with
  ℓ∞-dist Neurons", ICML (the neuron and its Lipschitz property, mean shift, identity
  initialisation, ℓp relaxation and the hinge loss; github.com/zbh2047/L_inf-dist-net).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# Upper bound on the entries of one block of |x - w| ([B, block, N]); 2^24 float32 = 64 MiB.
CHUNK_ELEMENTS = 1 << 24
# Weight that makes a fresh neuron copy one input (identity initialisation of the paper).
IDENTITY_WEIGHT = -10.0


def _over_output_blocks(fn, x, w, chunk_elements):
    """``fn(x, w_block) -> pytree of [B, block]`` over blocks of the columns of `w`, concatenated.

    `lax.map` runs the blocks one after another; `w` is zero-padded to whole blocks and the
    padded columns are dropped again.
    """
    b, n = x.shape
    m = w.shape[1]
    size = max(1, min(m, chunk_elements // max(1, b * n)))
    if size >= m:
        return fn(x, w)
    num = -(-m // size)
    blocks = jnp.pad(w, ((0, 0), (0, num * size - m))).reshape(n, num, size).transpose(1, 0, 2)
    out = jax.lax.map(lambda wb: fn(x, wb), blocks)  # leaves [num, B, size]
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape(b, num * size)[:, :m], out)


def _abs_diff(x, w):
    """|x[b, i] - w[i, o]| laid out [B, M, N], so the reduction runs over the contiguous axis."""
    return jnp.abs(x[:, None, :] - w.T[None, :, :])


def _linf_max_argmax(x, w):
    d = _abs_diff(x, w)
    return jnp.max(d, axis=-1), jnp.argmax(d, axis=-1).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linf(x, w, chunk_elements):
    return _over_output_blocks(_linf_max_argmax, x, w, chunk_elements)[0]


def _linf_fwd(x, w, chunk_elements):
    u, idx = _over_output_blocks(_linf_max_argmax, x, w, chunk_elements)
    return u, (x, w, idx)


def _linf_bwd(chunk_elements, residuals, g):
    del chunk_elements
    x, w, idx = residuals  # [B, N], [N, M], [B, M]
    cols = jnp.arange(w.shape[1])[None, :]
    rows = jnp.arange(x.shape[0])[:, None]
    # d u[b, o] / d x[b, idx] = sign(x[b, idx] - w[idx, o]) = - d u[b, o] / d w[idx, o].
    s = g * jnp.sign(jnp.take_along_axis(x, idx, axis=1) - w[idx, cols])
    grad_x = jnp.zeros_like(x).at[rows, idx].add(s.astype(x.dtype))
    grad_w = jnp.zeros_like(w).at[idx, cols].add(-s.astype(w.dtype))
    return grad_x, grad_w


_linf.defvjp(_linf_fwd, _linf_bwd)


def _lp_block(p):
    def fn(x, w):
        d = _abs_diff(x, w)
        m = jax.lax.stop_gradient(jnp.max(d, axis=-1, keepdims=True))
        s = jnp.sum((d / jnp.where(m > 0, m, 1.0)) ** p, axis=-1)
        # s >= 1 unless x == w exactly (then the distance is 0; avoid 0 ** (1/p) in the gradient).
        return jnp.where(s > 0, m[..., 0] * jnp.where(s > 0, s, 1.0) ** (1.0 / p), 0.0)

    return jax.checkpoint(fn)


def linf_distance(x, w, *, p=math.inf, chunk_elements=CHUNK_ELEMENTS):
    r"""Distances of every example to every neuron: :math:`u_{bo} = \|x_b - w_{:, o}\|_p`.

    Args:
      x: inputs [B, N].
      w: neuron weights [N, M], one column per neuron.
      p: the norm, ``inf`` (the ℓ∞-dist neuron) or a finite p >= 1 (the training relaxation).
      chunk_elements: at most this many entries of the [B, M, N] array of differences per
        block of neurons (see the module doc).

    Returns:
      [B, M] distances.
    """
    if math.isinf(p):
        return _linf(x, w, int(chunk_elements))
    if p < 1:
        raise ValueError(f"p={p} is not a norm; use p >= 1 or inf.")
    return _over_output_blocks(_lp_block(float(p)), x, w, chunk_elements)


def identity_init(key, shape, dtype=jnp.float32):
    """N(0, 1) weights [N, M]; if N <= M, neuron o also gets `IDENTITY_WEIGHT` on input o % N."""
    n, m = shape
    w = jax.random.normal(key, shape, dtype)
    if n <= m:
        w = w.at[jnp.arange(m) % n, jnp.arange(m)].set(IDENTITY_WEIGHT)
    return w


class DenseLinfDist(nn.Module):
    """A fully connected layer of ℓ∞-dist neurons: ``u = ||x - w||_p (- mean) (+ b)``.

    Attributes:
      features: number of neurons M; the weights are the ``kernel`` [N, M] (one column each).
      use_bias: add a bias per neuron.
      mean_shift: subtract the batch mean (train) or the running mean ``batch_stats/mean``
        (eval) of every neuron.
      momentum: of the running mean (flax convention: new = momentum * old + (1 - momentum) *
        batch).
      p: the norm of the neuron (see `linf_distance`).
      identity_init: use `identity_init` for the kernel (else N(0, 1)).
      chunk_elements: see `linf_distance`.
      dtype: computation dtype.
    """

    features: int
    use_bias: bool = True
    mean_shift: bool = False
    momentum: float = 0.9
    p: float = math.inf
    identity_init: bool = True
    chunk_elements: int = CHUNK_ELEMENTS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        init = identity_init if self.identity_init else nn.initializers.normal(1.0)
        kernel = self.param("kernel", init, (x.shape[-1], self.features))
        u = linf_distance(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            p=self.p,
            chunk_elements=self.chunk_elements,
        )
        if self.mean_shift:
            running = self.variable(
                "batch_stats", "mean", lambda: jnp.zeros((self.features,), jnp.float32)
            )
            if train:
                mean = jnp.mean(u.astype(jnp.float32), axis=0)
                if not self.is_initializing():
                    running.value = self.momentum * running.value + (
                        1.0 - self.momentum
                    ) * jax.lax.stop_gradient(mean)
            else:
                mean = running.value
            u = u - mean.astype(self.dtype)
        if self.use_bias:
            u = u + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return u


class LinfDistNet(nn.Module):
    """The ℓ∞-dist Net: ``depth`` fully connected ℓ∞-dist layers, logits = −(last layer).

    Every logit is 1-Lipschitz w.r.t. the ℓ∞ norm of the [0, 1] image in eval mode (see the
    module doc; in training mode the batch mean couples the examples of a batch).

    Attributes:
      num_classes: K, the neurons of the last layer.
      width: multiplies `hidden`.
      depth: number of ℓ∞-dist layers, the last one included (>= 1).
      hidden: neurons per hidden layer at width 1 (5120, the paper's CIFAR-10 width).
      mean_shift: mean-shift normalisation of the hidden layers (else they get biases).
      momentum: of the running means.
      p: norm of every neuron (``inf``: the certified network; finite: training relaxation).
      input_mean, input_std: scalar input normalisation, undone on the logits (see module doc).
      identity_init: the paper's identity initialisation.
      chunk_elements: memory bound of one block of neurons (see `linf_distance`).
      dtype: computation dtype; logits are float32.
    """

    num_classes: int
    width: float = 1.0
    depth: int = 5
    hidden: int = 5120
    mean_shift: bool = True
    momentum: float = 0.9
    p: float = math.inf
    input_mean: float = 0.0
    input_std: float = 1.0
    identity_init: bool = True
    chunk_elements: int = CHUNK_ELEMENTS
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        if self.depth < 1:
            raise ValueError(f"depth={self.depth}: an ℓ∞-dist net needs at least one layer.")
        if not self.input_std > 0:
            raise ValueError(f"input_std={self.input_std} must be positive.")
        layer = functools.partial(
            DenseLinfDist,
            momentum=self.momentum,
            p=self.p,
            identity_init=self.identity_init,
            chunk_elements=self.chunk_elements,
            dtype=self.dtype,
        )
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        x = (x - self.input_mean) / self.input_std
        h = max(1, int(self.hidden * self.width))
        for _ in range(self.depth - 1):
            x = layer(h, use_bias=not self.mean_shift, mean_shift=self.mean_shift)(x, train)
        self.sow("intermediates", "features", x)  # penultimate features: models.features_fn
        u = layer(self.num_classes, use_bias=True, mean_shift=False)(x, train)
        return (-u * self.input_std).astype(jnp.float32)


def hinge_loss(logits, labels, *, margin, mix=0.75):
    r"""The paper's hinge loss, per example: a mix of the max and the mean hinge over classes.

    With :math:`v_j = g_j - g_y + \theta` for :math:`j \ne y` and :math:`v_y = 0`,
    ``mix * relu(max_j v_j) + (1 - mix) * mean_j relu(v_j)``. It is zero exactly when the true
    logit beats every other one by at least θ = `margin`, so for a 1-Lipschitz network a zero
    loss certifies radius θ / 2. Train with θ above the target 2ε: the reference code's CIFAR-10
    run (test ε = 8/255) penalises interval bounds at ε_train = 0.1568 ≈ 40/255, no looser for
    this network than the Lipschitz bound that θ = 2 ε_train expresses.

    Args:
      logits: [B, K].
      labels: [B] integers.
      margin: θ, in logit units (= pixel units for `LinfDistNet`).
      mix: weight of the max hinge (the reference code uses 0.75).

    Returns:
      [B] losses.
    """
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=bool)
    true = jnp.take_along_axis(logits, labels[:, None], axis=1)
    v = jnp.where(onehot, 0.0, logits - true + margin)
    return mix * jax.nn.relu(jnp.max(v, axis=-1)) + (1.0 - mix) * jnp.mean(jax.nn.relu(v), -1)


def make_hinge_objective(*, margin, mix=0.75):
    """A training objective (the trainer's signature) minimising the mean `hinge_loss`.

    ``Trainer(module=LinfDistNet(...), objective=make_hinge_objective(margin=...), ...)``; the
    ``erm`` objective (cross-entropy) trains the network too, with smaller margins.
    """

    def objective(variables, batch, key, *, apply_fn):
        del key
        logits, model_state = apply_fn(variables, batch["image"], train=True)
        loss = jnp.mean(hinge_loss(logits, batch["label"], margin=margin, mix=mix))
        acc = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return loss, {"model_state": model_state, "metrics": {"loss": loss, "accuracy": acc}}

    return objective
