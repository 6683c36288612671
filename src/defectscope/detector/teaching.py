"""Teaching a fitted model from reviewed false alarms, without a refit.

`extend_bank` embeds good images with the detector's own preprocessing and features, adds their
patch embeddings to a copy of the memory bank and returns a new detector; the old one is left
untouched, so a server can keep serving it until the new one is ready. A bank over
``coreset.max_size`` is thinned back to the cap by the fit's own coreset selection.

Calibration: the training images are not available any more, only their out-of-sample scores
(``calibration.good_scores``). The taught images are good images, so their leave-one-out scores
against the new bank (each without its own rows, as at fit) join those scores, and the image and
pixel thresholds are recomputed by the fit's rule (`calibrate`). A threshold a person set
(``threshold_source`` other than the fit's) is kept as it is; ``calibrated_threshold`` always
records the rule's value. The stored good scores were measured against the old bank, which only
lacked rows: against the new bank they could only be lower, so the estimate stays conservative.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.data.io import ImageInput
from defectscope.data.loading import iter_loaded
from defectscope.detector.calibration import Calibration, calibrate
from defectscope.detector.coreset import select_coreset
from defectscope.detector.detector import Detector
from defectscope.detector.engine import TorchEngine
from defectscope.detector.model_file import read_header, resolve_model_path, write_model_file
from defectscope.detector.scoring import AnomalyScorer
from defectscope.errors import DefectscopeError

# Metadata a model file may carry beyond `Detector.describe()`: kept across every rewrite.
EXTRA_KEYS = ("lineage", "threshold_audit", "calibrated_threshold", "calibrated_pixel_threshold")
FIT_SOURCE = "good_quantile"


@dataclass
class TeachResult:
    """The taught detector and what teaching did."""

    detector: Detector
    images: int
    bank_rows_added: int
    bank_rows: int
    calibrated_threshold: float
    calibrated_pixel_threshold: float
    taught_scores: list[float] = field(default_factory=list)


def calibrated_thresholds(calibration: Calibration) -> tuple[float, float]:
    """The fit's rule on the stored good scores: (image, pixel) thresholds."""
    if not calibration.good_scores:
        return calibration.threshold, calibration.pixel_threshold
    maxima = calibration.good_pixel_maxima or [calibration.pixel_threshold]
    rule = calibrate(
        np.asarray(calibration.good_scores),
        np.asarray(maxima),
        calibration.false_alarm_rate,
        calibration.method,
    )
    return rule.threshold, rule.pixel_threshold


def false_alarm_rate(good_scores: Sequence[float], threshold: float) -> float:
    """Share of good calibration scores a threshold would flag (score >= threshold, as predict)."""
    scores = np.asarray(good_scores, dtype=np.float64)
    return float((scores >= threshold).mean()) if scores.size else 0.0


@torch.inference_mode()
def _embed(detector: Detector, images: Sequence[ImageInput]) -> list[torch.Tensor]:
    """Per image, its patch embeddings (D, h, w) on the detector's device."""
    parts = detector.feature_parts()
    rows: list[torch.Tensor] = []
    for batch in iter_loaded(list(images), detector.config.batch_size):
        for item in batch:
            if item.error is not None:
                raise item.error
        arrays = [image for item in batch if (image := item.image) is not None]
        embeddings = parts.embed(parts.preprocessor(arrays))
        rows.extend(embeddings[i] for i in range(embeddings.shape[0]))
    return rows


