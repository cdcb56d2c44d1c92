r"""Interval bound propagation (IBP): guaranteed bounds on a model's logits over an ℓ∞ ball.

For every input :math:`x'` of the box :math:`[\underline{x}, \overline{x}]` (the ℓ∞ ball of
radius ε around x, intersected with [0, 1]), IBP computes elementwise bounds
:math:`\underline{z} \le z(x') \le \overline{z}` on the logits by pushing the box through the
network one operation at a time (Gowal et al. 2018, Eq. 6):

- an affine map with constant weights W (dense, convolution, BatchNorm in eval mode, average
  pooling, multiplication or division by a constant) maps centre and radius,
  :math:`c' = W c + b`, :math:`r' = |W|\, r`;
- a monotone operation (ReLU = max with 0, max-pooling, sums, reshapes, exp, tanh, ...) maps the
  two ends, swapped where it decreases (neg, rsqrt; sub decreases in its second operand).

Nothing is rewritten per model: `interval_fn` traces ``fn`` to a jaxpr and interprets it with
intervals, recursing into ``jit``, ``custom_jvp_call``, ``custom_vjp_call`` and ``cond``. Values
that do not depend on the input (weights, BatchNorm statistics) are computed as usual, so the
bounds are differentiable in the parameters (IBP training, `objectives.ibp`). An operation it
cannot bound (a product of two input-dependent values, an argmax, a sort) raises one
`UnboundedPrimitiveError` naming the primitive and the line of the model that applied it.

CPU convolutions: `jaxpoison.ops` chooses between a CPU formulation (oneDNN custom calls, which
have no interval rule) and XLA's plain convolution with `lax.platform_dependent`. The interpreter
always takes the platform-neutral (``default``) branch, and re-emits every convolution through
`ops.conv_general_dilated`, so the centre and radius convolutions (and their gradients) again
run on the fast CPU kernels.

**Elision of the last layer** (Gowal et al., Sec. 3): the certificate needs lower bounds on the
margins :math:`z_y - z_j`, a linear specification :math:`C z` of the logits. Bounding the logits
first and subtracting (:math:`\underline{z}_y - \overline{z}_j`) forgets that both come from the
same features h; `margin_bounds` instead bounds :math:`C\,(W h + b)` with the combined matrix
:math:`C W` (`elide=True`, the default). It does so for whatever affine tail ends the model (the
last dense layer, a global average pool before it, casts and reshapes): the tail's Jacobian rows
:math:`C_j J` are taken with `jax.vjp`, one per specification row. This assumes the tail acts on
each example separately, as every model in eval mode does.

Floating point: the bounds are computed in the model's precision, not with outward rounding, so
they may miss by rounding error (about 1e-6 relative in float32).

References:
  Gowal, Dvijotham, Stanforth, Bunel, Qin, Uesato, Arandjelovic, Mann, Kohli 2018, "On the
  Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models"
  (github.com/deepmind/interval-bound-propagation).
  Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning, Hsieh 2020, "Towards Stable and Efficient
  Training of Verifiably Robust Neural Networks" (CROWN-IBP; github.com/KaidiXu/auto_LiRPA).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.extend.core as jex
import jax.numpy as jnp
from jax._src import source_info_util  # only to name the model's line in an error

from jaxpoison import ops


class Interval(NamedTuple):
    """Elementwise bounds ``lower <= value <= upper`` (a pytree: jit, vmap and grad see arrays)."""

    lower: jax.Array
    upper: jax.Array

    @property
    def center(self):
        return (self.upper + self.lower) / 2

    @property
    def radius(self):
        return (self.upper - self.lower) / 2


class UnboundedPrimitiveError(ValueError):
    """`interval_fn` met an operation on input-dependent values that it has no rule for.

    Attributes:
      primitive: the primitive's name; reason: why it cannot be bounded; where: the model's
        source line that applied it (of the outermost call when the primitive sits inside a
        library function such as ``jnp.sort``).
    """

    def __init__(self, primitive, reason, where):
        self.primitive, self.reason, self.where = primitive, reason, where
        line = where or "an unknown line"
        super().__init__(
            f"ibp: cannot bound `{primitive}` ({reason}) in the model, at {line}; "
            "IBP bounds affine layers, BatchNorm in eval mode, monotone activations and pooling: "
            "use a model built from those (mlp, cnn_mnist, cnn_cifar, vgg*, resnet*; linf_dist "
            "has its own certificate, the 'certified' evaluator)."
        )


def linf_box(x, epsilon, mask=None):
    """The ℓ∞ ball of radius `epsilon` around `x`, intersected with [0, 1], as an `Interval`.

    Args:
      x: images in [0, 1].
      epsilon: the radius (a float or a traced scalar, e.g. a ramped training radius).
      mask: optional pixel mask broadcastable to `x`; pixels where it is 0 stay fixed.
    """
    radius = epsilon if mask is None else epsilon * mask
    return Interval(jnp.clip(x - radius, 0.0, 1.0), jnp.clip(x + radius, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------
# Rules. Each takes the equation and its inputs (arrays where exact, `Interval` where they depend
# on the input) and returns the list of its outputs.

# Monotone primitives: +1 where the output increases in that operand, -1 where it decreases.
# Operands beyond the tuple are taken as +1 (variadic concatenate, reduce over several arrays).
_MONOTONE = {
    name: (1,)
    for name in (
        "add",
        "add_any",
        "max",
        "min",
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_window_sum",
        "reduce_window_max",
        "reduce_window_min",
        "cumsum",
        "cummax",
        "cummin",
        "convert_element_type",
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "slice",
        "dynamic_slice",
        "dynamic_update_slice",
        "gather",
        "concatenate",
        "pad",
        "rev",
        "copy",
        "copy_p",
        "reduce_precision",
        "clamp",
        "exp",
        "exp2",
        "log",
        "log1p",
        "expm1",
        "tanh",
        "logistic",
        "sqrt",
        "cbrt",
        "erf",
        "atan",
        "asinh",
        "floor",
        "ceil",
        "round",
        "sign",
    )
}
_MONOTONE |= {"sub": (1, -1), "neg": (-1,), "rsqrt": (-1,)}

# Affine in their input-dependent operand (given the others): what `margin_bounds` may fold into
# the specification. `mul` and the bilinear ones only with one input-dependent operand, `div` only
# in its numerator (checked in `_affine_use`).
_AFFINE = {
    "add",
    "add_any",
    "sub",
    "neg",
    "mul",
    "div",
    "dot_general",
    "reduce_sum",
    "convert_element_type",
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "slice",
    "concatenate",
    "copy",
    "copy_p",
}

# Call-like primitives: the parameter holding the jaxpr to interpret instead.
_CALLS = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr",
    "remat": "jaxpr",
}


class _Platform(NamedTuple):
    """The value of `platform_index`: the branch for a platform-neutral formulation."""

    index: int


def _is_interval(v):
    return isinstance(v, Interval)


def _lower(v):
    return v.lower if _is_interval(v) else v


def _upper(v):
    return v.upper if _is_interval(v) else v


def _bind(eqn, args):
    out = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]


def _monotone(eqn, args):
    signs = _MONOTONE[eqn.primitive.name]
    sign = lambda i: signs[i] if i < len(signs) else signs[-1]
    lo = [_lower(a) if sign(i) > 0 else _upper(a) for i, a in enumerate(args)]
    hi = [_upper(a) if sign(i) > 0 else _lower(a) for i, a in enumerate(args)]
    return [Interval(a, b) for a, b in zip(_bind(eqn, lo), _bind(eqn, hi), strict=True)]


def _conv(eqn, lhs, rhs):
    params = {k: v for k, v in eqn.params.items() if k != "out_sharding"}
    return ops.conv_general_dilated(lhs, rhs, **params)


def _bilinear_one(eqn, lhs, rhs):
    """Bilinear op (mul, dot_general, conv) with exactly one input-dependent operand."""
    if eqn.primitive.name == "conv_general_dilated":
        apply = lambda a, b: _conv(eqn, a, b)
    else:
        apply = lambda a, b: _bind(eqn, [a, b])[0]
    if _is_interval(lhs):
        center, radius = apply(lhs.center, rhs), apply(lhs.radius, jnp.abs(rhs))
    else:
        center, radius = apply(lhs, rhs.center), apply(jnp.abs(lhs), rhs.radius)
    return [Interval(center - radius, center + radius)]


def _bilinear(eqn, args):
    lhs, rhs = args
    if _is_interval(lhs) and _is_interval(rhs):
        if eqn.primitive.name != "mul":
            raise _unbounded(eqn, "a product of two input-dependent operands")
        products = [a * b for a in (lhs.lower, lhs.upper) for b in (rhs.lower, rhs.upper)]
        return [
            Interval(
                functools.reduce(jnp.minimum, products), functools.reduce(jnp.maximum, products)
            )
        ]
    return _bilinear_one(eqn, lhs, rhs)


def _div(eqn, args):
    num, den = args
    if _is_interval(den):
        raise _unbounded(eqn, "a division by an input-dependent value")
    center, radius = num.center / den, num.radius / jnp.abs(den)
    return [Interval(center - radius, center + radius)]


def _abs_interval(v):
    lo = jnp.where(v.lower >= 0, v.lower, jnp.where(v.upper <= 0, -v.upper, 0.0))
    return Interval(lo, jnp.maximum(jnp.abs(v.lower), jnp.abs(v.upper)))


def _abs(eqn, args):
    del eqn
    return [_abs_interval(args[0])]


def _power(eqn, args):
    (v,) = args
    y = eqn.params.get("y", 2)
    if y < 0:
        raise _unbounded(eqn, "a negative power of an input-dependent value")
    if y % 2 == 0:
        v = _abs_interval(v)
    return [Interval(*(_bind(eqn, [b])[0] for b in v))]


def _select(eqn, args):
    which, *cases = args
    if _is_interval(which):
        raise _unbounded(eqn, "a selection whose predicate depends on the input")
    lo = _bind(eqn, [which, *map(_lower, cases)])[0]
    hi = _bind(eqn, [which, *map(_upper, cases)])[0]
    return [Interval(lo, hi)]


_RULES = {name: _monotone for name in _MONOTONE}
_RULES |= {name: _bilinear for name in ("mul", "dot_general", "conv_general_dilated")}
_RULES |= {"div": _div, "abs": _abs, "integer_pow": _power, "square": _power, "select_n": _select}


def _where(eqn):
    return source_info_util.summarize(eqn.source_info)


def _unbounded(eqn, reason):
    return UnboundedPrimitiveError(eqn.primitive.name, reason, _where(eqn))


def _located(eqn, sub_eval):
    """Runs ``sub_eval()`` (an inner jaxpr of `eqn`); an error from inside without a line of
    user code (the primitive sat in a library function) is given `eqn`'s line."""
    try:
        return sub_eval()
    except UnboundedPrimitiveError as e:
        if e.where:
            raise
        raise UnboundedPrimitiveError(e.primitive, e.reason, _where(eqn)) from None


