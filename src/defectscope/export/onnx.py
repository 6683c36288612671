"""Export a fitted `Detector` to one self-contained ONNX graph.

The graph takes the *normalised* tensor that `Detector.preprocessor` produces (B, 3, H, W) and
returns ``(maps (B, H, W), scores (B,), normalized_scores (B,))``: backbone, patch features,
memory bank, kNN, upsampling, blur, reduction and the logistic normalisation are all inside, and
the model's description (config, preprocessing, thresholds) rides in ``metadata_props``, so a
runtime needs the file and nothing else. A model with a half-size bank exports both banks and
their sum in one graph. Decoding and resizing stay in Python (`Preprocessor`)
so that there is one preprocessing path for every runtime.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from defectscope.detector.model_file import parse_versioned_meta
from defectscope.detector.parts import pool_input
from defectscope.errors import ConfigError, DefectscopeError, ModelFileError

ONNX_FORMAT_NAME = "defectscope-onnx"
ONNX_FORMAT_VERSION = 1
ONNX_FILENAME = "model.onnx"
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score")
# Initializers at least this large are stored as fp16 by `precision="fp16"`; tiny ones (biases,
# BN scales) are not worth the extra Cast node.
FP16_MIN_ELEMENTS = 1024


class ExportableScale(nn.Module):
    """One bank's share of the graph: its features (of the input as its extractor sees it),
    its kNN and its maps and image scores, by its `AnomalyScorer`'s own rules.

    The kNN is one distance matrix per batch (no chunk loop, no index object) with the same
    ``addmm`` formula as `knn.pairwise_sq_dist`, then min/topk, clamp and sqrt. A bank of
    several passes (`features.half_scale`) is searched per pass, as the scorer does.
    """

    # Registered buffers, declared so type checkers see tensors.
    bank_t: torch.Tensor
    bank_sq: torch.Tensor
    map_rows: torch.Tensor
    map_cols: torch.Tensor

    def __init__(self, parts: Any, scorer: Any) -> None:
        super().__init__()
        self.features = parts.features
        self.pooling = int(parts.pooling)
        self.scorer = scorer
        bank = scorer.bank.detach().float()
        # A bank of several passes keeps each pass's columns (the scorer holds their units);
        # a single pass the whole bank, under the names its graphs always had.
        self.groups = scorer.groups
        if self.groups is None:
            self.register_buffer("bank_t", bank.T.contiguous())
            self.register_buffer("bank_sq", (bank * bank).sum(dim=1)[None, :])
        for number, (start, stop) in enumerate(self.groups or []):
            columns = bank[:, start:stop]
            self.register_buffer(f"bank_t_{number}", columns.T.contiguous())
            self.register_buffer(f"bank_sq_{number}", (columns * columns).sum(dim=1)[None, :])
        self.k = min(int(scorer.config.k), bank.shape[0])
        # The scorer's upsampling + blur operators for this model's grid, built now: built while
        # tracing, their construction (an interpolation) would land in the graph.
        rows, cols = scorer.map_operators(*parts.grid_size())
        self.register_buffer("map_rows", rows.detach().float().cpu().clone())
        self.register_buffer("map_cols", cols.detach().float().cpu().clone())

    def _nearest(
        self, queries: torch.Tensor, bank_t: torch.Tensor, bank_sq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query_sq = (queries * queries).sum(dim=1, keepdim=True)
        sq = torch.addmm(query_sq + bank_sq, queries, bank_t, alpha=-2.0)
        if self.k == 1:
            values, idx = sq.min(dim=1, keepdim=True)
        else:
            values, idx = torch.topk(sq, self.k, dim=1, largest=False, sorted=True)
        return values.clamp(min=0.0).sqrt(), idx

    def _nearest_per_pass(self, queries: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """`AnomalyScorer._search` of a bank of passes: each pass's distances, the first's rows."""
        found = [
            self._nearest(
                queries[:, start:stop],
                getattr(self, f"bank_t_{number}"),
                getattr(self, f"bank_sq_{number}"),
            )
            for number, (start, stop) in enumerate(self.groups or [])
        ]
        return [dist for dist, _ in found], found[0][1]

    def _to_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        return self.map_rows @ (patch_scores @ self.map_cols.T)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.features(pool_input(images, self.pooling)).float()
        _, d, h, w = embeddings.shape
        queries = embeddings.permute(0, 2, 3, 1).reshape(-1, d)
        if self.groups is None:
            dist, idx = self._nearest(queries, self.bank_t, self.bank_sq)
            passes = [dist]
        else:
            passes, idx = self._nearest_per_pass(queries)
        maps, scores, _ = self.scorer.maps_and_scores(passes, idx, queries, (h, w), self._to_maps)
        return maps, scores


class ExportableDetector(nn.Module):
    """The whole model work of a fitted detector as one traceable module: each bank's
    `ExportableScale` (the half-size one too, `defectscope.detector.scales`), their sum in
    units as `ScaleSet.combine` adds them, and the logistic normalisation.

    The maps and the image score come from the detector's own scorers, so the scoring rules
    exist once and exported numbers match the eager ones. A model fitted with an approximate
    ``scoring.knn_backend`` (faiss IVF/HNSW/PQ) exports with this exact search: its exported
    scores are the exact ones, at most as high as the approximate eager scores.
    """

    def __init__(self, detector: Any) -> None:
        super().__init__()
        self.full = ExportableScale(detector.feature_parts(), detector.scorer)
        half = detector.half_scale
        self.half_size = None if half is None else ExportableScale(half.parts, half.scorer)
        self.scales = None if half is None else half.scales
        self.threshold = float(detector.calibration.threshold)
        self.scale = float(detector.calibration.scale)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        maps, scores = self.full(images)
        if self.half_size is not None and self.scales is not None:
            half_maps, half_scores = self.half_size(images)
            maps, scores = self.scales.combine([maps, half_maps], [scores, half_scores])
        z = ((scores - self.threshold) / self.scale).clamp(-60.0, 60.0)
        return maps, scores, torch.sigmoid(z)


def export_metadata(detector: Any, precision: str) -> dict[str, str]:
    """The ONNX ``metadata_props``: the format marker and `describe()` as JSON."""
    meta = detector.describe()
    meta.pop("tensor_sha256", None)
    meta["export"] = {
        "precision": precision,
        "opset": OPSET,
        "input": INPUT_NAME,
        "input_shape": ["batch", 3, *detector.preprocessor.input_size],
        "outputs": list(OUTPUT_NAMES),
        "torch_version": torch.__version__,
    }
    return {
        "format": ONNX_FORMAT_NAME,
        "format_version": str(ONNX_FORMAT_VERSION),
        "meta": json.dumps(meta),
    }


def _require(module: str, extra: str = "export") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DefectscopeError(
            f"{module} is not installed: pip install 'defectscope[{extra}]'"
        ) from None


def _out_path(out: str | Path, suffix: str) -> Path:
    path = Path(out)
    if path.is_dir() or path.suffix == "":
        path = path / (ONNX_FILENAME if suffix == ".onnx" else "model" + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def build_onnx_model(detector: Any, precision: str = "fp32") -> Any:
    """Trace the detector into an in-memory, checked `onnx.ModelProto`."""
    onnx = _require("onnx")
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"ONNX precision must be 'fp32' or 'fp16', not {precision!r}")
    detector._require_fitted()
    if getattr(detector, "features", None) is None:
        raise DefectscopeError("only a PyTorch detector (Detector.load / fit) can be exported")
    module = ExportableDetector(detector).cpu().eval()
    original_device = detector.device
    detector.features.cpu()
    height, width = detector.preprocessor.input_size
    # Batch 2 as the example: a batch of 1 lets the tracer specialise size-1 dims.
    example = torch.zeros(2, 3, height, width)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The tracer warns about Python ints taken from shapes; the spatial size is fixed per
            # model, and the batch dimension is kept symbolic by dynamic_axes.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # a file object works; torch annotates paths only
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={
                    INPUT_NAME: {0: "batch"},
                    **{name: {0: "batch"} for name in OUTPUT_NAMES},
                },
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        detector.features.to(original_device)
    model = onnx.load_from_string(buffer.getvalue())
    if precision == "fp16":
        model = _store_fp16(model)
    for key, value in export_metadata(detector, precision).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "defectscope"
    onnx.checker.check_model(model)
    return model


def _store_fp16(model: Any) -> Any:
    """Store large fp32 initializers as fp16 with a Cast back to fp32 in front of their users.

    Computation stays fp32 on every runtime (CPU kernels for fp16 are sparse), the file halves,
    and the numbers move by fp16 rounding of the weights and the memory bank only.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(init)
        if array.size < FP16_MIN_ELEMENTS:
            continue
        name = init.name
        half_name = name + "__fp16"
        init.CopyFrom(numpy_helper.from_array(array.astype(np.float16), half_name))
        casts.append(helper.make_node("Cast", [half_name], [name], to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model


def export_onnx(detector: Any, out: str | Path, precision: str = "fp32") -> Path:
    """Write the detector as one ONNX file (a folder gets ``model.onnx``); return its path."""
    onnx = _require("onnx")
    model = build_onnx_model(detector, precision)
    path = _out_path(out, ".onnx")
    tmp = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, path)
    return path


def export_openvino(
    detector: Any,
    out: str | Path,
    precision: str = "fp32",
    calibration_images: Sequence[Any] | None = None,
) -> Path:
    """Write an OpenVINO IR (``.xml`` + ``.bin``) converted from the ONNX graph.

    The same metadata as the ONNX file is stored in the IR's runtime info. ``precision="int8"``
    quantizes the backbone only (NNCF post-training quantization on ``calibration_images``,
    good images): the memory-bank distances, upsampling and blur stay fp32, because quantizing
    distances collapses the score ranking (image AUROC 0.5 on bottle when tried).
    """
    ov = _require("openvino")
    if precision not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"OpenVINO precision must be fp32, fp16 or int8, not {precision!r}")
    model = build_onnx_model(detector, "fp32")
    path = _out_path(out, ".xml")
    if path.suffix != ".xml":
        raise ConfigError(f"{path}: an OpenVINO model file name must end in .xml")
    ov_model = ov.convert_model(io.BytesIO(model.SerializeToString()))
    meta = export_metadata(detector, precision)
    if precision == "int8":
        ov_model, check = _quantize_backbone(detector, ov_model, calibration_images)
        info = json.loads(meta["meta"])
        info["export"]["int8_check"] = check
        meta["meta"] = json.dumps(info)
    for key, value in meta.items():
        ov_model.set_rt_info(value, ["defectscope", key])
    ov.save_model(ov_model, str(path), compress_to_fp16=precision == "fp16")
    return path


