"""Teaching a fitted model from reviewed false alarms, without a refit.

`extend_bank` embeds good images with the detector's own preprocessing and features, adds their
patch embeddings to a copy of the memory bank and returns a new detector; the old one is left
untouched, so a server can keep serving it until the new one is ready. A bank over
``coreset.max_size`` is thinned back to the cap by the fit's own coreset selection. A model with
a half-size bank (`defectscope.detector.scales`) gets the images in both banks, in the units the
fit set.

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

from defectscope.config import DetectorConfig
from defectscope.data.io import ImageInput
from defectscope.data.loading import iter_loaded
from defectscope.detector.calibration import FIT_SOURCE, Calibration, calibrate
from defectscope.detector.coreset import select_coreset
from defectscope.detector.detector import Detector
from defectscope.detector.engine import TorchEngine
from defectscope.detector.model_file import read_header, resolve_model_path, write_model_file
from defectscope.detector.parts import FeatureParts
from defectscope.detector.scales import HalfScale
from defectscope.detector.scoring import AnomalyScorer
from defectscope.errors import DefectscopeError

# Metadata a model file may carry beyond `Detector.describe()`: kept across every rewrite.
EXTRA_KEYS = ("lineage", "threshold_audit", "calibrated_threshold", "calibrated_pixel_threshold")


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
        calibration.tail_spread,
    )
    return rule.threshold, rule.pixel_threshold


@torch.inference_mode()
def _embed(
    parts: FeatureParts, batch_size: int, images: Sequence[ImageInput]
) -> list[torch.Tensor]:
    """Per image, its patch embeddings (D, h, w) on the detector's device."""
    rows: list[torch.Tensor] = []
    for batch in iter_loaded(list(images), batch_size):
        for item in batch:
            if item.error is not None:
                raise item.error
        arrays = [image for item in batch if (image := item.image) is not None]
        embeddings = parts.embed(parts.preprocessor(arrays))
        rows.extend(embeddings[i] for i in range(embeddings.shape[0]))
    return rows


@dataclass
class _TaughtBank:
    """One scale's bank with the taught rows, and the taught images' leave-one-out maps and
    image scores against it."""

    scorer: AnomalyScorer
    rows_added: int
    maps: list[torch.Tensor]
    scores: list[torch.Tensor]


def _teach_bank(
    scorer: AnomalyScorer, config: DetectorConfig, embedded: list[torch.Tensor]
) -> _TaughtBank:
    """``scorer``'s bank plus the rows of ``embedded`` (thinned to the coreset cap), and the
    leave-one-out maps and scores of each taught image (how the fit calibrates)."""
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
    cap = config.coreset.max_size
    if cap is not None and config.coreset.method != "none" and bank.shape[0] > cap:
        chosen = select_coreset(bank, config.coreset, n_select=cap)
        bank, owners = bank[chosen].contiguous(), owners[chosen.cpu()]
    # The passes keep the fit's units of distance and of image score, and its edge profile:
    # the good scores were measured in them.
    new_scorer = AnomalyScorer(
        bank,
        scorer.config,
        scorer.input_size,
        scorer.groups,
        scorer.group_weights,
        scorer.score_weights,
    ).to(device)
    new_scorer.set_edge_profile(scorer.edge_profile)
    owner_on_device = owners.to(device)
    maps, scores = [], []
    for index, embedding in enumerate(e.unsqueeze(0) for e in embedded):
        own = [(owner_on_device == index).nonzero().flatten()]
        image_maps, image_scores = new_scorer.score_excluding(embedding, own)
        maps.append(image_maps)
        scores.append(image_scores)
    return _TaughtBank(new_scorer, int((owners >= 0).sum()), maps, scores)


@torch.inference_mode()
def extend_bank(detector: Detector, images: Sequence[ImageInput]) -> TeachResult:
    """A new detector whose memory bank also holds the patches of ``images`` (good images);
    a model with a half-size bank gets them in both banks.

    ``detector`` is not changed; the new one shares its backbone (read-only at inference).
    """
    scorer = detector.scorer
    calibration = detector.calibration
    if scorer is None or calibration is None or detector.runtime != "torch":
        raise DefectscopeError("teaching needs a fitted PyTorch model (not an exported one)")
    if len(images) == 0:
        raise DefectscopeError("nothing to teach: give at least one image")
    parts, config = detector.feature_parts(), detector.config
    full = _teach_bank(scorer, config, _embed(parts, config.batch_size, images))
    maps, image_scores = full.maps, full.scores
    half = detector.half_scale
    taught_half = None
    if half is not None:
        half_bank = _teach_bank(half.scorer, config, _embed(half.parts, config.batch_size, images))
        taught_half = HalfScale(half.parts, half_bank.scorer, half.scales)
        halves = zip(maps, half_bank.maps, image_scores, half_bank.scores, strict=True)
        pairs = [half.scales.combine([m, hm], [s, hs]) for m, hm, s, hs in halves]
        maps, image_scores = [m for m, _ in pairs], [s for _, s in pairs]
    scores = [float(s[0]) for s in image_scores]
    maxima = [float(m.flatten(1).amax(1)[0]) for m in maps]
    rule = calibrate(
        np.asarray(list(calibration.good_scores) + scores),
        np.asarray(list(calibration.good_pixel_maxima) + maxima),
        calibration.false_alarm_rate,
        calibration.method,
        calibration.tail_spread,
    )
    calibrated = (rule.threshold, rule.pixel_threshold)
    if calibration.threshold_source != FIT_SOURCE:
        rule = rule.with_thresholds(
            calibration.threshold, calibration.pixel_threshold, calibration.threshold_source
        )
    else:
        rule.threshold_source = FIT_SOURCE

    taught = copy.copy(detector)
    taught.engine = TorchEngine(parts, full.scorer, taught_half)
    taught.calibration = rule
    taught.info = copy.deepcopy(detector.info)
    bank_rows = int(full.scorer.bank.shape[0])
    taught.info.bank_size = bank_rows
    if taught_half is not None and taught.info.scales is not None:
        taught.info.scales["half_bank_size"] = int(taught_half.scorer.bank.shape[0])
    return TeachResult(
        taught, len(images), full.rows_added, bank_rows, *calibrated, taught_scores=scores
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
    return write_model_file(path, detector.memory_banks(), meta)
