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
from defectscope.detector.scoring import AnomalyScorer


class ScoringEngine(Protocol):
    """(B, 3, H, W) normalised input -> (anomaly maps at input size, image scores)."""

    runtime: str

    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class TorchEngine:
    """The backbone's patch features scored against the memory bank, in PyTorch."""

    runtime = "torch"

    def __init__(self, parts: FeatureParts, scorer: AnomalyScorer) -> None:
        self.parts = parts
        self.scorer = scorer

    @torch.inference_mode()
    def score_batch(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer(self.parts.embed(batch))

    def describe(self) -> dict[str, Any]:
        return {"runtime": self.runtime}
