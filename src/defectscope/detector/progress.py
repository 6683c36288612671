"""The progress callback every long-running core step accepts."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
"""progress(stage, done, total). Stages: 'auto', 'features', 'coreset', 'calibration',
'predict'; ``done`` counts up to ``total`` within a stage."""