@torch.inference_mode()
def extend_bank(detector: Detector, images: Sequence[ImageInput]) -> TeachResult:
    """A new detector whose memory bank also holds the patches of ``images`` (good images).

    ``detector`` is not changed; the new one shares its backbone (read-only at inference).
    """
    scorer = detector.scorer
    calibration = detector.calibration
    if scorer is None or calibration is None or detector.runtime != "torch":
        raise DefectscopeError("teaching needs a fitted PyTorch model (not an exported one)")
    if len(images) == 0:
        raise DefectscopeError("nothing to teach: give at least one image")
    embedded = _embed(detector, images)
    # (h*w, D) rows per image, in the order the fit flattens patches.
    per_image = [e.flatten(1).T.contiguous() for e in embedded]
    old_bank = scorer.bank
    device = old_bank.device
    new_rows = torch.cat(per_image).to(device=device, dtype=old_bank.dtype)
    bank = torch.cat([old_bank, new_rows])
    # Owner of each row: -1 for the old bank, else the taught image's index.
    owners = torch.cat(
        [torch.full((old_bank.shape[0],), -1, dtype=torch.long)]
        + [torch.full((r.shape[0],), i, dtype=torch.long) for i, r in enumerate(per_image)]
    )
    cap = detector.config.coreset.max_size
    if cap is not None and detector.config.coreset.method != "none" and bank.shape[0] > cap:
        chosen = select_coreset(bank, detector.config.coreset, n_select=cap)
        bank, owners = bank[chosen].contiguous(), owners[chosen.cpu()]
    config = detector.config
    # The passes keep the fit's units of distance and of image score: the good scores below were
    # measured in them.
    new_scorer = AnomalyScorer(
        bank,
        config.scoring,
        config.features.input_size,
        scorer.groups,
        scorer.group_weights,
        scorer.score_weights,
    ).to(device)

    # Leave-one-out scores of the taught images: how the fit calibrates on its own images.
    parts = detector.feature_parts()
    owner_on_device = owners.to(device)
    scores: list[float] = []
    maxima: list[float] = []
    for index, embedding in enumerate(e.unsqueeze(0) for e in embedded):
        own = [(owner_on_device == index).nonzero().flatten()]
        maps, image_scores = new_scorer.score_excluding(embedding, own)
        scores.append(float(image_scores[0]))
        maxima.append(float(maps.flatten(1).amax(1)[0]))
    rule = calibrate(
        np.asarray(list(calibration.good_scores) + scores),
        np.asarray(list(calibration.good_pixel_maxima) + maxima),
        calibration.false_alarm_rate,
        calibration.method,
    )
    calibrated = (rule.threshold, rule.pixel_threshold)
    if calibration.threshold_source != FIT_SOURCE:
        rule = rule.with_thresholds(
            calibration.threshold, calibration.pixel_threshold, calibration.threshold_source
        )
    else:
        rule.threshold_source = FIT_SOURCE

    taught = copy.copy(detector)
    taught.engine = TorchEngine(parts, new_scorer)
    taught.calibration = rule
    taught.info = copy.deepcopy(detector.info)
    taught.info.bank_size = int(bank.shape[0])
    added = int((owners >= 0).sum())
    return TeachResult(
        taught, len(per_image), added, int(bank.shape[0]), *calibrated, taught_scores=scores
    )


def bank_fingerprint(detector: Detector) -> str:
    """A short digest of the memory bank: names a model version in its children's lineage."""
    bank = detector.memory_bank.detach().cpu().contiguous().numpy()
    return hashlib.sha256(bank.tobytes()).hexdigest()[:16]


def lineage(
    parent: Detector,
    result: TeachResult,
    *,
    parent_version: str | None,
    prediction_ids: Sequence[int] = (),
    created_by: str = "anonymous",
) -> dict[str, Any]:
    """What a taught model records about where it comes from (``lineage`` in its metadata)."""
    return {
        "parent_version": parent_version,
        "parent_fingerprint": bank_fingerprint(parent),
        "prediction_ids": [int(i) for i in prediction_ids],
        "images_taught": result.images,
        "bank_rows_added": result.bank_rows_added,
        "bank_rows": result.bank_rows,
        "created_at": datetime.now(UTC).isoformat(),
        "created_by": created_by,
    }


def model_extras(path: str | Path) -> dict[str, Any]:
    """The extra metadata (`EXTRA_KEYS`) stored in a model file; {} for none."""
    meta = read_header(resolve_model_path(path))
    return {key: meta[key] for key in EXTRA_KEYS if key in meta}


def save_model(detector: Detector, path: str | Path, extras: dict[str, Any]) -> Path | str:
    """`Detector.save` plus ``extras`` (lineage, audit trail...) in the metadata, atomically."""
    unknown = set(extras) - set(EXTRA_KEYS)
    if unknown:
        raise DefectscopeError(f"unknown model metadata: {sorted(unknown)}")
    meta = {**detector.describe(), **extras}
    return write_model_file(path, {"memory_bank": detector.memory_bank}, meta)
