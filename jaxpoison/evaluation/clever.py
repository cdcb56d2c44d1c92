r"""CLEVER: an extreme-value estimate of the local Lipschitz constant, and the robustness score.

For a point x predicted as c and another class j, the margin :math:`g(x) = z_c(x) - z_j(x)` is
positive; it stays positive within distance :math:`g(x_0) / L_q` of x0 in the ℓp ball of radius R,
with :math:`L_q = \max_{x \in B_p(x_0, R)} \|\nabla g(x)\|_q` (q the dual norm: 2 for ℓ2, 1 for ℓ∞).
CLEVER estimates :math:`L_q` by sampling: N_b batches of N_s points uniform in the ball (clipped to
the [0, 1] box), the largest gradient norm of each batch, and a reverse Weibull distribution
fitted to these N_b maxima; its location parameter (the distribution's right end) is the
estimate. The score is

.. math::
    \text{CLEVER-t}(x_0, j) = \min\big(g(x_0) / \hat L_q,\ R\big), \qquad
    \text{CLEVER-u}(x_0) = \min_{j \ne c} \text{CLEVER-t}(x_0, j).

It is an estimate, not a certificate: a lower bound of the minimal perturbation only when the
estimate is not below the true :math:`L_q`. The location is never below the largest sample.

The gradients run on the devices (`gradient_maxima`: one forward and K vmapped VJPs per batch of
samples, all examples of a batch at once); the Weibull fits run on the host, our own maximum
likelihood with scipy (`fit_reverse_weibull`): the reference's rescaling of the maxima to [-1, 0],
Nelder–Mead from its seven initial shapes with its small penalty against divergence (0.01 times
the square of the third parameter, which its comment calls the shape but which in scipy's
(shape, loc, scale) order is the scale; we penalise the scale, as its code does), the fit with
the best Kolmogorov–Smirnov p-value kept, and, as in the reference, the largest sample used
instead where every fit is rejected (p < 0.001) or the maxima are all equal (an affine margin,
whose gradient is constant).

References:
  Weng, Zhang, Chen, Yi, Su, Gao, Hsieh, Daniel 2018, "Evaluating the Robustness of Neural
  Networks: An Extreme Value Theory Approach", ICLR (Algorithm 1; N_b = 500, N_s = 1024);
  github.com/huanzhang12/CLEVER (``clever.py``: c_init, rescaling, penalty 0.01, the
  p-value choice and fallback); IBM ART ``art/metrics/metrics.py`` (``clever_u``, ``clever_t``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize, stats

from jaxpoison import sharding
from jaxpoison import threat as threat_lib
from jaxpoison.evaluation.risk import batched, variables_of
from jaxpoison.evaluation.smoothing import SmoothingEvaluator
from jaxpoison.train_state import over_seeds

# The reference's initial shapes, its penalty and the p-value below which a fit is refused.
C_INIT = (0.1, 1.0, 5.0, 10.0, 20.0, 50.0, 100.0)
PENALTY = 0.01
MIN_P_VALUE = 0.001


def sample_ball(key, x, *, threat, num):
    """`num` points uniform in the ball around each example, clipped to the box: [num, B, ...].

    ℓ∞: uniform per pixel; ℓ2: a uniform direction times ``R u^(1/d)`` (d the dimension).
    """
    shape = (num,) + x.shape
    if threat.norm == "linf":
        delta = jax.random.uniform(key, shape, x.dtype, -threat.epsilon, threat.epsilon)
    else:
        dkey, rkey = jax.random.split(key)
        direction = jax.random.normal(dkey, shape, x.dtype)
        axes = tuple(range(2, direction.ndim))
        direction = direction / jnp.sqrt(jnp.sum(jnp.square(direction), axis=axes, keepdims=True))
        dim = np.prod(x.shape[1:])
        radius = jax.random.uniform(rkey, shape[:2] + (1,) * (x.ndim - 1), x.dtype) ** (1 / dim)
        delta = direction * radius * threat.epsilon
    flat = delta.reshape((-1,) + x.shape[1:])
    tiled = jnp.broadcast_to(x[None], shape).reshape(flat.shape)
    return (tiled + threat.project(flat, tiled)).reshape(shape)


def gradient_maxima(logits_fn, x, *, key, threat, num_batches, num_samples):
    """The batch maxima of ``||∇(z_c - z_j)||_q`` in the ball, and the margins at x.

    Args:
      logits_fn: ``x -> logits [B, K]`` (the model in eval mode); each example's logits must
        depend on that example only.
      x: images [B, H, W, C] in [0, 1].
      key: PRNG key (one fold per batch of samples).
      threat: an `LpBall`: the sampling ball (radius R) and, by its norm, the dual norm q.
      num_batches: N_b; num_samples: N_s points per batch and example.

    Returns:
      (maxima [B, N_b, K], margins [B, K], pred [B]): maxima[b, i, j] the largest gradient norm
      of batch i for class j (0 at j = c), margins ``z_c(x) - z_j(x)``, c = pred the prediction.
    """
    logits0 = logits_fn(x)
    num_classes = logits0.shape[1]
    pred = jnp.argmax(logits0, -1)
    margins = jnp.take_along_axis(logits0, pred[:, None], axis=1) - logits0
    # Cotangents e_c - e_j for every class j, the same for each sample of an example.
    cot = jax.nn.one_hot(pred, num_classes)[None] - jnp.eye(num_classes)[:, None]  # [K, B, K]
    cot = jnp.broadcast_to(cot[:, None], (num_classes, num_samples) + cot.shape[1:])
    cot = cot.reshape(num_classes, -1, num_classes)

    def one_batch(_, i):
        points = sample_ball(jax.random.fold_in(key, i), x, threat=threat, num=num_samples)
        flat = points.reshape((-1,) + x.shape[1:])
        _, vjp_fn = jax.vjp(logits_fn, flat)
        grads = jax.vmap(lambda c: vjp_fn(c)[0])(cot).reshape(num_classes, flat.shape[0], -1)
        if threat.norm == "l2":
            norms = jnp.linalg.norm(grads, axis=-1)
        else:
            norms = jnp.sum(jnp.abs(grads), axis=-1)
        norms = norms.reshape(num_classes, num_samples, x.shape[0])
        return None, jnp.max(norms, axis=1).T  # [B, K]

    maxima = jax.lax.scan(one_batch, None, jnp.arange(num_batches))[1]  # [N_b, B, K]
    return jnp.transpose(maxima, (1, 0, 2)), margins, pred


def _negative_log_likelihood(theta, r):
    """Reverse Weibull NLL of samples r (support r < loc), θ = log(shape, loc, scale), plus the
    reference's penalty on the scale (see `fit_reverse_weibull`)."""
    shape, loc, scale = np.exp(theta)
    z = (loc - r) / scale
    # Nelder-Mead probes shapes and locations where the likelihood is 0 or overflows: inf there.
    with np.errstate(all="ignore"):
        nll = -np.sum(np.log(shape / scale) + (shape - 1.0) * np.log(z) - z**shape)
    return nll + PENALTY * scale**2 if np.isfinite(nll) else np.inf


