"""A fitted model as its file holds it: the description written as metadata, and the scoring
engine, calibration and fit record read back (`Detector.describe` / `Detector.load`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defectscope.config import DetectorConfig
from defectscope.detector.calibration import Calibration
from defectscope.detector.edge_profile import EdgeProfile
from defectscope.detector.engine import TorchEngine
from defectscope.detector.fit_info import FitInfo
from defectscope.detector.model_file import checked_bank, load_scorer
from defectscope.detector.parts import FeatureParts
from defectscope.detector.scales import load_half_scale
from defectscope.detector.scoring import AnomalyScorer
from defectscope.errors import ModelFileError


def model_description(
    config: DetectorConfig,
    parts: FeatureParts,
    scorer: AnomalyScorer,
    calibration: Calibration,
    info: FitInfo,
) -> dict[str, Any]:
    """Everything a person or an adapter needs to know about a fitted model (JSON-able)."""
    backbone = parts.features.backbone
    return {
        "defectscope_version": info.defectscope_version,
        "config": config.to_dict(),
        "backbone": {
            "name": backbone.name,
            "layers": backbone.layers,
            "channels": backbone.channels,
            "strides": backbone.strides,
            "weights": backbone.weights,
            "fingerprint": backbone.fingerprint,
        },
        "preprocessing": parts.preprocessor.to_dict(),
        "feature_dim": int(scorer.bank.shape[1]),
        **scorer.groups_metadata(),
        **scorer.edge_metadata(),
        "grid_size": list(parts.grid_size()),
        "calibration": calibration.to_dict(),
        **{k: v for k, v in info.to_dict().items() if k != "defectscope_version"},
    }


def restore_engine(
    file: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    config: DetectorConfig,
    parts: FeatureParts,
) -> tuple[TorchEngine, Calibration, FitInfo]:
    """The engine (bank or banks on ``parts``' device), calibration and fit record of a read
    model file; a file that does not fit ``parts`` is refused with a clear error."""
    features = parts.features
    backbone = features.backbone
    saved = meta.get("backbone", {})
    if saved.get("fingerprint") != backbone.fingerprint:
        raise ModelFileError(
            f"{file}: the backbone weights available here ({backbone.weights}) differ from "
            f"those the model was trained with ({saved.get('weights')}); the memory bank would "
            "not match. Install the same weights or refit."
        )
    bank = checked_bank(file, tensors, "memory_bank", features.dim)
    scorer = load_scorer(file, bank, config, features.column_groups, meta.get("column_groups"))
    scorer.set_edge_profile(EdgeProfile.from_dict(meta.get("edge_profile"), file))
    half = load_half_scale(file, tensors, meta, config, backbone, parts.device)
    engine = TorchEngine(parts, scorer.to(parts.device), half)
    try:
        calibration = Calibration.from_dict(meta["calibration"])
    except (KeyError, TypeError) as exc:
        raise ModelFileError(f"{file}: calibration data is missing or invalid ({exc})") from None
    return engine, calibration, FitInfo.from_metadata(meta)
