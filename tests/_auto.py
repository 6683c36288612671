"""Auto mode in tests: a small, fast configuration and a candidate that cannot see defects."""

from __future__ import annotations

import torch
from _images import FAST_CONFIG

from defectscope.detector.selection import Candidate
from defectscope.features.patches import PatchFeatures

AUTO_CONFIG = {
    **FAST_CONFIG,
    "auto": {
        "enabled": True,
        "candidates": ["raw", "l2"],
        "reductions": ["max"],
        "min_images": 10,
        "holdout_images": 4,
        "bank_images": 10,
        "defects_per_image": 3,
    },
}


class Blind(PatchFeatures):
    """Patch features that ignore the image: every patch looks alike, so nothing separates."""

    def aggregate(self, maps: list[torch.Tensor]) -> torch.Tensor:
        real = super().aggregate(maps)
        generator = torch.Generator().manual_seed(0)
        noise = torch.rand(real.shape[1:], generator=generator)
        return noise.expand_as(real).contiguous()


class BlindCandidate(Candidate):
    """A candidate whose features are `Blind`."""

    def features(self, backbone, embedding_dim, weights=None, norm_power=0.25):  # type: ignore[no-untyped-def]
        return Blind(backbone, self.neighbourhood, embedding_dim, self.normalize)
