"""Scoring engines: what turns a normalised batch into anomaly maps and image scores.

A `Detector` owns one. `TorchEngine` runs the backbone and the memory bank in PyTorch;
exported graphs (`defectscope.export.graph.ExportedGraph`) run in onnxruntime or OpenVINO.
Everything around the engine (decoding, preprocessing, maps at the original size,
thresholds) is the detector's own code, the same for every runtime.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from defectscope.detector.parts import FeatureParts
from defectscope.detector.scales import HalfScale
from defectscope.detector.scoring import AnomalyScorer


class ScoringEngine(Protocol):
    """(B, 3, H, W) normalised input -> (anomaly maps at input size, image scores)."""

    runtime: str

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class TorchEngine:
    """The backbone's patch features scored against the memory bank, in PyTorch; with a
    ``half`` scale, both banks' maps and scores added in their units."""

    runtime = "torch"

    def __init__(
        self, parts: FeatureParts, scorer: AnomalyScorer, half: HalfScale | None = None
    ) -> None:
        self.parts = parts
        self.scorer = scorer
        self.half = half

    @torch.inference_mode()
    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores, _ = self.score_and_embed(batch)
        return maps, scores

    @torch.inference_mode()
    def score_and_embed(
        self, batch: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As `score_batch`, plus the full-size patch embeddings (B, D, h, w) it scored."""
        embeddings = self.parts.embed(batch)
        maps, scores = self.scorer(embeddings)
        if self.half is not None:
            half_maps, half_scores = self.half.scorer(self.half.parts.embed(batch))
            maps, scores = self.half.scales.combine([maps, half_maps], [scores, half_scores])
        return maps, scores, embeddings

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime}
