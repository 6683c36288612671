"""Scoring engines that run an exported graph (onnxruntime, OpenVINO) instead of PyTorch.

`load_exported` gives a plain `Detector` whose engine is an `ExportedGraph`: decoding, the
`Preprocessor`, mapping back to the original image size, thresholds and the normalised score
run the very code the PyTorch detector runs, so every runtime gives the same `Prediction`s.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.detector.calibration import Calibration
from defectscope.detector.detector import Detector
from defectscope.detector.fit_info import FitInfo
from defectscope.detector.model_file import config_from_metadata
from defectscope.errors import ConfigError, ModelFileError
from defectscope.export.onnx import (
    INPUT_NAME,
    ONNX_FILENAME,
    OUTPUT_NAMES,
    _require,
    parse_metadata,
)
from defectscope.features.preprocess import Preprocessor

GraphFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def resolve_export_path(path: str | Path, suffixes: tuple[str, ...] = (".onnx",)) -> Path:
    """An exported file, or a model folder holding ``model.onnx`` (or ``model.xml``)."""
    path = Path(path)
    if path.is_dir():
        for suffix in suffixes:
            candidate = path / (ONNX_FILENAME if suffix == ".onnx" else "model" + suffix)
            if candidate.is_file():
                return candidate
        names = " or ".join(ONNX_FILENAME if s == ".onnx" else "model" + s for s in suffixes)
        raise ModelFileError(
            f"{path}: no {names} in this folder; run `defectscope export {path} --out {path}`"
        )
    if not path.is_file():
        raise ModelFileError(f"exported model not found: {path}")
    return path


def default_threads() -> int:
    # onnxruntime's default pool may count hyper-threads or ignore the affinity mask.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ExportedGraph:
    """A `Detector`'s scoring engine that runs an exported graph: (B, 3, H, W) normalised
    input -> anomaly maps at input size and image scores. The bank is inside the graph."""

    def __init__(
        self, runtime: str, run: GraphFn, file: Path, meta: dict[str, Any], input_size: Any
    ) -> None:
        self.runtime = runtime
        self.run_graph = run
        self.file = file
        self.meta = meta
        self.input_size = tuple(int(s) for s in input_size)

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (3, *self.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ConfigError(
                f"input tensor of shape {tuple(batch.shape)} does not fit this exported model, "
                f"which takes (batch, {', '.join(map(str, expected))}); "
                "use detector.preprocessor to prepare images"
            )
        array = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        maps, scores, _ = self.run_graph(array)
        return torch.from_numpy(maps), torch.from_numpy(scores)

    def describe(self) -> dict[str, Any]:
        return {**self.meta, "runtime": self.runtime}


def load_exported(
    path: str | Path, runtime: str = "onnx", device: str | None = None, threads: int | None = None
) -> Detector:
    """A `Detector` that runs an exported model with ``runtime`` ('onnx' or 'openvino');
    refuses missing, corrupt and foreign files with a clear error."""
    if runtime not in OPENERS:
        raise ConfigError(f"exported runtimes are {', '.join(OPENERS)}, not {runtime!r}")
    if device not in (None, "cpu", "auto"):
        raise ConfigError(f"the {runtime} runtime runs on the CPU only, not {device!r}")
    suffixes, opener = OPENERS[runtime]
    file = resolve_export_path(path, suffixes)
    run, props = opener(file, threads or default_threads())
    meta = parse_metadata(file, props)
    config = config_from_metadata(file, meta)
    config.device = "cpu"
    detector = Detector(config)
    try:
        preprocessor = Preprocessor.from_dict(meta["preprocessing"])
        detector.calibration = Calibration.from_dict(meta["calibration"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(
            f"{file}: preprocessing or calibration metadata is invalid ({exc})"
        ) from None
    detector.preprocessor = preprocessor
    # The drift reference is not read: an exported graph gives no embeddings to compare.
    detector.info = FitInfo.from_metadata({k: v for k, v in meta.items() if k != "reference"})
    detector.engine = ExportedGraph(runtime, run, file, meta, preprocessor.input_size)
    return detector


def exported_metadata(path: str | Path, runtime: str = "onnx") -> dict[str, Any]:
    """The defectscope metadata of an exported model (what `load_exported` reads)."""
    engine = load_exported(path, runtime).engine
    assert isinstance(engine, ExportedGraph)  # load_exported sets one
    return engine.meta


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def open_onnx(file: Path, threads: int) -> tuple[GraphFn, dict[str, str]]:
    """An onnxruntime session for ``file`` and the file's defectscope metadata."""
    ort = _require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning workers would compete with our image-decoding threads for the few cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(
            str(file), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf types
        raise ModelFileError(f"{file}: not a loadable ONNX model ({_first_line(exc)})") from None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        maps, scores, normalized = session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return maps, scores, normalized

    return run, dict(session.get_modelmeta().custom_metadata_map)


def open_openvino(file: Path, threads: int) -> tuple[GraphFn, dict[str, str]]:
    """An OpenVINO compiled model for ``file`` (.onnx or IR .xml) and its metadata."""
    ov = _require("openvino")
    core = ov.Core()
    try:
        model = core.read_model(str(file))
    except Exception as exc:
        raise ModelFileError(
            f"{file}: not a loadable ONNX or OpenVINO model ({_first_line(exc)})"
        ) from None
    props: dict[str, str] = {}
    for key in ("format", "format_version", "meta"):
        if model.has_rt_info(["defectscope", key]):
            props[key] = model.get_rt_info(["defectscope", key]).astype(str)
    if not props and file.suffix == ".onnx":
        from defectscope.export.onnx import read_onnx_metadata

        # OpenVINO's ONNX frontend does not carry metadata_props over; read them directly.
        props = _raw_props(file, read_onnx_metadata)
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(model, "CPU", config)

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = compiled.create_infer_request().infer({INPUT_NAME: batch})
        outputs = [result[compiled.output(name)] for name in OUTPUT_NAMES]
        return tuple(np.asarray(o, dtype=np.float32) for o in outputs)  # type: ignore[return-value]

    return run, props


def _raw_props(file: Path, reader: Any) -> dict[str, str]:
    import json

    from defectscope.export.onnx import ONNX_FORMAT_NAME, ONNX_FORMAT_VERSION

    meta = reader(file)  # raises ModelFileError for a foreign file
    return {
        "format": ONNX_FORMAT_NAME,
        "format_version": str(ONNX_FORMAT_VERSION),
        "meta": json.dumps(meta),
    }


OPENERS: dict[
    str, tuple[tuple[str, ...], Callable[[Path, int], tuple[GraphFn, dict[str, str]]]]
] = {
    "onnx": ((".onnx",), open_onnx),
    "openvino": ((".xml", ".onnx"), open_openvino),
}
