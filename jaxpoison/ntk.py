"""The empirical neural tangent kernel of a finite network, and kernel regression with it.

``Θ(x, x') = J(x) J(x')ᵀ / K``, with ``J(x) = ∂f(θ, x) / ∂θ`` the Jacobian of the K logits with
respect to the parameters, traced over the logits (the mean of the K per-logit kernels): the
output-scalar kernel that the infinite-width NTK converges to (``Θ ⊗ I_K``), and the one
`kernel_regression` expects. Everything is a pure function of arrays, differentiable with
respect to the inputs (NTGA ascends through it), so callers can jit and grad it.

References:
  Jacot, Gabriel, Hongler. "Neural Tangent Kernel: Convergence and Generalization in Neural
  Networks." NeurIPS 2018.
  Lee, Xiao, Schoenholz, Bahri, Novak, Sohl-Dickstein, Pennington. "Wide Neural Networks of Any
  Depth Evolve as Linear Models Under Gradient Descent." NeurIPS 2019.
  Novak, Sohl-Dickstein, Schoenholz. "Fast Finite Width Neural Tangent Kernel." ICML 2022.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.scipy as jsp


def jacobian(apply_fn, params, x: jax.Array):
    """The per-example Jacobian ``∂f(θ, x_i) / ∂θ``: a pytree like `params` with leaves
    [n, K, *leaf.shape].

    One reverse pass per logit of one example (``vmap(jacrev)``): K vector-Jacobian products
    per example, against P Jacobian-vector products for ``jacfwd``; with K = 10 logits and P
    of 10^5 to 10^6 parameters the reverse pass is the cheap one. It also beats NTK-vector
    products (a jvp over all of x1 per column of the kernel, n2 K of them) for the blocks of
    a few hundred examples NTGA uses (Novak et al. 2022, Table 1).
    """

    def single(xi):
        return jax.jacrev(lambda p: apply_fn(p, xi[None])[0])(params)

    return jax.vmap(single)(x)


def _contract(j1, j2):
    """``Σ_leaves Σ_k J1_k J2_kᵀ / K`` for two Jacobian pytrees."""

    def leaf(a, b):
        a = a.reshape(a.shape[0], a.shape[1], -1)
        b = b.reshape(b.shape[0], b.shape[1], -1)
        return jnp.einsum("ikp,jkp->ij", a, b) / a.shape[1]

    return sum(jax.tree.leaves(jax.tree.map(leaf, j1, j2)))


def _chunks(x, size):
    """`x` zero-padded to a multiple of `size` and reshaped [num_chunks, size, ...]."""
    pad = -x.shape[0] % size
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    return x.reshape(-1, size, *x.shape[1:])


def empirical_ntk(
    apply_fn,
    params,
    x1: jax.Array,
    x2: jax.Array,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """The empirical NTK ``Θ(x1, x2) = J(x1) J(x2)ᵀ / K`` of ``apply_fn(params, x) -> [n, K]``.

    Computed by Jacobian contraction (`jacobian`), block-wise: the Jacobians of at most
    `chunk_size` examples of each side are held at once (memory ``2 · chunk_size · K · P``
    floats instead of ``(n1 + n2) · K · P``), each chunk of `x2` once and each chunk of `x1`
    once per chunk of `x2`. Under reverse-mode differentiation every chunk's Jacobians are
    recomputed (`jax.checkpoint`) rather than stored.

    Args:
      apply_fn: ``apply_fn(params, x) -> logits [n, K]``, a network at fixed parameters.
      params: its parameters.
      x1: [n1, ...] inputs.
      x2: [n2, ...] inputs.
      chunk_size: examples per block (None: all at once).

    Returns:
      [n1, n2] float32.

    Example::

      module = models.make("mlp", num_classes=10, hidden=(64, 64))
      params = module.init(key, x[:1])["params"]
      kernel = empirical_ntk(lambda p, x: module.apply({"params": p}, x), params, x, x)
    """
    if chunk_size is None or chunk_size >= max(x1.shape[0], x2.shape[0]):
        return _contract(jacobian(apply_fn, params, x1), jacobian(apply_fn, params, x2))
    n1, n2 = x1.shape[0], x2.shape[0]
    c1, c2 = _chunks(x1, chunk_size), _chunks(x2, chunk_size)

    @jax.checkpoint
    def column(b):
        jb = jacobian(apply_fn, params, b)
        return jax.lax.map(
            jax.checkpoint(lambda a: _contract(jacobian(apply_fn, params, a), jb)), c1
        )

    blocks = jax.lax.map(column, c2)  # [m2, m1, chunk, chunk]
    kernel = jnp.transpose(blocks, (1, 2, 0, 3)).reshape(c1.shape[0] * chunk_size, -1)
    return kernel[:n1, :n2]


def kernel_regression(
    k_train_train: jax.Array,
    k_test_train: jax.Array,
    y_train: jax.Array,
    *,
    t: float | None = None,
    diag_reg: float = 1e-4,
) -> jax.Array:
    """Test predictions of the kernel's gradient flow on the MSE loss from f = 0, at time `t`.

    ``f(X_test; t) = Θ_tx Θ_reg⁻¹ (I - exp(-t Θ_reg / (n k))) Y``, with ``Θ_reg = Θ +
    diag_reg · mean(diag Θ) · I``; ``t = None`` is t = ∞, ``Θ_tx Θ_reg⁻¹ Y`` (kernel ridge
    regression). Time is counted as by neural-tangents' ``predict.gradient_descent_mse``
    (learning rate 1 on the mean squared error over the n k outputs). The inverse is a
    Cholesky solve; the matrix exponential `jax.scipy.linalg.expm` (Padé, scaling and squaring),
    whose derivative stays finite where eigenvalues are close (an eigendecomposition's does
    not).

    Args:
      k_train_train: Θ(X_train, X_train), [n, n].
      k_test_train: Θ(X_test, X_train), [m, n].
      y_train: training targets (one-hot labels), [n, k].
      t: training time, or None for t = ∞.
      diag_reg: the diagonal regulariser, relative to the kernel's mean diagonal.

    Returns:
      [m, k] predictions (logits).
    """
    n = k_train_train.shape[0]
    scale = jnp.mean(jnp.diag(k_train_train))
    k_reg = k_train_train + diag_reg * scale * jnp.eye(n, dtype=k_train_train.dtype)
    rhs = y_train
    if t is not None:
        # 48 squarings keep exp(-A) finite up to ||A|| of about 1e15 (16, the default, gives
        # NaN past about 3e5, e.g. t = 1e6 on a kernel of eigenvalue 20).
        decay = jsp.linalg.expm(-t / y_train.size * k_reg, max_squarings=48)
        rhs = y_train - decay @ y_train
    factor = jsp.linalg.cho_factor(k_reg, lower=True)
    return k_test_train @ jsp.linalg.cho_solve(factor, rhs)
