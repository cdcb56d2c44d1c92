"""Measurement: per-run summaries (peak, final, learning speed) and evaluators."""

from jaxpoison.evaluation import summarize

__all__ = ["summarize"]