def fit_reverse_weibull(maxima, *, c_init=C_INIT):
    """The reverse Weibull fit of batch maxima: (location, shape, scale, KS p-value).

    The maxima are rescaled to r = (m - max m) / (max m - min m) in [-1, 0]; for each initial
    shape in `c_init` Nelder–Mead minimises the negative log-likelihood of
    ``F(r) = exp(-((loc - r) / scale)^shape)`` (loc > 0, so the fitted right end lies above every
    sample) plus ``0.01 scale²``; the fit with the best Kolmogorov–Smirnov p-value is kept and
    mapped back. Where the maxima are all equal, or every fit has p < 0.001, the location is the
    largest sample (shape, scale and p-value NaN), as the reference does.

    Args:
      maxima: [N_b] positive batch maxima.
      c_init: the initial shapes (the reference's seven by default).

    Returns:
      (loc, shape, scale, p_value) as floats; loc is the Lipschitz estimate.
    """
    maxima = np.asarray(maxima, np.float64)
    top, spread = maxima.max(), maxima.max() - maxima.min()
    fallback = (float(top), np.nan, np.nan, np.nan)
    if not spread > 1e-6 * max(top, 1e-12):
        return fallback
    r = (maxima - top) / spread
    best, best_p = None, -1.0
    for c in c_init:
        start = np.log([c, 0.1, np.mean(0.1 - r)])
        res = optimize.minimize(
            _negative_log_likelihood,
            start,
            args=(r,),
            method="Nelder-Mead",
            options={"xatol": 1e-4, "fatol": 1e-4, "maxiter": 2000},
        )
        shape, loc, scale = np.exp(res.x)
        p = stats.kstest(r, stats.weibull_max(shape, loc=loc, scale=scale).cdf).pvalue
        if np.isfinite(p) and p > best_p:
            best, best_p = (shape, loc, scale), p
    if best is None or best_p < MIN_P_VALUE:
        return fallback
    shape, loc, scale = best
    return float(top + loc * spread), float(shape), float(scale * spread), float(best_p)


def clever_scores(maxima, margins, pred, *, radius, c_init=C_INIT):
    """CLEVER-t scores [B, K] (inf at j = c) from `gradient_maxima`'s outputs, on the host.

    Returns:
      (scores [B, K], lipschitz [B, K]): ``min(margin / L, radius)`` and the estimates L.
    """
    maxima, margins, pred = (np.asarray(a) for a in (maxima, margins, pred))
    batch, _, num_classes = maxima.shape
    lipschitz = np.full((batch, num_classes), np.nan)
    scores = np.full((batch, num_classes), np.inf)
    for b in range(batch):
        for j in range(num_classes):
            if j == pred[b]:
                continue
            loc = fit_reverse_weibull(maxima[b, :, j], c_init=c_init)[0]
            lipschitz[b, j] = loc
            scores[b, j] = min(margins[b, j] / max(loc, 1e-12), radius)
    return scores, lipschitz


