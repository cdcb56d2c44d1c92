r"""Differentiable bi-level optimisation: hypergradients through training, unrolled or implicit.

A bi-level problem trains inner parameters θ on data shaped by outer variables φ, then scores
the trained θ with an outer objective, and asks for the gradient of that score with respect to
φ (the *hypergradient*):

    min_φ  F(φ) = outer(θ_T(φ), φ),      θ_{t+1} = step(φ, θ_t, batch_t, key_t),  t = 0..T-1

φ is any pytree: the parameters of a noise generator (Learning to Confuse), a per-example
perturbation table δ[N, ...] of which each step sees the rows of its batch (MetaPoison), the inner
learning rate or weight decay (hyperparameter optimisation), per-example weights. This module
writes F as a plain function of φ, so `jax.grad`, `jax.jit` and `jax.vmap` apply to it directly;
φ travels as a traced argument into every step and nothing is rebuilt inside `jax.grad`.

The pieces:

* A **step function** ``step_fn(hyper, state, batch, key) -> (state, aux)``: one inner update,
  pure. `optax_step` builds one from a loss ``loss_fn(params, hyper, batch, key)`` and an optax
  optimizer, or from a function ``hyper -> optimizer`` so that its learning rate and weight
  decay are differentiable; its state is an `InnerState` (`init_inner`). Any pure function of
  this signature works: L2C (`jaxpoison.poisons.l2c`) passes `train_state.train_step` with the
  victim's objective on the generator's noisy batch.
* A **stream**: the T batches of the inner run stacked along a leading axis (a pytree of
  ``[T, b, ...]`` arrays), each batch ``{'image', 'label', 'index'}`` where ``index`` holds the
  examples' rows in the training set. `batches` draws one from a dataset; `perturb` adds the
  rows of a per-example δ table to a batch by those indices.
* `unroll`: the T steps as one `jax.lax.scan`; `jax.grad` through it is the exact hypergradient
  (reverse mode through the whole training run). With ``remat=True`` memory stays about flat in
  T (see `remat_scan`: ~T/S + S stored states for segments of S steps, against T steps of
  activations); ``truncation=K`` differentiates only the last K steps, the first T - K run with
  φ and the state under `stop_gradient` (truncated back-propagation).
* The **outer objective** is any function of the final state and of φ: a loss on a held-out
  batch or on a stream of them, a negated loss, an accuracy surrogate, a penalty on φ. Write it
  and differentiate the composition.
* `implicit_argmin`: the hypergradient of a *converged* inner problem by the implicit function
  theorem, without differentiating through the solver. At a stationary point of the inner loss
  L(θ, φ), ∇_θ L(θ*(φ), φ) = 0, so

      dF/dφ = ∂_φ outer − ∂²_{φθ} L · (∇²_θθ L + λ I)^{-1} ∇_θ outer,

  solved by conjugate gradient on Hessian-vector products (λ is the ``damping``, 0 for the exact
  theorem). It costs one linear solve instead of storing or recomputing T steps, and is exact
  only at convergence; a test checks unrolled and implicit hypergradients agree on a strongly
  convex inner problem run to convergence.

Example: the hypergradient of a held-out loss with respect to a per-example δ table and the
inner learning rate, through 20 SGD steps of a linear model::

    def loss_fn(w, hyper, batch, key):
        x = perturb(hyper["delta"], batch)["image"].reshape(len(batch["label"]), -1)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ w, batch["label"]))

    tx = lambda hyper: optax.sgd(hyper["lr"])
    step = optax_step(loss_fn, tx)
    stream = batches(train, num_steps=20, batch_size=32, key=jax.random.key(0))

    def outer(hyper):
        final, _ = unroll(step, hyper, init_inner(w0, tx, hyper), stream)
        x = held_out["image"].reshape(len(held_out["label"]), -1)
        logits = x @ final.params
        return -jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, held_out["label"]))

    grads = jax.jit(jax.grad(outer))({"delta": jnp.zeros_like(train["image"]), "lr": 0.1})

docs/bilevel.md has runnable examples (an L2C generator, a δ table, a learning rate and weight
decay, an implicit gradient, per-example weights on noisy labels), each checked against central
finite differences by tests/test_bilevel.py.

References:
  Maclaurin, Duvenaud & Adams, "Gradient-based Hyperparameter Optimization through Reversible
  Learning", ICML 2015 (reverse mode through SGD with momentum, learning-rate hypergradients).
  Shaban, Cheng, Hatch & Boots, "Truncated Back-propagation for Bilevel Optimization", AISTATS
  2019 (truncation).
  Griewank & Walther, "Algorithm 799: Revolve", ACM TOMS 2000 (checkpointed reverse sweeps).
  Pedregosa, "Hyperparameter optimization with approximate gradient", ICML 2016, and
  Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019
  (implicit function theorem, conjugate gradient on the damped Hessian).
  Blondel et al., "Efficient and Modular Implicit Differentiation", NeurIPS 2022 (jaxopt).
  Huang, Geiping, Fowl, Taylor & Goldstein, "MetaPoison: Practical General-purpose Clean-label
  Data Poisoning", NeurIPS 2020 (a per-example δ table through unrolled training).
  Feng, Cai & Zhou, "Learning to Confuse", NeurIPS 2019 (a generator through training).
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class InnerState:
    """The state `optax_step` trains: parameters θ and the optimizer's state."""

    params: Any
    opt_state: Any


