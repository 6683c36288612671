"""defectscope: visual anomaly detection for industrial inspection."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defectscope.version import __version__

__all__ = ["DefectscopeError", "Detector", "DetectorConfig", "Prediction", "__version__"]

if TYPE_CHECKING:
    from defectscope.config import DetectorConfig
    from defectscope.detector.detector import Detector
    from defectscope.detector.prediction import Prediction
    from defectscope.errors import DefectscopeError

_LAZY = {
    "Detector": "defectscope.detector.detector",
    "DetectorConfig": "defectscope.config",
    "Prediction": "defectscope.detector.prediction",
    "DefectscopeError": "defectscope.errors",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `defectscope --help` and light adapters do not pay for importing torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defectscope' has no attribute {name!r}")