def _quantize_backbone(
    detector: Any, ov_model: Any, images: Sequence[Any] | None
) -> tuple[Any, dict[str, float]]:
    """INT8 backbone via NNCF; returns the model and how far its scores moved on ``images``."""
    from defectscope.data.io import load_image

    if not images:
        raise ConfigError("INT8 export needs calibration images (good ones): --calibration-images")
    nncf = _require("nncf")
    ov = _require("openvino")
    tensors = [detector.preprocessor([load_image(image)]).numpy() for image in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            ov_model,
            nncf.Dataset(tensors),
            subset_size=len(tensors),
            # Everything outside the backbone (distances, blur, reductions) stays fp32.
            ignored_scope=nncf.IgnoredScope(
                patterns=["^(?!/features/backbone/).*"], validate=False
            ),
        )
    core = ov.Core()
    reference = core.compile_model(ov_model, "CPU")
    candidate = core.compile_model(quantized, "CPU")
    ref_scores = [float(reference(t)[1][0]) for t in tensors]
    new_scores = [float(candidate(t)[1][0]) for t in tensors]
    deviations = [
        abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref_scores, new_scores, strict=True)
    ]
    threshold = detector.calibration.threshold
    flips = sum(
        (a >= threshold) != (b >= threshold) for a, b in zip(ref_scores, new_scores, strict=True)
    )
    return quantized, {
        "n_images": len(tensors),
        "max_rel_score_change": max(deviations),
        "mean_rel_score_change": sum(deviations) / len(deviations),
        "decision_flips": int(flips),
    }


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """Check the format marker of an exported file and return its metadata."""
    path = Path(path)
    onnx = _require("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelFileError(f"{path}: not a readable ONNX file ({exc})") from None
    props = {p.key: p.value for p in model.metadata_props}
    return parse_metadata(path, props)


def parse_metadata(path: Path, props: dict[str, str]) -> dict[str, Any]:
    if props.get("format") != ONNX_FORMAT_NAME:
        raise ModelFileError(
            f"{path}: not a defectscope export (no '{ONNX_FORMAT_NAME}' marker in its metadata); "
            "export one with `defectscope export`"
        )
    return parse_versioned_meta(path, props, ONNX_FORMAT_VERSION, "export")
