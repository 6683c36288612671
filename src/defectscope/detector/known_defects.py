"""Known defects: a few real defective images of the product, when the user has them.

Synthetic defects show what a product's good images look like when something is painted on
them, not how large or faint its real defects are; auto mode's choices that depend on that
(the image score's reduction, the half-size pass) follow them the wrong way on some products
(BENCHMARKS.md, "The half-size pass chosen by auto mode"). A handful of real defective images
answers the question directly: auto mode then judges its candidates on them (image AUROC against
the held-out good images) and also tries the chosen candidate with the half-size pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.config import DetectorConfig
from defectscope.data.io import load_image
from defectscope.detector.ranking import auroc
from defectscope.detector.scoring import AnomalyScorer, sum_passes
from defectscope.errors import ConfigError, ImageLoadError
from defectscope.features.backbones import FeatureBackbone
from defectscope.features.patches import PatchFeatures

# Score ratio (log) at which a defect/good pair counts about 88 % won (soft_auroc): a few
# known defects are often all separated, and then the wider separation should win.
SOFT_AUROC_SCALE = 0.05


def soft_auroc(labels: np.ndarray, scores: np.ndarray, scale: float = SOFT_AUROC_SCALE) -> float:
    """AUROC with each defect/good pair counted by how far apart their scores are, as the
    logistic of their log ratio over ``scale``: the hard AUROC as ``scale`` -> 0, but a
    candidate that separates every pair by 30 % beats one that does so by 3 %. Log ratios
    make it independent of the scores' units, so candidates of different features compare."""
    values = np.log(np.maximum(np.asarray(scores, dtype=np.float64), 1e-12))
    labels = np.asarray(labels)
    gaps = values[labels == 1][:, None] - values[labels == 0][None, :]
    return float(np.mean(1.0 / (1.0 + np.exp(-np.clip(gaps / scale, -50, 50)))))


def load_known_defects(
    paths: Sequence[Path], prepare: Callable[[np.ndarray], np.ndarray]
) -> list[np.ndarray]:
    """``prepare`` (resizing to the network's input) of each known defective image, decoded one
    at a time: a few large images never sit in memory at full size together."""
    out = []
    for path in paths:
        try:
            out.append(prepare(load_image(path)))
        except ImageLoadError as exc:
            raise ConfigError(f"auto.known_defects: {exc}") from None
    return out


def half_size_fits(backbone: FeatureBackbone, input_size: tuple[int, int]) -> bool:
    """Whether ``backbone`` takes the half-size pass's input (half of ``input_size``)."""
    try:
        backbone.check_input_size((-(-input_size[0] // 2), -(-input_size[1] // 2)))
    except ConfigError:
        return False
    return True


@torch.inference_mode()
def half_scale_row(
    trial: PatchFeatures,
    bank: torch.Tensor,
    config: DetectorConfig,
    input_size: tuple[int, int],
    maps: Sequence[list[torch.Tensor]],
    labels: np.ndarray,
    reduction: str,
) -> dict[str, Any]:
    """How a two-pass ``trial`` (full and half size) separates the known defects: each pass's
    image score (by ``reduction``) in units of its mean on the held-out good images
    (``labels`` 0), added, as a calibrated two-pass model adds them in units of its thresholds.
    ``maps``: the layer maps of both passes, a list per batch of good then defective images."""
    scoring = config.scoring.model_copy(update={"reduction": reduction})
    scorer = AnomalyScorer(bank, scoring, input_size, trial.column_groups).to(bank.device)
    scored = [scorer.score_by_pass(trial.aggregate(batch))[2] for batch in maps]
    per_pass = torch.cat([p.float().cpu() for p in scored if p is not None], dim=1)  # (2, N)
    good = torch.as_tensor(labels == 0)
    units = per_pass[:, good].mean(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    # The calibrated model's own sum of weighed passes, with these units in place of thresholds.
    scorer.set_score_weights((1.0 / units).tolist())
    scores = sum_passes(list(per_pass), scorer.score_weights)
    return {
        "image_auroc": round(auroc(labels, scores.numpy()), 4),
        "pixel_auroc": None,
        "objective": round(soft_auroc(labels, scores.numpy()), 4),
    }
