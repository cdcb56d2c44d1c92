"""AutoAttack's standard ensemble as an evaluator: APGD-CE, then APGD-T, FAB-T and Square.

Each attack runs only on the points that are still robust (classified correctly and not fooled
by an earlier attack), as the reference's ``run_standard_evaluation`` does, and a point counts as
fooled only when the model misclassifies the returned point (checked again here). The robust
accuracy is the fraction of points no attack fooled; every attack's flips are reported.

The reference gathers the robust points into smaller batches; under `jit` shapes are static, so
here every attack sees the whole batch with a mask of the points still to attack (``active``) and
only their flips count. The work saved comes from skipping, not shrinking: a restart or a target
class of APGD is skipped (`lax.cond`) once no point of the batch is left, and Square's query loop
stops when every active point is fooled. Compacting the robust points into chunks would save the
APGD iterations of fooled points too, at the price of one more compiled shape per chunk size.

FAB-T is a minimal-perturbation attack: it fools a point when the closest misclassified point it
finds lies within the ball (norm ``<= ε``), as in the reference.

``version='rand'`` is the reference's version for randomized defenses: APGD-CE, then APGD-DLR,
1 restart each, every gradient averaged over 20 draws of the model's randomness (EOT). Our
evaluators run models in eval mode, which is deterministic, so the randomness is named here:
``noise_sigma``, Gaussian noise of that standard deviation added to the model's input at every
call (the base classifier of randomized smoothing, or a random-noise defense), with a fresh key
per call, folded per attack, iteration and draw. As in the reference, clean accuracy and every
check of a returned point use one draw of the noise.

References:
  Croce, Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML; github.com/fra31/auto-attack (``autoattack/autoattack.py``).
  Croce, Hein 2020, "Minimally distorted adversarial examples with a fast adaptive boundary
  attack", ICML (FAB).
  Andriushchenko et al. 2020, "Square Attack", ECCV.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpoison import threat as threat_lib
from jaxpoison.attacks.apgd import apgd, apgd_targeted
from jaxpoison.attacks.fab import fab_targeted
from jaxpoison.attacks.square import square
from jaxpoison.evaluation import risk

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = {"standard": STANDARD, "rand": RAND}
_EOT_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t")


def _check(attacks, num_classes, num_targets, version="standard", noise_sigma=0.0, eot_iter=20):
    if version not in VERSIONS:
        raise ValueError(
            f"autoattack: version={version!r} is unknown; use one of {tuple(VERSIONS)}."
        )
    if version == "rand" and not noise_sigma > 0:
        raise ValueError(
            f"autoattack: version='rand' attacks a randomized model, but noise_sigma="
            f"{noise_sigma}; pass noise_sigma > 0 (the std of the Gaussian input noise)."
        )
    if version == "standard" and noise_sigma != 0:
        raise ValueError(
            f"autoattack: noise_sigma={noise_sigma} makes the model random; use version='rand' "
            "(EOT-APGD): FAB-T and Square assume a deterministic model."
        )
    if int(eot_iter) < 1:
        raise ValueError(f"autoattack: eot_iter={eot_iter} must be >= 1 (the reference's: 20).")
    attacks = tuple(VERSIONS[version] if attacks is None else attacks)
    if version == "rand" and any(a not in _EOT_ATTACKS for a in attacks):
        raise ValueError(
            f"autoattack: version='rand' runs only the EOT attacks {_EOT_ATTACKS}, not "
            f"{tuple(a for a in attacks if a not in _EOT_ATTACKS)}; drop them from attacks."
        )
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks or len(set(attacks)) != len(attacks):
        raise ValueError(
            f"autoattack: attacks={attacks} must be distinct names among {ATTACKS} (the "
            f"standard ensemble is {STANDARD})."
        )
    if "apgd-t" in attacks and num_classes < 4:
        raise ValueError(
            f"autoattack: 'apgd-t' (targeted DLR) needs at least 4 classes, the model has "
            f"{num_classes}; pass attacks=('apgd-ce', 'square')."
        )
    if "apgd-dlr" in attacks and num_classes < 3:
        raise ValueError(
            f"autoattack: 'apgd-dlr' needs at least 3 classes, the model has {num_classes}; "
            "drop it from attacks."
        )
    if num_targets is not None and not 1 <= num_targets <= num_classes - 1:
        raise ValueError(
            f"autoattack: num_targets={num_targets} must lie in [1, K - 1 = {num_classes - 1}]."
        )
    return attacks


def autoattack(
    logits_fn,
    x,
    y,
    *,
    key,
    threat,
    num_classes,
    attacks=None,
    num_steps=100,
    restarts=1,
    num_targets=None,
    num_queries=5000,
    p_init=0.8,
    version="standard",
    noise_sigma=0.0,
    eot_iter=20,
):
    """The ensemble on one batch: each attack in turn on the points still robust.

    Args:
      logits_fn: ``x -> logits [B, K]`` (the model in eval mode).
      x: images [B, H, W, C] in [0, 1]; y: labels [B].
      key: PRNG key (one fold per attack).
      threat: an `LpBall` (ℓ∞ or ℓ2).
      num_classes: K.
      attacks: the attacks in order, names among `ATTACKS` (default: the version's, `STANDARD`
        or `RAND`).
      num_steps: APGD and FAB-T iterations (100).
      restarts: APGD-CE / APGD-DLR restarts, and APGD-T restarts per target class (1; FAB-T
        runs once per target class, as in the standard version).
      num_targets: APGD-T and FAB-T target classes (default ``min(9, K - 1)``).
      num_queries, p_init: Square's budget after its start (5000) and first window fraction.
      version: ``"standard"`` (a deterministic model) or ``"rand"`` (EOT-APGD on the model
        with Gaussian input noise; then only APGD attacks).
      noise_sigma: the std of the Gaussian noise added to the input at every call (``rand``).
      eot_iter: draws of the noise averaged per APGD gradient (``rand``; the reference's 20).

    Returns:
      dict: ``correct`` bool [B] (clean), ``robust`` bool [B] (no attack fooled the point),
      ``flipped`` {attack: bool [B]} (the points each attack fooled first), ``delta`` [B, ...]
      (the fooling perturbation where one was found, else 0).

    References:
      Croce, Hein 2020, ICML.
    """
    attacks = _check(attacks, num_classes, num_targets, version, noise_sigma, eot_iter)
    num_targets = min(9, num_classes - 1) if num_targets is None else num_targets
    rand = version == "rand"

    def noisy_logits(images, k):
        return logits_fn(images + noise_sigma * jax.random.normal(k, images.shape, images.dtype))

    def wrong(delta, k):
        logits = noisy_logits(x + delta, k) if rand else logits_fn(x + delta)
        return jnp.argmax(logits, -1) != y

    eot = dict(eot_iter=eot_iter) if rand else {}
    model = noisy_logits if rand else logits_fn
    correct = ~wrong(jnp.zeros_like(x), jax.random.fold_in(key, len(attacks)))
    robust, delta, flipped = correct, jnp.zeros_like(x), {}
    for i, name in enumerate(attacks):
        k = jax.random.fold_in(key, i)
        k, check_key = jax.random.split(k) if rand else (k, None)
        common = dict(key=k, threat=threat, active=robust)
        if name in ("apgd-ce", "apgd-dlr"):
            loss = "ce" if name == "apgd-ce" else "dlr"
            kw = dict(num_steps=num_steps, loss=loss, restarts=restarts, num_classes=num_classes)
            found = apgd(model, x, y, **common, **kw, **eot).delta
        elif name == "apgd-t":
            kw = dict(num_steps=num_steps, num_targets=num_targets, restarts=restarts)
            found = apgd_targeted(model, x, y, **common, num_classes=num_classes, **kw, **eot).delta
        elif name == "fab-t":
            kw = dict(num_steps=num_steps, num_targets=num_targets, num_classes=num_classes)
            found = fab_targeted(logits_fn, x, y, **common, **kw).delta
        else:
            kw = dict(num_queries=num_queries, p_init=p_init)
            found = square(logits_fn, x, y, **common, **kw).delta
        flip = robust & wrong(found, check_key)
        if name == "fab-t":  # a minimal-norm attack: its closest point may lie beyond the ball
            flip = flip & (threat.norm_of(found) <= threat.epsilon)
        flipped[name] = flip
        delta = jnp.where(flip[:, None, None, None], found, delta)
        robust = robust & ~flip
    return {"correct": correct, "robust": robust, "flipped": flipped, "delta": delta}


def make_autoattack(
    *,
    apply_fn,
    num_classes,
    threat=None,
    norm=None,
    epsilon=None,
    mask=None,
    attacks=None,
    num_steps=100,
    restarts=1,
    num_targets=None,
    num_queries=5000,
    p_init=0.8,
    version="standard",
    noise_sigma=0.0,
    eot_iter=20,
    batch_size=500,
    seed_strategy="map",
):
    """The AutoAttack evaluator: clean and robust accuracy, and each attack's flips, per seed.

    Args:
      apply_fn: ``apply_fn(variables, x, *, train) -> (logits, state)`` of the victim.
      num_classes: K.
      threat: the ball, an `LpBall`; or its fields `norm`, `epsilon`, `mask` (a config's
        ``config.threat`` fills them). No default radius (AutoAttack's usual ones: ℓ∞ 8/255,
        ℓ2 0.5 on CIFAR-10).
      attacks, num_steps, restarts, num_targets, num_queries, p_init: see `autoattack`.
      version, noise_sigma, eot_iter: see `autoattack` (``version='rand'`` with
        ``noise_sigma > 0`` for a model with Gaussian input noise).
      batch_size: examples per batch of the `lax.map` over the dataset.
      seed_strategy: see `train_state.over_seeds`. ``"map"`` by default, on every backend:
        under ``vmap`` the skips' conditions are batched over seeds, and `lax.cond` then runs
        both branches, so no restart, target class or Square query would be skipped.

    Returns:
      An `Evaluator` returning, each with a leading seed axis: ``acc/D`` (clean accuracy),
      ``acc/AA`` (robust accuracy after the whole ensemble), ``acc/<attack>`` (robust accuracy
      after each attack, in order) and ``flips/<attack>`` (the fraction of the dataset each
      attack fooled first).

    References:
      Croce, Hein 2020, ICML.
    """
    tm = threat_lib.resolve(threat, norm=norm, epsilon=epsilon, mask=mask, what="autoattack")
    attacks = _check(attacks, num_classes, num_targets, version, noise_sigma, eot_iter)

    def per_batch(variables, x, y, valid, key):
        def logits_fn(images):
            return apply_fn(variables, images, train=False)[0]

        out = autoattack(
            logits_fn,
            x,
            y,
            key=key,
            threat=tm,
            num_classes=num_classes,
            attacks=attacks,
            num_steps=num_steps,
            restarts=restarts,
            num_targets=num_targets,
            num_queries=num_queries,
            p_init=p_init,
            version=version,
            noise_sigma=noise_sigma,
            eot_iter=eot_iter,
        )
        count = lambda b: jnp.sum(b.astype(jnp.float32) * valid)
        sums = {"n": jnp.sum(valid), "correct": count(out["correct"])}
        sums.update({f"flips/{a}": count(f) for a, f in out["flipped"].items()})
        return sums

    def finish(s):
        n = s["n"]
        out = {"acc/D": s["correct"] / n}
        robust = s["correct"]
        for a in attacks:
            robust = robust - s[f"flips/{a}"]
            out[f"acc/{a}"] = robust / n
            out[f"flips/{a}"] = s[f"flips/{a}"] / n
        out["acc/AA"] = robust / n
        return out

    return risk._dataset_evaluator(
        per_batch, finish, batch_size=batch_size, seed_strategy=seed_strategy, name="autoattack"
    )


__all__ = ["ATTACKS", "RAND", "STANDARD", "VERSIONS", "autoattack", "make_autoattack"]
