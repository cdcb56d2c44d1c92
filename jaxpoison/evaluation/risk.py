r"""Verification-time risks: adversarial, hypocritical and stability risk of a trained model.

A *hypocritical* example (Tao et al. 2022) is a misclassified input that a false friend nudges,
inside the threat model's ball, until the model classifies it correctly: PGD that *minimizes* the
cross-entropy toward the true label. A model that looks accurate on such verification data may be
substandard. With :math:`B(x)` the ball around :math:`x`, :math:`\mathcal{D}^+` /
:math:`\mathcal{D}^-` the correctly / wrongly classified examples, and
:math:`\mathbb{1}` the indicator:

.. math::
    R_{nat} &= \mathbb{E}_{\mathcal{D}}\, \mathbb{1}[f(x) \ne y] \\
    R_{adv} &= \mathbb{E}_{\mathcal{D}} \max_{x' \in B(x)} \mathbb{1}[f(x') \ne y] \\
    R_{sta} &= \mathbb{E}_{\mathcal{D}} \max_{x' \in B(x)} \mathbb{1}[f(x') \ne f(x)] \\
    R_{hyp} &= \mathbb{E}_{\mathcal{D}^-} \max_{x' \in B(x)} \mathbb{1}[f(x') = y]

(each also restricted to :math:`\mathcal{D}^\pm`; ``R_hyp`` on the whole of :math:`\mathcal{D}` is
``R_nat * R_hyp/D-``). Because x itself lies in its ball, these satisfy exactly

.. math::
    R_{adv} &= R_{nat} + (1 - R_{nat})\, R_{adv}(\mathcal{D}^+)
        && \text{(misclassified points are adversarial already)} \\
    R_{adv}(\mathcal{D}^+) &= R_{sta}(\mathcal{D}^+) && (f(x) = y \text{ on } \mathcal{D}^+) \\
    R_{sta} &= (1 - R_{nat})\, R_{sta}(\mathcal{D}^+) + R_{nat}\, R_{sta}(\mathcal{D}^-) \\
    R_{hyp}(\mathcal{D}^-) &\le R_{sta}(\mathcal{D}^-) && (= \text{ for two classes})

so :math:`R_{adv} = R_{nat} + R_{sta} - R_{nat} R_{sta}(\mathcal{D}^-)`: adversarial risk and
natural risk bound the stability risk on the misclassified points, which bounds the hypocritical
risk (the reason TRADES-like training, which penalises instability, lowers it). The accuracies the
paper tabulates follow: ``acc/A = 1 - R_adv`` and ``acc/F = acc/D + R_nat * R_hyp/D-``, i.e.
``R_hyp/D- = (acc/F - acc/D) / (1 - acc/D)`` and ``R_adv/D+ = (acc/D - acc/A) / acc/D`` (the
reference code's estimators).

The maxima are estimated by attacks, so every computed risk is a lower bound of the true one. To
keep the identities exact on the computed numbers, each maximum is taken over the same finite set
of points per example: x itself, its hypocritical example (PGD descent on CE toward y) and its
*stability* example (PGD ascent on CE toward the prediction f(x); on D+ that is the usual
untargeted adversarial example, on D- it searches for any change of prediction). A false friend
that fails to help thus hands over x unchanged, and an adversary likewise.

Evaluators are built by name (`EVALUATORS`, for ``config.evals``); those that attack take their
ball as ``threat=`` (an `LpBall`) or as its fields ``norm``, ``epsilon``, ``mask``, with no
default radius (`threat.resolve`). They take a `TrainState` with a
leading seed axis (as `Trainer.evaluate` does) and run as one jitted program: batches of the
dataset under `lax.map`, seeds under `train_state.over_seeds`.

References:
  Tao, Feng, Yi, Chen 2022, "With False Friends Like These, Who Can Notice Mistakes?", AAAI
  (Sec. 4 for the risks and their decompositions; github.com/TLMichael/False-Friends).
  Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and Accuracy" (TRADES:
  R_adv = R_nat + boundary error).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxpoison import _registry, data, sharding
from jaxpoison import threat as threat_lib
from jaxpoison.attacks.pgd import model_loss, pgd
from jaxpoison.train_state import over_seeds


def default_step_size(threat, num_steps):
    """2.5 ε / num_steps (Madry et al. 2018): enough to cross the ball and come back."""
    return 2.5 * threat.epsilon / num_steps


def hypocritical_examples(
    apply_fn, variables, x, y, *, key, threat, num_steps=20, step_size=None, random_start=False
):
    """Hypocritical examples: PGD descent on CE(f(x + δ), y) toward the true label.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)``; run in eval mode.
      variables: the model's variables.
      x: images [B, H, W, C] in [0, 1].
      y: true labels [B].
      key: PRNG key (used only with `random_start`).
      threat: an `LpBall`.
      num_steps: PGD steps.
      step_size: PGD step (default `default_step_size`).
      random_start: start from a random point of the ball instead of x (the reference code
        starts at x).

    Returns:
      x + δ with δ in the ball and x + δ in [0, 1].

    References:
      Tao et al. 2022, "With False Friends Like These, Who Can Notice Mistakes?", AAAI.
    """
    step_size = default_step_size(threat, num_steps) if step_size is None else step_size
    loss_fn = model_loss(apply_fn, variables)
    delta = pgd(
        loss_fn,
        x,
        y,
        key=key,
        threat=threat,
        num_steps=num_steps,
        step_size=step_size,
        maximize=False,
        random_start=random_start,
    )
    return x + delta


def targeted_examples(
    apply_fn, variables, x, target, *, key, threat, num_steps=20, step_size=None, random_start=False
):
    """Targeted examples: PGD descent on CE(f(x + δ), target), e.g. one class t for all x.

    The hypocritical example is the targeted example whose target is the true label; comparing the
    two success rates on misclassified inputs tells whether moving to the *right* class is easier
    than moving to an arbitrary one. Same arguments as `hypocritical_examples`, `target` [B].
    """
    return hypocritical_examples(
        apply_fn,
        variables,
        x,
        target,
        key=key,
        threat=threat,
        num_steps=num_steps,
        step_size=step_size,
        random_start=random_start,
    )


def stability_examples(
    apply_fn, variables, x, *, key, threat, num_steps=20, step_size=None, random_start=True
):
    """PGD ascent on CE(f(x + δ), f(x)): moves x away from its own prediction.

    On correctly classified x this is the untargeted adversarial example; on misclassified x it
    searches for any change of prediction (the stability risk). Same arguments as
    `hypocritical_examples`.
    """
    step_size = default_step_size(threat, num_steps) if step_size is None else step_size
    pred = jnp.argmax(apply_fn(variables, x, train=False)[0], -1)
    delta = pgd(
        model_loss(apply_fn, variables),
        x,
        jax.lax.stop_gradient(pred),
        key=key,
        threat=threat,
        num_steps=num_steps,
        step_size=step_size,
        maximize=True,
        random_start=random_start,
    )
    return x + delta


def outcomes(
    apply_fn,
    variables,
    x,
    y,
    *,
    key,
    threat,
    num_classes,
    num_steps=20,
    step_size=None,
    targeted=False,
):
    """Per-example outcomes on one batch, the maxima over {x, x_hyp, x_sta} (see the module doc).

    Args:
      apply_fn, variables: the model (eval mode).
      x: images [B, H, W, C]; y: labels [B].
      key: PRNG key; threat: an `LpBall`; num_classes: K.
      num_steps, step_size: of every PGD run.
      targeted: also run one targeted attack per class t (K more PGD runs).

    Returns:
      dict of float [B] arrays: ``correct`` (f(x) = y), ``adv_error`` (some point of the ball is
      misclassified), ``unstable`` (some point changes the prediction), ``hyp_correct`` (some point
      is classified correctly), ``hyp_success`` (the hypocritical PGD point itself is correct);
      with `targeted`, ``targeted_success`` [B, K] (the PGD point toward t is classified t).
    """
    hkey, skey, tkey = jax.random.split(key, 3)

    def predict(images):
        return jnp.argmax(apply_fn(variables, images, train=False)[0], -1)

    kw = dict(threat=threat, num_steps=num_steps, step_size=step_size)
    pred = predict(x)
    pred_hyp = predict(hypocritical_examples(apply_fn, variables, x, y, key=hkey, **kw))
    pred_sta = predict(stability_examples(apply_fn, variables, x, key=skey, **kw))
    candidates = jnp.stack([pred, pred_hyp, pred_sta])  # [3, B]
    f = lambda b: b.astype(jnp.float32)
    out = {
        "correct": f(pred == y),
        "adv_error": f(jnp.any(candidates != y, axis=0)),
        "unstable": f(jnp.any(candidates != pred, axis=0)),
        "hyp_correct": f(jnp.any(candidates == y, axis=0)),
        "hyp_success": f(pred_hyp == y),
    }
    if targeted:

        def toward(t):
            target = jnp.full_like(y, t)
            x_t = targeted_examples(
                apply_fn, variables, x, target, key=jax.random.fold_in(tkey, t), **kw
            )
            return f(predict(x_t) == t)

        out["targeted_success"] = jax.lax.map(toward, jnp.arange(num_classes)).T  # [B, K]
    return out


def _safe_div(a, b):
    return jnp.where(b > 0, a / jnp.maximum(b, 1), jnp.nan)


def risks(sums):
    """Accuracies and risks from per-dataset sums of `outcomes` (plus ``n``).

    Conditional quantities on an empty D+ or D- are NaN (undefined), not 0.

    Returns:
      dict of scalars: ``acc/D``, ``acc/A``, ``acc/F``; ``R_nat``, ``R_adv``, ``R_sta``,
      ``R_hyp`` (over D); ``R_adv/D+``, ``R_sta/D+``, ``R_sta/D-``, ``R_hyp/D-``; ``n/D+``,
      ``n/D-``; ``asr/hypocritical`` (the hypocritical PGD point is correct, on D-); with targeted
      sums, ``asr/targeted`` [K] and ``asr/targeted_mean`` (on D-).
    """
    n = sums["n"]
    n_plus, n_minus = sums["correct"], n - sums["correct"]
    s = sums
    out = {
        "acc/D": n_plus / n,
        "acc/A": 1.0 - s["adv_error"] / n,
        "acc/F": s["hyp_correct"] / n,
        "R_nat": n_minus / n,
        "R_adv": s["adv_error"] / n,
        "R_sta": s["unstable"] / n,
        "R_hyp": s["hyp_correct_minus"] / n,
        "R_adv/D+": _safe_div(s["adv_error_plus"], n_plus),
        "R_sta/D+": _safe_div(s["unstable_plus"], n_plus),
        "R_sta/D-": _safe_div(s["unstable_minus"], n_minus),
        "R_hyp/D-": _safe_div(s["hyp_correct_minus"], n_minus),
        "asr/hypocritical": _safe_div(s["hyp_success_minus"], n_minus),
        "n/D+": n_plus,
        "n/D-": n_minus,
    }
    if "targeted_success_minus" in s:
        out["asr/targeted"] = _safe_div(s["targeted_success_minus"], n_minus)
        out["asr/targeted_mean"] = jnp.mean(out["asr/targeted"])
    return out


def _sums(o, mask):
    """Sums over a batch of `outcomes`, overall and on D+ / D- (padding masked out)."""
    plus, minus = o["correct"] * mask, (1.0 - o["correct"]) * mask
    out = {"n": jnp.sum(mask), "correct": jnp.sum(plus)}
    for k in ("adv_error", "unstable", "hyp_correct"):
        out[k] = jnp.sum(o[k] * mask)
    for k in ("adv_error", "unstable"):
        out[f"{k}_plus"] = jnp.sum(o[k] * plus)
    for k in ("unstable", "hyp_correct", "hyp_success"):
        out[f"{k}_minus"] = jnp.sum(o[k] * minus)
    if "targeted_success" in o:
        out["targeted_success_minus"] = jnp.sum(o["targeted_success"] * minus[:, None], axis=0)
    return out


def batched(x, y, batch_size):
    """Pads (x, y) to whole batches: ([nb, b, ...], [nb, b], mask [nb, b])."""
    n = y.shape[0]
    batch_size = min(batch_size, n)
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    xb = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
    xb = xb.reshape(num_batches, batch_size, *x.shape[1:])
    yb = jnp.pad(y, (0, pad)).reshape(num_batches, batch_size)
    mask = (jnp.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
    return xb, yb, mask.astype(jnp.float32)


def variables_of(state):
    """Model variables of one seed's `TrainState`."""
    return {"params": state.params, **state.model_state}


