"""Measurement: per-run summaries, verification-time risks, learning-speed diagnostics and the
certified bounds of 1-Lipschitz (ℓ∞-dist) networks (`certified`), the attack success rate of a
backdoor trigger (`backdoor`), the certified ℓ2 radii of randomized smoothing (`smoothing`),
minimal-perturbation norms by CW-ℓ2 and DeepFool (`minimal`), CLEVER scores (`clever`) and the
interval-bound (IBP) certified accuracy of models built from affine layers, ReLUs and pooling
(`ibp`).

`EVALUATORS` (from `risk`) maps the names used in ``config.evals`` to evaluator factories.
"""

from jaxpoison.evaluation import (
    autoattack,
    backdoor,
    certified,
    clever,
    ibp,
    minimal,
    risk,
    smoothing,
    speed,
    summarize,
)
from jaxpoison.evaluation.risk import EVALUATORS

# `certified` builds on `risk`'s dataset evaluator, so it registers itself here, not in `risk`.
EVALUATORS["certified"] = certified.make_certified
risk.register("backdoor", backdoor.make_backdoor)
risk.register("smoothing", smoothing.make_smoothing)
risk.register("autoattack", autoattack.make_autoattack)
risk.register("ibp", ibp.make_ibp)
risk.register("cw_l2", minimal.make_cw_l2)
risk.register("deepfool", minimal.make_deepfool)
risk.register("clever", clever.make_clever)

__all__ = [
    "EVALUATORS",
    "autoattack",
    "backdoor",
    "certified",
    "clever",
    "ibp",
    "minimal",
    "risk",
    "smoothing",
    "speed",
    "summarize",
]