def _cond(eqn, args):
    index, *operands = args
    branches = eqn.params["branches"]
    if isinstance(index, _Platform):
        branch = branches[index.index]
        return _located(eqn, lambda: _eval(branch.jaxpr, branch.consts, operands))
    if _is_interval(index):
        raise _unbounded(eqn, "a branch chosen by an input-dependent value")
    outs = [_located(eqn, lambda b=b: _eval(b.jaxpr, b.consts, operands)) for b in branches]
    index = jnp.clip(index, 0, len(branches) - 1)
    return [
        Interval(
            jax.lax.select_n(index, *(_lower(o[i]) for o in outs)),
            jax.lax.select_n(index, *(_upper(o[i]) for o in outs)),
        )
        if any(_is_interval(o[i]) for o in outs)
        else jax.lax.select_n(index, *(o[i] for o in outs))
        for i in range(len(eqn.outvars))
    ]


def _platform_index(eqn):
    platforms = eqn.params["platforms"]
    if None not in platforms:
        raise _unbounded(eqn, "a platform-dependent branch without a platform-neutral default")
    return [_Platform(platforms.index(None))]


def _call(eqn, args):
    sub = eqn.params[_CALLS[eqn.primitive.name]]
    if isinstance(sub, jex.ClosedJaxpr):
        return _located(eqn, lambda: _eval(sub.jaxpr, sub.consts, args))
    return _located(eqn, lambda: _eval(sub, [], args))