class Evaluator:
    """A named, jitted ``(states, x, y, *, key) -> metrics`` over a whole dataset and all seeds.

    `fn` is the pure function (states with a leading seed axis, float32 images in [0, 1],
    labels, key) -> dict of [S, ...] arrays; it is jitted once here, so one dataset shape compiles
    one program. uint8 images (`TrainData`'s clean test set) become float32 inside that program
    (`data.device_float`), whole; with ``converts_images=True`` `fn` takes them as they come and
    converts each batch itself (as `_dataset_evaluator`'s do), so no float copy of the set is
    made. Called
    with a `mesh` (by default the one `x` is placed on, as `TrainData` places it), each batch is
    split along the mesh's ``data`` axis where its devices divide it (`jaxpoison.sharding`).
    """

    def __init__(self, fn: Callable, *, name: str, converts_images: bool = False):
        self.fn = fn
        self.name = name
        if converts_images:
            self._jitted = jax.jit(fn)
        else:
            self._jitted = jax.jit(
                lambda states, x, y, key: fn(states, data.device_float(x), y, key)
            )

    def __call__(self, states, x, y, *, key, mesh=None):
        mesh = mesh or getattr(getattr(x, "sharding", None), "mesh", None)
        if not isinstance(mesh, Mesh):
            return self._jitted(states, x, y, key)
        with jax.set_mesh(mesh):
            return self._jitted(states, x, y, key)


