"""Measurement: per-run summaries, verification-time risks and learning-speed diagnostics.

`EVALUATORS` (from `risk`) maps the names used in ``config.evals`` to evaluator factories.
"""

from jaxpoison.evaluation import risk, speed, summarize
from jaxpoison.evaluation.risk import EVALUATORS

__all__ = ["EVALUATORS", "risk", "speed", "summarize"]
