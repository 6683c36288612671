"""Export a fitted detector to ONNX / OpenVINO and run the exported graph.

``export_onnx(detector, "model.onnx")`` writes one self-contained graph (memory bank and
thresholds embedded); ``load_detector("model.onnx")`` gives a `Detector` whose scoring engine
runs it with onnxruntime (or OpenVINO), with the same ``predict``. Needs
``pip install 'defectscope[export]'``.
"""

from defectscope.export.graph import ExportedGraph, load_exported
from defectscope.export.onnx import ExportableDetector, export_onnx, export_openvino
from defectscope.export.runtimes import load_detector

__all__ = [
    "ExportableDetector",
    "ExportedGraph",
    "export_onnx",
    "export_openvino",
    "load_detector",
    "load_exported",
]
