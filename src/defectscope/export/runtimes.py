"""The one list of runtimes and the one loader: a saved PyTorch model, or an exported ONNX /
OpenVINO file, local or remote.

Every face (CLI, REST API, BentoML, Ray) loads through here, so all accept the same model files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from defectscope import storage
from defectscope.detector.model_file import read_header, resolve_model_path
from defectscope.errors import ConfigError

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector
    from defectscope.features.backbones import BackboneCache

RUNTIMES = ("auto", "torch", "onnx", "openvino")


def resolve_runtime(path: str | Path, runtime: str = "auto") -> str:
    """'auto' picks the runtime from the file: .onnx -> onnx, .xml -> openvino, else torch."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "auto":
        return {".onnx": "onnx", ".xml": "openvino"}.get(Path(path).suffix.lower(), "torch")
    return runtime


def localize_model(path: str | Path, runtime: str = "auto") -> Path:
    """A local path for a model: ``path`` itself, or a remote one (s3://, gs://) fetched into the
    cache, only the files ``runtime`` reads (the bank; an .onnx; an OpenVINO .xml with its .bin;
    for an exported-model folder, the folder)."""
    if not storage.is_remote(path):
        return Path(path)
    uri = str(storage.location(path))
    if resolve_runtime(uri, runtime) == "torch":
        return resolve_model_path(uri)
    suffix = Path(uri).suffix.lower()
    if suffix == ".xml":
        storage.localize(uri[: -len(suffix)] + ".bin")  # lands in the same cached folder
    return storage.localize(uri)


def load_detector(
    path: str | Path,
    runtime: str = "auto",
    device: str | None = None,
    backbone_cache: BackboneCache | None = None,
) -> Detector:
    """Load ``path`` (local, or an s3:// / gs:// URI, fetched into the local cache first);
    PyTorch models loaded with one ``backbone_cache`` share their backbones."""
    runtime = resolve_runtime(path, runtime)
    path = localize_model(path, runtime)
    if runtime == "torch":
        # A missing or foreign file is reported before torch is imported (seconds): the header
        # alone tells.
        read_header(resolve_model_path(path))
        from defectscope.detector.detector import Detector

        return Detector.load(path, device=device, backbone_cache=backbone_cache)
    # Imported only here: the torch runtime must not need the export extra.
    from defectscope.export.graph import load_exported

    return load_exported(path, runtime, device)