def _optimizer(tx, hyper):
    return tx if isinstance(tx, optax.GradientTransformation) else tx(hyper)


def init_inner(params, tx, hyper=None):
    """A fresh `InnerState` of `params` for `optax_step`.

    Args:
      params: the inner parameters θ_0 (any pytree).
      tx: the optax optimizer, or a function ``hyper -> optimizer`` (called with `hyper`).
      hyper: what to call `tx` with when it is a function (its values only shape the state).
    """
    return InnerState(params, _optimizer(tx, hyper).init(params))


def optax_step(loss_fn, tx, *, has_aux=False):
    """A step function ``(hyper, state, batch, key) -> (state, aux)`` of one optax update.

    Args:
      loss_fn: ``loss_fn(params, hyper, batch, key) -> loss`` (or ``(loss, aux)`` with
        `has_aux`), a scalar to minimise over params. `hyper` is the outer variable: it can
        perturb the batch (`perturb`), weight its examples, or be ignored.
      tx: an optax `GradientTransformation`, or a function ``hyper -> GradientTransformation``
        rebuilt at every step from the traced `hyper` (so e.g.
        ``lambda h: optax.chain(optax.add_decayed_weights(h['wd']), optax.sgd(h['lr']))``
        makes the learning rate and weight decay differentiable).
      has_aux: whether `loss_fn` returns ``(loss, aux)``.

    Returns:
      ``step_fn(hyper, state, batch, key) -> (state, {'loss': loss, **aux})`` on `InnerState`.
    """

    def step_fn(hyper, state, batch, key):
        out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(state.params, hyper, batch, key)
        loss, aux = out if has_aux else (out, {})
        updates, opt_state = _optimizer(tx, hyper).update(grads, state.opt_state, state.params)
        return InnerState(optax.apply_updates(state.params, updates), opt_state), {
            "loss": loss,
            **aux,
        }

    return step_fn


def batches(data, *, num_steps, batch_size, key):
    """A stream of `num_steps` batches of `batch_size` examples, with their indices.

    Consecutive batches walk through random permutations of the dataset (an epoch, then the
    next), so every example appears once per epoch. ``index`` is ``data['index'][rows]`` when
    the dataset carries its own indices (a crafting batch of a larger training set) and the
    rows themselves otherwise; a per-example table of the whole set is indexed by it.

    Args:
      data: a dict of arrays with a common leading axis N (``{'image', 'label', ...}``).
      num_steps: T >= 1.
      batch_size: examples per batch, 1..N.
      key: PRNG key of the permutations.

    Returns:
      The dict with every array reshaped to ``[T, batch_size, ...]``, ``'index'`` included.
    """
    sizes = {name: jnp.shape(a)[0] if jnp.ndim(a) else None for name, a in data.items()}
    if not data or len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(
            f"data must be a non-empty dict of arrays with one leading size, got sizes {sizes}."
        )
    n = next(iter(sizes.values()))
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size={batch_size} must be in 1..{n} (the dataset's size).")
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps} must be >= 1.")
    total = num_steps * batch_size
    epochs = -(-total // n)
    keys = jax.random.split(key, epochs)
    rows = jnp.concatenate([jax.random.permutation(k, n) for k in keys])[:total]
    rows = rows.reshape(num_steps, batch_size)
    index = data["index"][rows] if "index" in data else rows
    stream = {name: a[rows] for name, a in data.items() if name != "index"}
    return {**stream, "index": index}


def perturb(delta_table, batch, *, threat=None):
    """The batch with ``image + delta_table[batch['index']]`` (MetaPoison's per-example δ).

    Args:
      delta_table: ``[N, *image_shape]``, one perturbation per training example.
      batch: ``{'image' [b, *image_shape], 'index' [b], ...}``.
      threat: an optional `jaxpoison.threat.LpBall`: the rows are projected into it (and the
        [0, 1] box) before they are added. Without it the table is used as is. The ℓ2
        projection's gradient is NaN at a zero row (the norm's derivative at 0): a table that
        starts at 0 should be kept in the ball by the outer step instead.

    Returns:
      The batch with the perturbed images.
    """
    if "index" not in batch:
        raise ValueError(
            "perturb needs the batch's example indices in batch['index']; draw the stream "
            "with bilevel.batches or add them."
        )
    x = batch["image"]
    if delta_table.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"delta_table rows have shape {delta_table.shape[1:]} but the batch's images "
            f"{x.shape[1:]}; make the table [N, *image_shape]."
        )
    delta = delta_table[batch["index"]]
    if threat is not None:
        delta = threat.project(delta, x)
    return dict(batch, image=x + delta)