def make_clever(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    num_batches=50,
    num_samples=64,
    skip=1,
    batch_size=16,
    c_init=C_INIT,
    seed_strategy="auto",
):
    """The CLEVER evaluator: CLEVER-u and -t scores of the correctly classified points, per seed.

    Args:
      apply_fn: the victim's ``apply_fn`` (eval mode).
      num_classes: K.
      threat: the sampling ball (radius R, the scores' cap, and the norm p: ℓ2 or ℓ∞); or its
        fields `norm`, `epsilon`, `mask` (a config's ``config.threat`` fills them).
      num_batches, num_samples: N_b batches of N_s samples per example (the paper: 500 and
        1024; 50 and 64 here keep a CPU run to seconds per example).
      skip: score every `skip`-th example of the dataset.
      batch_size: examples whose samples go through the model together (N_s · batch_size
        images and K gradients of each per pass).
      c_init: initial shapes of the Weibull fits (`fit_reverse_weibull`).
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      An `Evaluator` returning, with a leading seed axis, over the correctly classified scored
      examples: ``clever_u/mean``, ``clever_u/median``, ``clever_t/top2/mean`` (toward the
      runner-up class), ``clever_t/least/mean`` (toward the least likely class),
      ``lipschitz/mean`` (the estimate for the class of CLEVER-u); ``acc/D`` and ``n`` (the
      scored examples).

    References:
      Weng et al. 2018, ICLR.
    """
    tm = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what="clever")
    for name, value in (
        ("num_batches", num_batches),
        ("num_samples", num_samples),
        ("skip", skip),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"clever: {name}={value!r} must be a whole number >= 1.")
    if num_batches < 3:
        raise ValueError(f"clever: num_batches={num_batches} is too few maxima to fit; use >= 3.")
    if num_classes < 2:
        raise ValueError(f"clever: needs at least 2 classes, the model has {num_classes}.")

    def fn(states, x, y, key):
        del y
        xb, _, _ = batched(x[::skip], jnp.zeros(x[::skip].shape[0], jnp.int32), batch_size)
        seeds = jax.tree.leaves(states)[0].shape[0]

        def one_seed(state, seed_key):
            variables = variables_of(state)

            def logits_fn(images):
                return apply_fn(variables, images, train=False)[0]

            def body(inputs):
                i, xs = sharding.batch(inputs)
                kw = dict(threat=tm, num_batches=num_batches, num_samples=num_samples)
                return gradient_maxima(logits_fn, xs, key=jax.random.fold_in(seed_key, i), **kw)

            maxima, margins, pred = jax.lax.map(body, (jnp.arange(xb.shape[0]), xb))
            flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731
            return {"maxima": flat(maxima), "margins": flat(margins), "pred": flat(pred)}

        return over_seeds(one_seed, seed_strategy)(states, jax.random.split(key, seeds))

    def summary(maxima, margins, pred, y):
        """One seed's metrics from its correctly classified examples."""
        correct = pred == y
        out = {"acc/D": float(np.mean(correct)), "n": float(len(y))}
        if not correct.any():
            keys = ("clever_u/mean", "clever_u/median", "clever_t/top2/mean")
            return out | dict.fromkeys(keys + ("clever_t/least/mean", "lipschitz/mean"), np.nan)
        margins = margins[correct]
        scores, lipschitz = clever_scores(
            maxima[correct], margins, pred[correct], radius=tm.epsilon, c_init=c_init
        )
        rows = np.arange(len(scores))
        u_class = np.argmin(scores, axis=1)
        # The runner-up and the least likely classes: the smallest and largest margins but c's.
        others = np.where(np.isinf(scores), np.nan, margins)
        top2, least = np.nanargmin(others, axis=1), np.nanargmax(others, axis=1)
        return out | {
            "clever_u/mean": float(np.mean(scores[rows, u_class])),
            "clever_u/median": float(np.median(scores[rows, u_class])),
            "clever_t/top2/mean": float(np.mean(scores[rows, top2])),
            "clever_t/least/mean": float(np.mean(scores[rows, least])),
            "lipschitz/mean": float(np.mean(lipschitz[rows, u_class])),
        }

    def finish(out, y):
        y = y[::skip]
        n = len(y)
        per_seed = [
            summary(maxima[:n], margins[:n], pred[:n], y)
            for maxima, margins, pred in zip(
                out["maxima"], out["margins"], out["pred"], strict=True
            )
        ]
        return {k: np.asarray([m[k] for m in per_seed], np.float64) for k in per_seed[0]}

    # SmoothingEvaluator is the generic "jitted part, then a host summary" Evaluator.
    return SmoothingEvaluator(fn, finish, name=f"clever_{tm.norm}")


__all__ = [
    "C_INIT",
    "clever_scores",
    "fit_reverse_weibull",
    "gradient_maxima",
    "make_clever",
    "sample_ball",
]
