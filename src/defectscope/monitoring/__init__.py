"""Drift monitoring: reference statistics stored at fit time, drift tests and drift studies.

``Detector.fit`` imports :mod:`.reference`, so this package must stay cheap to import: the
drift tests (scipy, scikit-learn) and the study load on first use.
"""

from __future__ import annotations

from typing import Any

from defectscope.monitoring.reference import ReferenceStats, compute_reference, pool_embeddings

_LAZY = {
    "DriftDetector": "defectscope.monitoring.drift",
    "DriftReport": "defectscope.monitoring.drift",
    "DriftThresholds": "defectscope.monitoring.drift",
    "DriftError": "defectscope.monitoring.drift",
    "MissingReferenceError": "defectscope.monitoring.drift",
    "run_drift_study": "defectscope.monitoring.study",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ReferenceStats", "compute_reference", "pool_embeddings", *_LAZY]