def _eqn(eqn, args):
    """One equation on arrays and intervals."""
    name = eqn.primitive.name
    if name == "platform_index":
        return _platform_index(eqn)
    if name == "cond":
        return _cond(eqn, args)
    if not any(map(_is_interval, args)):
        return _bind(eqn, args)
    if name in _CALLS:
        return _call(eqn, args)
    if name not in _RULES:
        raise _unbounded(eqn, "no interval rule")
    if any(_is_interval(a) and not jnp.issubdtype(a.lower.dtype, jnp.floating) for a in args):
        raise _unbounded(eqn, "an integer that depends on the input")
    return _RULES[name](eqn, args)


def _read(env, v):
    return v.val if isinstance(v, jex.Literal) else env[v]


def _eval_eqns(eqns, env):
    for eqn in eqns:
        outs = _eqn(eqn, [_read(env, v) for v in eqn.invars])
        env.update(zip(eqn.outvars, outs, strict=True))


def _eval(jaxpr, consts, args):
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    _eval_eqns(jaxpr.eqns, env)
    return [_read(env, v) for v in jaxpr.outvars]


def interval_fn(fn):
    """``fn`` lifted to intervals: ``interval_fn(fn)(*args)`` with some args `Interval`s.

    Args:
      fn: a function of arrays (close over the model's variables: they are exact).

    Returns:
      A function of the same arguments, where each argument may be an `Interval`; it returns
      ``fn``'s outputs (same pytree), those that depend on an interval argument as `Interval`s
      that contain every value ``fn`` takes with each interval argument anywhere in its box.

    Raises:
      UnboundedPrimitiveError: ``fn`` applies an operation without an interval rule to a value
        that depends on an interval argument.
    """

    def lifted(*args):
        is_leaf = _is_interval
        flat, tree = jax.tree.flatten(args, is_leaf=is_leaf)
        centers = [a.center if _is_interval(a) else a for a in flat]
        closed, out_shape = jax.make_jaxpr(
            lambda *f: fn(*jax.tree.unflatten(tree, f)), return_shape=True
        )(*centers)
        outs = _eval(closed.jaxpr, closed.consts, flat)
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return lifted


