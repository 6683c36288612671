"""Export a fitted detector to ONNX / OpenVINO and run the exported graph.

``export_onnx(detector, "model.onnx")`` writes one self-contained graph (memory bank and
thresholds embedded); ``load_detector("model.onnx")`` gives a `Detector` whose scoring engine
runs it with onnxruntime (or OpenVINO), with the same ``predict``. Needs
``pip install 'defectscope[export]'``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from defectscope.export.graph import ExportedGraph, load_exported
    from defectscope.export.onnx import ExportableDetector, export_onnx, export_openvino
    from defectscope.export.runtimes import load_detector

# Resolved on first use: `defectscope.export.runtimes` (model paths, runtimes) is imported by
# every face and must not pull torch in before a command has checked its arguments.
_HOMES = {
    "ExportableDetector": "defectscope.export.onnx",
    "ExportedGraph": "defectscope.export.graph",
    "export_onnx": "defectscope.export.onnx",
    "export_openvino": "defectscope.export.onnx",
    "load_detector": "defectscope.export.runtimes",
    "load_exported": "defectscope.export.graph",
}

__all__ = [
    "ExportableDetector",
    "ExportedGraph",
    "export_onnx",
    "export_openvino",
    "load_detector",
    "load_exported",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
