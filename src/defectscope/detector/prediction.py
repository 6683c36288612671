"""What the detector returns for one image."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Prediction:
    """Result for one image; maps are at the original image's resolution.

    ``score`` is the raw anomaly score (distance units of the memory bank);
    ``normalized_score`` maps the image threshold to 0.5 (monotone, in (0, 1)).
    """

    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    anomaly_map: np.ndarray  # float32 (H, W), raw units
    mask: np.ndarray  # bool (H, W): pixels over the pixel threshold
    pixel_threshold: float
    source: str | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "anomalous" if self.is_anomalous else "good"

    def summary(self) -> dict:
        """JSON-friendly fields, without the maps."""
        return {
            "source": self.source,
            "score": float(self.score),
            "normalized_score": float(self.normalized_score),
            "is_anomalous": bool(self.is_anomalous),
            "label": self.label,
            "threshold": float(self.threshold),
            "pixel_threshold": float(self.pixel_threshold),
            # A count, not mask.mean(): the same number without a float copy of the mask.
            "defect_area_fraction": (
                np.count_nonzero(self.mask) / self.mask.size if self.mask.size else 0.0
            ),
            "height": int(self.anomaly_map.shape[0]),
            "width": int(self.anomaly_map.shape[1]),
        }