def _dataset_evaluator(per_batch, finish, *, batch_size, seed_strategy, name):
    """An `Evaluator` summing ``per_batch(variables, x, y, mask, key)`` over batches (`lax.map`)
    and seeds (`over_seeds`), then mapping the sums through ``finish``."""

    def one_seed(state, xb, yb, mb, key):
        variables = variables_of(state)

        def body(inputs):
            i, xs, ys, ms = sharding.batch(inputs)
            xs = data.device_float(xs)  # per batch: uint8 sets are never converted whole
            return per_batch(variables, xs, ys, ms, jax.random.fold_in(key, i))

        parts = jax.lax.map(body, (jnp.arange(xb.shape[0]), xb, yb, mb))
        return finish(jax.tree.map(lambda a: jnp.sum(a, axis=0), parts))

    def fn(states, x, y, key):
        xb, yb, mb = batched(x, y, batch_size)
        seeds = jax.tree.leaves(states)[0].shape[0]
        keys = jax.random.split(key, seeds)
        return over_seeds(lambda s, k: one_seed(s, xb, yb, mb, k), seed_strategy)(states, keys)

    return Evaluator(fn, name=name, converts_images=True)


def make_risk(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    num_steps=20,
    step_size=None,
    targeted=False,
    batch_size=500,
    seed_strategy="auto",
):
    """The risk evaluator: accuracy on D / A / F and the risks of the module doc, per seed.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)`` of the victim.
      num_classes: K.
      threat: the ball of every attack, an `LpBall` (the one the poisons take); or pass its
        fields `norm`, `epsilon`, `mask` instead (a config does: `specs.evaluator` fills them
        from ``config.threat``). One of `threat` and `epsilon` is required: no default radius
        (the paper's are ℓ∞ 8/255 and ℓ2 0.5).
      norm: ``"linf"`` (when None) or ``"l2"``, without `threat`.
      epsilon: the radius, without `threat`.
      mask: optional pixel mask of the ball, without `threat`.
      num_steps, step_size: of each PGD run (default step 2.5 ε / num_steps).
      targeted: also the success rate of targeted attacks toward every class on D- (K more
        PGD runs per example), to compare with the hypocritical success rate.
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`.

    Returns:
      An `Evaluator` returning the dict of `risks`, each value with a leading seed axis.

    References:
      Tao et al. 2022, "With False Friends Like These, Who Can Notice Mistakes?", AAAI.
    """
    what = "targeted" if targeted else "risk"
    tm = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what=what)

    def per_batch(variables, x, y, mask, key):
        o = outcomes(
            apply_fn,
            variables,
            x,
            y,
            key=key,
            threat=tm,
            num_classes=num_classes,
            num_steps=num_steps,
            step_size=step_size,
            targeted=targeted,
        )
        return _sums(o, mask)

    name = f"risk_{tm.norm}" + ("_targeted" if targeted else "")
    return _dataset_evaluator(
        per_batch, risks, batch_size=batch_size, seed_strategy=seed_strategy, name=name
    )


