"""Export a fitted detector to ONNX / OpenVINO and run the exported graph.

``export_onnx(detector, "model.onnx")`` writes one self-contained graph (memory bank and
thresholds embedded); ``OnnxDetector.load("model.onnx")`` gives a `Detector` with the same
``predict`` that runs it with onnxruntime. Needs ``pip install 'defectscope[export]'``.
"""

from defectscope.export.onnx import ExportableDetector, export_onnx, export_openvino
from defectscope.export.runtime import OnnxDetector, OpenVinoDetector
from defectscope.export.runtimes import load_detector

__all__ = [
    "ExportableDetector",
    "OnnxDetector",
    "OpenVinoDetector",
    "export_onnx",
    "export_openvino",
    "load_detector",
]
