"""The progress callback every long-running core step accepts."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
"""progress(stage, done, total). Stages: 'auto', 'features', 'coreset', 'calibration',
'predict', and 'half-size ' before a stage of the half-size bank's fit; ``done`` counts up to
``total`` within a stage."""


def with_stage_prefix(progress: ProgressFn | None, prefix: str) -> ProgressFn | None:
    """``progress`` with ``prefix`` before each stage's name (the half-size bank's fit)."""
    if progress is None:
        return None
    report = progress
    return lambda stage, done, total: report(prefix + stage, done, total)