def _length(xs, what):
    leaves = jax.tree.leaves(xs)
    lengths = {jnp.shape(a)[0] if jnp.ndim(a) else 0 for a in leaves}
    if not leaves or lengths == {0}:
        raise ValueError(f"The {what} is empty: give it T >= 1 batches along a leading axis.")
    if len(lengths) != 1:
        raise ValueError(
            f"The {what}'s arrays disagree on the number of steps T (leading sizes "
            f"{sorted(lengths)}); stack every field along one leading axis of length T."
        )
    return lengths.pop()


def remat_scan(body, carry, xs, *, remat=True, segment=None):
    """`jax.lax.scan` of `body`; with `remat`, checkpointed per step and per segment of steps.

    Two-level checkpointing: the outer scan stores one carry per segment of `segment` steps;
    during the backward pass each segment is recomputed, storing one carry per step inside it,
    and each step's activations are recomputed from its carry. Memory: ~(T/S + S) carries for
    T steps and segments of S (None: S = round(√T), the minimum); S = 1 or S >= T is one level
    (T carries). T need not be a multiple of S: the last T mod S steps form a shorter segment.

    Args:
      body: ``body(carry, x) -> (carry, y)`` as for `lax.scan`.
      carry: the initial carry.
      xs: a pytree of arrays with a leading axis T >= 1.
      remat: checkpoint (False: a plain `lax.scan`, storing every step's residuals).
      segment: steps per checkpointed segment (None: round(√T)).

    Returns:
      ``(carry, ys)`` as `lax.scan`.
    """
    length = _length(xs, "scanned sequence")
    if segment is None:
        segment = max(1, round(math.sqrt(length)))
    if segment < 1:
        raise ValueError(f"segment={segment} must be >= 1 (steps per checkpointed segment).")
    if length == 1:
        # One step needs neither a loop (XLA:CPU compiles the convolutions of a loop body worse)
        # nor remat (the step's residuals are live either way).
        carry, y = body(carry, jax.tree.map(lambda a: a[0], xs))
        return carry, jax.tree.map(lambda a: a[None], y)
    if not remat:
        return jax.lax.scan(body, carry, xs)
    body = jax.checkpoint(body)
    if segment <= 1 or segment >= length:
        return jax.lax.scan(body, carry, xs)
    n, r = divmod(length, segment)
    head = jax.tree.map(lambda a: a[: n * segment].reshape(n, segment, *a.shape[1:]), xs)

    @jax.checkpoint
    def run_segment(c, seg_xs):
        return jax.lax.scan(body, c, seg_xs)

    carry, ys = jax.lax.scan(run_segment, carry, head)
    ys = jax.tree.map(lambda a: a.reshape(n * segment, *a.shape[2:]), ys)
    if r:
        tail = jax.tree.map(lambda a: a[n * segment :], xs)
        carry, ys_tail = jax.lax.scan(body, carry, tail)
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys, ys_tail)
    return carry, ys