def bounds(logits_fn, x, epsilon, mask=None):
    """Interval bounds of ``logits_fn(x')`` over the ℓ∞ ball of radius ε around x within [0, 1].

    Args:
      logits_fn: ``x -> logits`` (e.g. ``lambda x: apply_fn(variables, x, train=False)[0]``).
      x: images [B, ...] in [0, 1].
      epsilon: the ℓ∞ radius.
      mask: optional pixel mask of the ball (`linf_box`).

    Returns:
      An `Interval` of [B, K] logits.
    """
    return interval_fn(logits_fn)(linf_box(x, epsilon, mask))


def _split(jaxpr, *, elide):
    """Index of the first equation of the longest suffix affine in the input-dependent values,
    and the set of input-dependent variables."""
    tainted = set(jaxpr.invars)
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jex.Literal) and v in tainted for v in eqn.invars):
            tainted.update(eqn.outvars)
    if not elide:
        return len(jaxpr.eqns), tainted
    start = len(jaxpr.eqns)
    while start > 0 and _affine_use(jaxpr.eqns[start - 1], tainted):
        start -= 1
    return start, tainted


def _affine_use(eqn, tainted):
    flags = [not isinstance(v, jex.Literal) and v in tainted for v in eqn.invars]
    if not any(flags):
        return True
    name = eqn.primitive.name
    if name not in _AFFINE:
        return False
    if name in ("mul", "dot_general"):
        return sum(flags) == 1
    if name == "div":
        return flags == [True, False]
    return True


