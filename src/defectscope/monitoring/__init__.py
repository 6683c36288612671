"""Drift monitoring: drift tests against the reference a model stores at fit time
(`defectscope.detector.reference`), and drift studies.

The drift tests (scipy, scikit-learn) and the study load on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "ReferenceStats": "defectscope.detector.reference",
    "compute_reference": "defectscope.detector.reference",
    "pool_embeddings": "defectscope.detector.reference",
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