def unroll(step_fn, hyper, state, stream, keys=None, *, truncation=None, remat=True, segment=None):
    """Runs ``state <- step_fn(hyper, state, batch_t, key_t)`` over the T batches of `stream`.

    Differentiable in `hyper` (and in `state`): ``jax.grad`` of any function of the result is
    the hypergradient through the T steps.

    Args:
      step_fn: ``step_fn(hyper, state, batch, key) -> (state, aux)``, pure (`optax_step`).
      hyper: the outer variables φ, any pytree (traced: differentiate with respect to it).
      state: the inner state at step 0.
      stream: the T batches, a pytree with a leading axis T >= 1 (`batches`).
      keys: T PRNG keys, one per step (None: `step_fn` receives None).
      truncation: K in 1..T: only the last K steps are differentiated; the first T - K see
        ``stop_gradient(hyper)`` and their final state is cut from the graph (None: K = T).
      remat: checkpoint the steps (`remat_scan`); the gradient is the same either way.
      segment: steps per checkpointed segment (None: round(√K)).

    Returns:
      ``(state after T steps, aux stacked over the T steps)``.
    """
    num_steps = _length(stream, "stream")
    if keys is not None and len(keys) != num_steps:
        raise ValueError(
            f"{len(keys)} keys for a stream of T={num_steps} batches; give one per step."
        )
    truncation = num_steps if truncation is None else int(truncation)
    if not 1 <= truncation <= num_steps:
        raise ValueError(
            f"truncation={truncation} must be in 1..T={num_steps} (the stream's length)."
        )
    xs = (stream, keys)

    def body(h):
        def step(carry, inputs):
            batch, key = inputs
            return step_fn(h, carry, batch, key)

        return step

    head = num_steps - truncation
    head_aux = None
    if head:
        # The first T - K steps are not differentiated: no residuals are kept for them.
        frozen = jax.lax.stop_gradient(hyper)
        state, head_aux = jax.lax.scan(body(frozen), state, jax.tree.map(lambda a: a[:head], xs))
        state = jax.lax.stop_gradient(state)
    tail = jax.tree.map(lambda a: a[head:], xs)
    state, aux = remat_scan(body(hyper), state, tail, remat=remat, segment=segment)
    if head:
        aux = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head_aux, aux)
    return state, aux


def hvp(loss_fn, params, vector, *args):
    """The Hessian-vector product ∇²_θ loss_fn(θ, *args) · v (forward over reverse)."""
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (vector,))[1]


def implicit_argmin(solver, inner_loss, *, damping=0.0, tol=1e-10, maxiter=None):
    """Makes a converged inner solver differentiable by the implicit function theorem.

    ``solve(hyper, params0, *args)`` returns ``solver(hyper, params0, *args)``, assumed to be a
    stationary point θ* of ``inner_loss(θ, hyper, *args)``. Its vector-Jacobian product does
    not go through the solver: for a cotangent g of θ* it solves ``(H + damping·I) v = g``,
    with H = ∇²_θ inner_loss at θ*, by conjugate gradient on Hessian-vector products, and
    returns ``-v·∂²_{θ,hyper} inner_loss`` (and the same for each of `args`), the implicit
    function theorem's cotangent. Memory and time do not grow with the solver's iterations.

    The answer is exact when θ* is an exact stationary point and H is positive definite
    (conjugate gradient needs a symmetric positive definite system: a convex inner loss, or
    ``damping`` > 0 to make it one, which also regularises the solve as in iMAML).

    Args:
      solver: ``solver(hyper, params0, *args) -> θ*``; it is run, never differentiated (e.g.
        ``lambda h, p, *a: unroll(step_fn, h, init_inner(p, tx), stream)[0].params``).
      inner_loss: ``inner_loss(θ, hyper, *args) -> scalar``, whose minimiser θ* is.
      damping: λ >= 0 added to the Hessian's diagonal.
      tol: conjugate gradient's relative residual tolerance.
      maxiter: conjugate gradient iterations (None: 10 × the number of parameters).

    Returns:
      ``solve(hyper, params0, *args) -> θ*``, differentiable in `hyper` and `args` (a
      converged θ* does not depend on `params0`: its cotangent is zero).
    """
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0 (it is added to the Hessian).")

    @jax.custom_vjp
    def solve(hyper, params0, *args):
        return solver(hyper, params0, *args)

    def fwd(hyper, params0, *args):
        params = solver(hyper, params0, *args)
        return params, (params, hyper, params0, args)

    def bwd(residuals, g):
        params, hyper, params0, args = residuals

        def matvec(v):
            hv = hvp(inner_loss, params, v, hyper, *args)
            return jax.tree.map(lambda a, b: a + damping * b, hv, v)

        v, _ = jax.scipy.sparse.linalg.cg(matvec, g, tol=tol, atol=0.0, maxiter=maxiter)
        grad_of = lambda h, *a: jax.grad(inner_loss)(params, h, *a)
        _, vjp = jax.vjp(grad_of, hyper, *args)
        cotangents = vjp(jax.tree.map(jnp.negative, v))
        zeros = jax.tree.map(jnp.zeros_like, params0)
        return (cotangents[0], zeros, *cotangents[1:])

    solve.defvjp(fwd, bwd)
    return solve


__all__ = [
    "InnerState",
    "batches",
    "hvp",
    "implicit_argmin",
    "init_inner",
    "optax_step",
    "perturb",
    "remat_scan",
    "unroll",
]
