"""Moved: the loop is ``engine.runner``, the detection task ``detection.training`` (this re-export goes once every import is updated)."""

from engine.runner import NonFiniteLossError, build_optimizer, build_scheduler  # noqa: F401

from .training import EvaluationError, preflight, train  # noqa: F401