def margin_bounds(logits_fn, x, spec, epsilon, *, mask=None, elide=True):
    """Lower and upper bounds of the specification ``spec @ logits_fn(x')`` over the ball.

    With ``elide=True`` the affine tail of the model (its last dense layer and whatever affine
    operations lead to it from the last nonlinearity) is folded into `spec`, which bounds
    ``spec @ W h`` with the combined matrix (Gowal et al. 2018, Sec. 3; tighter); with False, the
    logits are bounded first and `spec` applied to the box (the plain IBP bound).

    Args:
      logits_fn: ``x -> logits`` [B, K], acting on each example separately.
      x: images [B, ...] in [0, 1].
      spec: [B, J, K] rows of linear combinations of the logits, per example.
      epsilon: the ℓ∞ radius.
      mask: optional pixel mask of the ball.
      elide: fold the affine tail into `spec`.

    Returns:
      An `Interval` of [B, J].
    """
    box = linf_box(x, epsilon, mask)
    closed = jax.make_jaxpr(logits_fn)(box.center)
    jaxpr = closed.jaxpr
    start, tainted = _split(jaxpr, elide=elide)
    env = dict(zip(jaxpr.constvars, closed.consts, strict=True))
    env[jaxpr.invars[0]] = box
    _eval_eqns(jaxpr.eqns[:start], env)
    tail = jaxpr.eqns[start:]
    # The tail's input-dependent inputs: variables it (or the output) reads, defined before it.
    defined = {v for eqn in tail for v in eqn.outvars}
    reads = [v for eqn in tail for v in eqn.invars] + list(jaxpr.outvars)
    hs = []
    for v in reads:
        if not isinstance(v, jex.Literal) and v in tainted and v not in defined and v not in hs:
            hs.append(v)

    def tail_fn(*values):
        local = dict(env)
        local.update(zip(hs, values, strict=True))
        for eqn in tail:
            outs = _eqn(eqn, [_read(local, v) for v in eqn.invars])
            local.update(zip(eqn.outvars, outs, strict=True))
        return _read(local, jaxpr.outvars[0])

    centers = [env[v].center for v in hs]
    logits, vjp = jax.vjp(tail_fn, *centers)
    center = jnp.einsum("bjk,bk->bj", spec, logits.astype(spec.dtype))
    if not hs:
        return Interval(center, center)

    def row_radius(row):
        grads = vjp(row.astype(logits.dtype))
        return sum(
            jnp.sum((jnp.abs(g) * env[v].radius).reshape(g.shape[0], -1), axis=1)
            for g, v in zip(grads, hs, strict=True)
        )

    radius = jax.vmap(row_radius, in_axes=1, out_axes=1)(spec)
    return Interval(center - radius, center + radius)


def margin_spec(labels, num_classes):
    """[B, K, K] rows ``e_y - e_j`` (row y is zero): ``spec @ z`` are the margins z_y − z_j."""
    eye = jnp.eye(num_classes, dtype=jnp.float32)
    return eye[labels][:, None, :] - eye[None, :, :]


def worst_case_logits(logits_fn, x, labels, epsilon, *, num_classes, mask=None, elide=True):
    """Gowal et al.'s worst-case logits: ``ẑ_j = −lower(z_y − z_j)`` (0 at j = y).

    The cross-entropy of ẑ with the labels is the IBP (verified) training loss: an upper bound on
    the cross-entropy at every point of the ball. An example is certified when every
    ``ẑ_j < 0`` for j ≠ y.

    Args:
      logits_fn, x, epsilon, mask, elide: as in `margin_bounds`.
      labels: [B] true labels.
      num_classes: K.

    Returns:
      [B, K] worst-case logits.
    """
    spec = margin_spec(labels, num_classes)
    return -margin_bounds(logits_fn, x, spec, epsilon, mask=mask, elide=elide).lower


def certified(worst_logits, labels):
    """[B] bool: every other class's worst-case logit is below 0 (the margins' lower bounds > 0)."""
    own = jax.nn.one_hot(labels, worst_logits.shape[-1], dtype=bool)
    return jnp.all(own | (worst_logits < 0), axis=-1)


__all__ = [
    "Interval",
    "UnboundedPrimitiveError",
    "bounds",
    "certified",
    "interval_fn",
    "linf_box",
    "margin_bounds",
    "margin_spec",
    "worst_case_logits",
]
