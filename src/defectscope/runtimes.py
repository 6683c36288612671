"""Load a detector for any runtime: a saved PyTorch model, or an exported ONNX / OpenVINO file.

Adapters (CLI, REST API) load through here, so every face accepts the same model files.
"""

from __future__ import annotations

from pathlib import Path

from defectscope.detector.detector import Detector
from defectscope.errors import ConfigError

RUNTIMES = ("auto", "torch", "onnx", "openvino")


def resolve_runtime(path: str | Path, runtime: str = "auto") -> str:
    """'auto' picks the runtime from the file: .onnx -> onnx, .xml -> openvino, else torch."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "auto":
        return {".onnx": "onnx", ".xml": "openvino"}.get(Path(path).suffix.lower(), "torch")
    return runtime


def load_detector(path: str | Path, runtime: str = "auto", device: str | None = None) -> Detector:
    runtime = resolve_runtime(path, runtime)
    if runtime == "torch":
        return Detector.load(path, device=device)
    # Imported only here: the torch runtime must not need the export extra.
    from defectscope.export.runtime import load_detector as load_exported

    return load_exported(path, runtime, device)
