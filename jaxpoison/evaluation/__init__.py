"""Measurement: per-run summaries, verification-time risks, learning-speed diagnostics and the
certified bounds of 1-Lipschitz (ℓ∞-dist) networks (`certified`).

`EVALUATORS` (from `risk`) maps the names used in ``config.evals`` to evaluator factories.
"""

from jaxpoison.evaluation import certified, risk, speed, summarize
from jaxpoison.evaluation.risk import EVALUATORS

# `certified` builds on `risk`'s dataset evaluator, so it registers itself here, not in `risk`.
EVALUATORS["certified"] = certified.make_certified

__all__ = ["EVALUATORS", "certified", "risk", "speed", "summarize"]
