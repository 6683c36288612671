"""Detectors that run an exported graph (onnxruntime, OpenVINO) instead of PyTorch.

They subclass `Detector` and override only the model work (`score_batch`): decoding, the
`Preprocessor`, mapping back to the original image size, thresholds and the normalised score
all run the very code the PyTorch detector runs, so every runtime gives the same `Prediction`s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.config import DetectorConfig
from defectscope.detector.calibration import Calibration
from defectscope.detector.detector import Detector, config_from_metadata
from defectscope.errors import ConfigError, DefectscopeError, ModelFileError
from defectscope.export.onnx import (
    INPUT_NAME,
    ONNX_FILENAME,
    OUTPUT_NAMES,
    _require,
    parse_metadata,
)
from defectscope.features.preprocess import Preprocessor


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


class OnnxDetector(Detector):
    """A fitted detector read from an exported ONNX file, run by onnxruntime on the CPU."""

    runtime = "onnx"

    def __init__(self, config: DetectorConfig, meta: dict[str, Any], path: Path) -> None:
        config.device = "cpu"
        super().__init__(config)
        self.path = path
        self.meta = meta
        try:
            self.preprocessor = Preprocessor.from_dict(meta["preprocessing"])
            self.calibration = Calibration.from_dict(meta["calibration"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(
                f"{path}: preprocessing or calibration metadata is invalid ({exc})"
            ) from None
        self.info = {
            k: meta[k]
            for k in ("created_at", "defectscope_version", "training", "bank_size", "timings")
            if k in meta
        }
        self._session: Any = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(
        cls, path: str | Path, device: str | None = None, threads: int | None = None
    ) -> OnnxDetector:
        """Open an exported model; refuses missing, corrupt and foreign files with a clear error."""
        if device not in (None, "cpu", "auto"):
            raise ConfigError(f"the {cls.runtime} runtime runs on the CPU only, not {device!r}")
        file = resolve_export_path(path, cls._suffixes())
        session, props = cls._open(file, threads or default_threads())
        meta = parse_metadata(file, props)
        config = config_from_metadata(file, meta)
        detector = cls(config, meta, file)
        detector._session = session
        return detector

    @classmethod
    def _suffixes(cls) -> tuple[str, ...]:
        return (".onnx",)

    @classmethod
    def _open(cls, file: Path, threads: int) -> tuple[Any, dict[str, str]]:
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
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(f"{file}: not a loadable ONNX model ({first})") from None
        return session, dict(session.get_modelmeta().custom_metadata_map)

    # -------------------------------------------------------------------- state
    @property
    def is_fitted(self) -> bool:
        return self._session is not None and self.calibration is not None

    @property
    def memory_bank(self) -> torch.Tensor:
        raise DefectscopeError("the memory bank is embedded in the exported graph")

    def describe(self) -> dict[str, Any]:
        self._require_fitted()
        assert self.calibration is not None  # _require_fitted checked it
        return {**self.meta, "calibration": self.calibration.to_dict(), "runtime": self.runtime}

    def fit(self, *args: Any, **kwargs: Any) -> Detector:
        raise DefectscopeError("an exported model cannot be fitted; fit a Detector and export it")

    def save(self, path: str | Path) -> Path:
        raise DefectscopeError("an exported model cannot be saved as a PyTorch model; re-export")

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        raise DefectscopeError("an exported model gives anomaly maps and scores, not embeddings")

    # ------------------------------------------------------------------ predict
    def _check_batch(self, batch: torch.Tensor) -> np.ndarray:
        assert self.preprocessor is not None  # set by load(), before any batch
        expected = (3, *self.preprocessor.input_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise ConfigError(
                f"input tensor of shape {tuple(batch.shape)} does not fit this exported model, "
                f"which takes (batch, {', '.join(map(str, expected))}); "
                "use detector.preprocessor to prepare images"
            )
        return np.ascontiguousarray(batch.detach().cpu().float().numpy())

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input (B, 3, H, W) -> (anomaly maps at input size, image scores)."""
        self._require_fitted()
        maps, scores, _ = self.run_graph(self._check_batch(batch))
        return torch.from_numpy(maps), torch.from_numpy(scores)

    def run_graph(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Run the exported graph: (maps, scores, normalised scores) as float32 arrays."""
        maps, scores, normalized = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return maps, scores, normalized


class OpenVinoDetector(OnnxDetector):
    """The same exported model run by OpenVINO (from the .onnx file or an exported IR .xml)."""

    runtime = "openvino"

    @classmethod
    def _suffixes(cls) -> tuple[str, ...]:
        return (".xml", ".onnx")

    @classmethod
    def _open(cls, file: Path, threads: int) -> tuple[Any, dict[str, str]]:
        ov = _require("openvino")
        core = ov.Core()
        try:
            model = core.read_model(str(file))
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelFileError(
                f"{file}: not a loadable ONNX or OpenVINO model ({first})"
            ) from None
        props: dict[str, str] = {}
        for key in ("format", "format_version", "meta"):
            if model.has_rt_info(["defectscope", key]):
                props[key] = model.get_rt_info(["defectscope", key]).astype(str)
        if not props and file.suffix == ".onnx":
            from defectscope.export.onnx import read_onnx_metadata

            # OpenVINO's ONNX frontend does not carry metadata_props over; read them directly.
            return cls._compile(core, model, threads), _raw_props(file, read_onnx_metadata)
        return cls._compile(core, model, threads), props

    @staticmethod
    def _compile(core: Any, model: Any, threads: int) -> Any:
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        return core.compile_model(model, "CPU", config)

    def run_graph(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        request = self._session.create_infer_request()
        result = request.infer({INPUT_NAME: batch})
        outputs = [result[self._session.output(name)] for name in OUTPUT_NAMES]
        return tuple(np.asarray(o, dtype=np.float32) for o in outputs)  # type: ignore[return-value]


def _raw_props(file: Path, reader: Any) -> dict[str, str]:
    import json

    from defectscope.export.onnx import ONNX_FORMAT_NAME, ONNX_FORMAT_VERSION

    meta = reader(file)  # raises ModelFileError for a foreign file
    return {
        "format": ONNX_FORMAT_NAME,
        "format_version": str(ONNX_FORMAT_VERSION),
        "meta": json.dumps(meta),
    }
