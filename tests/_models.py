"""Model helpers: the shared quick model's training set (see conftest.py's `fitted`), copies
of a model with other scoring rules or in another folder, and model files edited the way a
corrupt disk or a careless hand would, for refusal tests."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _images import texture_crops
from safetensors.torch import save_file

from defectscope.detector.detector import Detector
from defectscope.detector.engine import TorchEngine
from defectscope.detector.model_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_FILENAME,
    read_header,
    resolve_model_path,
    tensor_digest,
)
from defectscope.detector.scales import HalfScale
from defectscope.detector.scoring import AnomalyScorer

# conftest.py's `fitted` is fitted on these: FAST_CONFIG, FAST_TRAIN_SIZE texture crops, seed 0.
FAST_TRAIN_SIZE = 16


def fast_train_images() -> list[np.ndarray]:
    """The training images of the session's shared `fitted` model."""
    return texture_crops(FAST_TRAIN_SIZE, seed=0)


def with_scoring(detector: Detector, **scoring: Any) -> Detector:
    """A shallow copy of a fitted ``detector`` scoring its own memory bank by other rules
    (``reduction``, ``k``, ...): what a fit with those rules would score, without the refit.
    Calibration (thresholds) stays the original's; ``detector`` itself is not changed."""
    config = detector.config.model_copy(
        update={"scoring": detector.config.scoring.model_copy(update=scoring)}
    )
    scorer = detector.scorer
    assert scorer is not None, "with_scoring needs a fitted detector"
    half = detector.half_scale
    if half is not None:
        rules = half.scorer.config.model_copy(update=scoring)
        half = HalfScale(
            half.parts, AnomalyScorer(half.scorer.bank, rules, half.scorer.input_size), half.scales
        )
    other = copy.copy(detector)
    other.config = config
    other.engine = TorchEngine(
        detector.feature_parts(),
        AnomalyScorer(scorer.bank, config.scoring, scorer.input_size),
        half,
    )
    return other


def copy_model(source: Path, target: Path) -> Path:
    """The folder ``target`` holding a copy of the model file in folder ``source``: for tests
    that write to a model file (thresholds) without touching a shared one."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / MODEL_FILENAME, target / MODEL_FILENAME)
    return target


def rewritten_model(
    source: Path, target: Path, edit: Callable[[dict, dict[str, torch.Tensor]], object]
) -> Path:
    """A copy of ``source`` with ``edit(meta, tensors)`` applied, checksums made to match, and
    written without `write_model_file`'s checks (NaN stays NaN in the JSON header)."""
    from safetensors.torch import load_file

    file = resolve_model_path(source)
    meta = read_header(file)
    tensors = load_file(str(file))
    edit(meta, tensors)
    meta["tensor_sha256"] = {name: tensor_digest(value) for name, value in tensors.items()}
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta),
    }
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / MODEL_FILENAME), header)
    return target