def make_targeted(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    num_steps=20,
    step_size=None,
    batch_size=500,
    seed_strategy="auto",
):
    """`make_risk` with ``targeted=True`` (same arguments): hypocritical vs targeted success
    rates on D-."""
    return make_risk(
        apply_fn=apply_fn,
        num_classes=num_classes,
        threat=threat,
        norm=norm,
        epsilon=epsilon,
        mask=mask,
        num_steps=num_steps,
        step_size=step_size,
        targeted=True,
        batch_size=batch_size,
        seed_strategy=seed_strategy,
    )


def make_accuracy(*, apply_fn, num_classes, batch_size=500, seed_strategy="auto"):
    """Clean accuracy (``acc/D``) and mean cross-entropy (``loss``) per seed."""
    del num_classes

    def per_batch(variables, x, y, mask, key):
        del key
        logits = apply_fn(variables, x, train=False)[0]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return {"n": jnp.sum(mask), "correct": jnp.sum(correct * mask), "ce": jnp.sum(ce * mask)}

    def finish(s):
        return {"acc/D": s["correct"] / s["n"], "loss": s["ce"] / s["n"]}

    return _dataset_evaluator(
        per_batch, finish, batch_size=batch_size, seed_strategy=seed_strategy, name="accuracy"
    )


def make_confusion(*, apply_fn, num_classes, batch_size=500, seed_strategy="auto"):
    """The confusion matrix per seed: ``confusion`` [S, K, K], entry (i, j) the number of
    examples of true class i predicted as j (rows sum to the class counts)."""

    def per_batch(variables, x, y, mask, key):
        del key
        pred = jnp.argmax(apply_fn(variables, x, train=False)[0], -1)
        true = jax.nn.one_hot(y, num_classes) * mask[:, None]
        return {"confusion": true.T @ jax.nn.one_hot(pred, num_classes)}

    return _dataset_evaluator(
        per_batch, lambda s: s, batch_size=batch_size, seed_strategy=seed_strategy, name="confusion"
    )


