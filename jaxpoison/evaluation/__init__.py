"""Measurement: per-run summaries, verification-time risks, learning-speed diagnostics and the
certified bounds of 1-Lipschitz (ℓ∞-dist) networks (`certified`), the attack success rate of a
backdoor trigger (`backdoor`) and the certified ℓ2 radii of randomized smoothing (`smoothing`).

`EVALUATORS` (from `risk`) maps the names used in ``config.evals`` to evaluator factories.
"""

from jaxpoison.evaluation import autoattack, backdoor, certified, risk, smoothing, speed, summarize
from jaxpoison.evaluation.risk import EVALUATORS

# `certified` builds on `risk`'s dataset evaluator, so it registers itself here, not in `risk`.
EVALUATORS["certified"] = certified.make_certified
risk.register("backdoor", backdoor.make_backdoor)
risk.register("smoothing", smoothing.make_smoothing)
risk.register("autoattack", autoattack.make_autoattack)

__all__ = [
    "EVALUATORS",
    "autoattack",
    "backdoor",
    "certified",
    "risk",
    "smoothing",
    "speed",
    "summarize",
]
