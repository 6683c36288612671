"""Auto mode's candidates: the ways to aggregate one backbone pass into patch embeddings, and
the image scores compared on their maps (`defectscope.detector.selection` judges them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from defectscope.config import DetectorConfig
from defectscope.features.patches import PatchFeatures


@dataclass(frozen=True)
class Candidate:
    """One way to aggregate the backbone's layer maps into patch embeddings."""

    name: str
    normalize: str
    neighbourhood: int
    description: str
    balanced: bool = False  # each layer weighted to one mean norm on the bank images

    def features(
        self,
        backbone: Any,
        embedding_dim: int | None,
        weights: list[float] | None,
        norm_power: float,
    ) -> PatchFeatures:
        """The patch-feature module this candidate stands for, on a shared backbone
        (``weights``: the bank images' `balancing_weights`, used by a balanced candidate)."""
        return PatchFeatures(
            backbone,
            self.neighbourhood,
            embedding_dim,
            self.normalize,
            layer_weights=weights if self.balanced else None,
            norm_power=norm_power,
        )

    def apply(self, config: DetectorConfig, weights: list[float] | None = None) -> None:
        config.features.normalize = self.normalize  # type: ignore[assignment]
        config.features.neighbourhood = self.neighbourhood
        config.features.layer_weights = weights if self.balanced else None


CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate("raw", "none", 1, "raw layer features: keeps activation strength"),
        Candidate("l2", "l2", 1, "unit-length layer features: layers weigh equally"),
        Candidate("raw_pool3", "none", 3, "raw features averaged over 3x3 patches"),
        Candidate("l2_pool3", "l2", 3, "unit-length features averaged over 3x3 patches"),
        Candidate(
            "raw_balanced", "none", 1, "raw layer features, each layer at one mean norm", True
        ),
        Candidate(
            "power_balanced",
            "power",
            1,
            "layer features divided by a root of their length (between raw and unit length), "
            "each layer at one mean norm",
            True,
        ),
    )
}
REDUCTIONS = {
    "max": "",
    "topk_mean": "; image score: mean of the top-scoring pixels, not the single highest",
}


def reduce_maps(maps: torch.Tensor, reduction: str, topk_fraction: float) -> torch.Tensor:
    """Image scores of anomaly maps (B, H, W) by ``reduction``, as `AnomalyScorer` reduces."""
    flat = maps.flatten(1).float()
    if reduction == "max":
        return flat.amax(dim=1)
    k = max(1, math.ceil(topk_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


# Balancing weights stay within this range: a layer 1000x weaker than another is an odd input,
# not a scale to undo.
WEIGHT_RANGE = (1e-3, 1e3)


@torch.inference_mode()
def balancing_weights(features: PatchFeatures, maps: list[list[torch.Tensor]]) -> list[float]:
    """Per-layer weights that give every full-size layer of ``features`` (unweighted) the same
    mean norm on the patches of ``maps``, their geometric mean: distances keep their scale."""
    layers = len(features.backbone.channels)
    sums = torch.zeros(layers, dtype=torch.float64)
    count = 0
    for batch in maps:
        patches = features.aggregate(batch[:layers])
        start = 0
        for layer, dim in enumerate(features.layer_dims):
            sums[layer] += patches[:, start : start + dim].norm(dim=1).double().sum().cpu()
            start += dim
        count += patches.shape[0] * patches.shape[2] * patches.shape[3]
    norms = sums / max(count, 1)
    if not bool(torch.isfinite(norms).all()) or float(norms.min()) <= 1e-6:
        return [1.0] * layers  # a layer silent on the good images: nothing to balance
    weights = (norms.log().mean().exp() / norms).clamp(WEIGHT_RANGE[0], WEIGHT_RANGE[1])
    return [round(float(w), 6) for w in weights]
