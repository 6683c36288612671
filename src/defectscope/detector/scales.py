"""A bank per scale: the full-size memory bank plus one fitted on the image at half size.

Small defects need the fine grid; large low-contrast ones (blotches, uneven gloss, wide
cracks) show only when a patch sees more of its surroundings. One bank with both scales'
features in every row (``features.half_scale``) shares one coreset and one nearest patch between
them; two banks let each scale keep its own. The half-size bank is a complete second fit of the
same configuration (`half_scale_config`): the backbone sees the same input averaged over 2x2
pixels (`FeatureParts.pooling`), on a grid half as fine, with its own coreset and its own
leave-one-out calibration, and its maps are brought to the full input size.

The two add up in units of each scale's own thresholds on good images (`ScaleSet`):
``score = s_full / t_full + w * s_half / t_half`` and ``map = m_full / p_full + w * m_half /
p_half``, so a scale that separates nothing on a product cannot raise every good image. The
thresholds of the sum come from the same training images' paired out-of-sample values: the
image threshold from their summed scores, the pixel threshold from their summed map maxima (an
upper bound of the summed map's maximum: with ``reduction='max'`` both thresholds are one
number, and a drawn mask implies a flagged image). Measured across the benchmark's categories
(``benchmarks/two_scales.py``), weight 0.5 raised the worst category's image AUROC and AUPRO
and the mean recall; BENCHMARKS.md has the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from defectscope.config import DetectorConfig
from defectscope.detector import few_shot
from defectscope.detector.calibration import Calibration, calibrate
from defectscope.detector.edge_profile import EdgeProfile
from defectscope.detector.model_file import checked_bank, load_scorer
from defectscope.detector.parts import FeatureParts
from defectscope.detector.scoring import AnomalyScorer
from defectscope.errors import DefectscopeError, ModelFileError
from defectscope.features.backbones import FeatureBackbone

HALF_POOLING: Literal[2] = 2


def uses_half_scale(config: DetectorConfig, n_images: int) -> bool:
    """Whether a fit of ``n_images`` with ``config`` (after auto mode) adds a half-size bank.

    Not for few-shot fits (with two banks, screw from 2 images fell 0.825 -> 0.748 image AUROC
    while bottle rose 0.998 -> 1.000: BENCHMARKS.md), nor on top of the one-bank half-size
    pass, nor for the half-size bank itself."""
    features = config.features
    return (
        features.half_size_bank > 0
        and features.input_pooling == 1
        and not features.half_scale
        and not few_shot.applies(config, n_images)
    )


def half_scale_config(config: DetectorConfig) -> DetectorConfig:
    """The half-size bank's configuration: the full one's (as auto mode chose it), the input
    averaged over 2x2 pixels, nothing chosen again, the blur as wide on the image as the
    full-size map's is on a map of half the size, and a quarter of the bank's lower bound."""
    half = config.model_copy(deep=True)
    half.features.input_pooling = HALF_POOLING
    half.features.half_size_bank = 0.0
    half.auto.enabled = False
    half.auto.known_defects = None
    half.fit.drop_suspects = False  # the joined scores name the suspects; the full fit drops
    half.scoring.smoothing_sigma = config.scoring.smoothing_sigma * HALF_POOLING
    # A quarter of the patches: the same share of them as the full-size bank's lower bound.
    if config.coreset.min_size is not None:
        half.coreset.min_size = math.ceil(config.coreset.min_size / HALF_POOLING**2)
    return half


def _unit(value: float) -> float:
    """1 / a threshold; a scale whose good images all score 0 counts as it is."""
    return 1.0 / value if value > 0 and math.isfinite(value) else 1.0


@dataclass(frozen=True)
class ScaleSet:
    """How the full-size and half-size scales add up: one weight per scale for the image
    scores (``image_weights``) and for the maps (``map_weights``), each 1 / that scale's own
    threshold times its share (1 for full size, ``half_weight`` for half size)."""

    half_weight: float
    image_weights: tuple[float, float]
    map_weights: tuple[float, float]

    @classmethod
    def from_calibrations(cls, full: Calibration, half: Calibration, weight: float) -> ScaleSet:
        (full_image, full_pixel), (half_image, half_pixel) = (
            full.quantile_thresholds(),
            half.quantile_thresholds(),
        )
        return cls(
            float(weight),
            (_unit(full_image), weight * _unit(half_image)),
            (_unit(full_pixel), weight * _unit(half_pixel)),
        )

    def combine(
        self, maps: Sequence[torch.Tensor], scores: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(maps (B, H, W), scores (B,)) of each scale, full size first -> their sum in units.
        Traceable (the export adds them the same way)."""
        (full_map, half_map), (full_score, half_score) = maps, scores
        wm, wi = self.map_weights, self.image_weights
        return (
            full_map * wm[0] + half_map * wm[1],
            full_score * wi[0] + half_score * wi[1],
        )

    def calibration(self, full: Calibration, half: Calibration) -> Calibration:
        """Thresholds of the sum from the paired out-of-sample values of the same images."""
        if len(full.good_scores) != len(half.good_scores) or len(full.good_pixel_maxima) != len(
            half.good_pixel_maxima
        ):
            raise ValueError(
                f"the two scales calibrated on different images ({len(full.good_scores)} and "
                f"{len(half.good_scores)} scores)"
            )
        scores = self._add(full.good_scores, half.good_scores, self.image_weights)
        maxima = self._add(full.good_pixel_maxima, half.good_pixel_maxima, self.map_weights)
        return calibrate(scores, maxima, full.false_alarm_rate, full.method, full.tail_spread)

    @staticmethod
    def _add(full: Sequence[float], half: Sequence[float], weights: Sequence[float]) -> np.ndarray:
        return np.asarray(full, np.float64) * weights[0] + np.asarray(half, np.float64) * weights[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "half_weight": self.half_weight,
            "image_weights": list(self.image_weights),
            "map_weights": list(self.map_weights),
        }

    @classmethod
    def from_dict(cls, data: Any, file: Any = "model") -> ScaleSet:
        """Read back `to_dict`; a malformed entry is a ModelFileError naming ``file``."""
        try:
            weight = float(data["half_weight"])
            image = tuple(float(w) for w in data["image_weights"])
            maps = tuple(float(w) for w in data["map_weights"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{file}: the weights of its two scales are missing") from None
        values = [weight, *image, *maps]
        if len(image) != 2 or len(maps) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ModelFileError(f"{file}: the weights of its two scales are invalid: {data}")
        return cls(weight, (image[0], image[1]), (maps[0], maps[1]))


@dataclass
class HalfScale:
    """The half-size bank: its feature extractor (the same backbone, pooled input), its scorer,
    and how its map and score add to the full-size ones."""

    parts: FeatureParts
    scorer: AnomalyScorer
    scales: ScaleSet


def join_scales(
    weight: float,
    full: Calibration,
    parts: FeatureParts,
    scorer: AnomalyScorer,
    half_calibration: Calibration,
) -> tuple[HalfScale, Calibration, dict[str, Any]]:
    """The half-size bank (its ``parts``, ``scorer`` and calibration, fitted on the same images
    as the full-size one) joined at ``weight``: the `HalfScale`, the calibration of the sum,
    and what the model records about it (``FitInfo.scales``)."""
    scales = ScaleSet.from_calibrations(full, half_calibration, weight)
    try:
        calibration = scales.calibration(full, half_calibration)
    except ValueError as exc:
        raise DefectscopeError(f"the half-size bank cannot be joined: {exc}") from None
    record = {
        **scales.to_dict(),
        "half_bank_size": int(scorer.bank.shape[0]),
        "half_grid_size": list(parts.grid_size()),
        **scorer.edge_metadata(),
        # Each bank's (image, pixel) unit: its plain quantile, before any tail spread.
        "thresholds": {
            "full": list(full.quantile_thresholds()),
            "half": list(half_calibration.quantile_thresholds()),
        },
    }
    return HalfScale(parts, scorer, scales), calibration, record


def load_half_scale(
    file: Any,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    config: DetectorConfig,
    backbone: FeatureBackbone,
    device: torch.device,
) -> HalfScale | None:
    """The saved half-size bank of a model that has one (``scales`` in its metadata), on the
    full-size model's ``backbone``; None for a model of one bank."""
    saved = meta.get("scales")
    if saved is None:
        return None
    scales = ScaleSet.from_dict(saved, file)
    half_config = half_scale_config(config)
    parts = FeatureParts.build(backbone, half_config.features, device, config.half_precision)
    bank = checked_bank(file, tensors, "memory_bank_half", parts.features.dim)
    scorer = load_scorer(file, bank, half_config, None, None)
    scorer.set_edge_profile(EdgeProfile.from_dict(saved.get("edge_profile"), file))
    return HalfScale(parts, scorer.to(device), scales)