# ``config.evals = {label: dict(name=<key>, **factory kwargs)}``; every factory also takes
# ``apply_fn`` and ``num_classes`` from the trainer.
EVALUATORS = {
    "accuracy": make_accuracy,
    "confusion": make_confusion,
    "risk": make_risk,
    "targeted": make_targeted,
}


def register(name, factory, *, overwrite=False):
    """Adds an evaluator to `EVALUATORS`, so `make` and ``config.evals`` know it.

    Args:
      name: the name configs use (``config.evals.<label>.name``).
      factory: ``factory(*, apply_fn, num_classes, **hyperparameters) -> Evaluator`` (the trainer
        passes ``apply_fn`` and ``num_classes``); `make_accuracy` is a small example.
      overwrite: replace an evaluator already registered under `name`.
    """
    _registry.add(EVALUATORS, name, factory, kind="evaluator", overwrite=overwrite)


def make(name, /, **kwargs):
    """Builds the evaluator `name` of `EVALUATORS`.

    Raises:
      ValueError: `name` is not registered, or `kwargs` hold a keyword its factory does not take
        (the message lists those it does) or lack one it needs.
    """
    if name not in EVALUATORS:
        raise ValueError(f"Unknown evaluator {name!r}; use one of {sorted(EVALUATORS)}.")
    _registry.check_arguments("evaluator", name, EVALUATORS[name], kwargs)
    return EVALUATORS[name](**kwargs)


__all__ = [
    "EVALUATORS",
    "Evaluator",
    "batched",
    "hypocritical_examples",
    "make",
    "make_accuracy",
    "make_confusion",
    "make_risk",
    "make_targeted",
    "outcomes",
    "register",
    "risks",
    "stability_examples",
    "targeted_examples",
]
