"""What an evaluation produces: metrics, per-image records, timings and report material."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NAN = float("nan")


@dataclass
class DefectTypeMetrics:
    """One defect type against all good test images (the ``good`` row has image counts only)."""

    defect_type: str
    count: int
    mean_score: float
    image_auroc: float = NAN
    pixel_auroc: float = NAN
    aupro: float = NAN
    with_mask: int = 0
    # Share flagged anomalous by the detector's own threshold: the detection rate of a defect
    # type, the false-alarm rate of the good images.
    flagged_rate: float = NAN


@dataclass
class ImageRecord:
    source: str
    defect_type: str
    label: int
    score: float
    normalized_score: float
    is_anomalous: bool
    has_mask: bool = False
    defect_area: float = NAN  # ground-truth defect share of the image (NaN without a mask)
    predicted_area: float = NAN  # share of pixels over the pixel threshold
    iou: float = NAN  # predicted mask vs ground truth, defective images with a mask only

    @property
    def decision(self) -> str:
        return "anomalous" if self.is_anomalous else "good"


@dataclass
class Overlay:
    """Report material for one image, downscaled so the longest side is at most 512 px."""

    source: str
    defect_type: str
    label: int
    score: float
    reason: str  # why it was picked, e.g. "highest-scored defect"
    image: np.ndarray  # RGB uint8
    anomaly_map: np.ndarray  # float32, raw units
    predicted_mask: np.ndarray  # bool
    ground_truth: np.ndarray | None  # bool, None when the image has no mask


@dataclass
class EvaluationResult:
    """Metrics of a detector on a test split.

    Metrics that are undefined for the data (one class only, no masks) are NaN in the object
    and ``null`` in ``to_dict()``; ``notes`` says why.
    """

    image_auroc: float
    pixel_auroc: float
    aupro: float
    f1_max: float
    f1_threshold: float
    threshold: float  # the detector's stored image threshold
    pixel_threshold: float
    accuracy: float
    precision: float
    recall: float
    false_alarm_rate: float
    confusion: dict[str, int]
    mean_defect_iou: float
    fpr_limit: float
    per_defect: dict[str, DefectTypeMetrics]
    records: list[ImageRecord]
    timings: dict[str, float]  # seconds unless the key says ms; batch_size is a count
    context: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    overlays: list[Overlay] = field(default_factory=list, repr=False)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=int)

    @property
    def scores(self) -> np.ndarray:
        return np.array([r.score for r in self.records], dtype=np.float64)

    @property
    def metrics(self) -> dict[str, float]:
        """The overall metrics as a flat dict."""
        return {
            "image_auroc": self.image_auroc,
            "pixel_auroc": self.pixel_auroc,
            "aupro": self.aupro,
            "aupro_fpr_limit": self.fpr_limit,
            "f1_max": self.f1_max,
            "f1_threshold": self.f1_threshold,
            "threshold": self.threshold,
            "pixel_threshold": self.pixel_threshold,
            "accuracy": self.accuracy,
            "precision": self.precision,
            "recall": self.recall,
            "false_alarm_rate": self.false_alarm_rate,
            "mean_defect_iou": self.mean_defect_iou,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything but the overlay pixels, JSON-safe (NaN and inf become None)."""
        records = []
        for record in self.records:
            row = asdict(record)
            row["decision"] = record.decision
            records.append(row)
        return jsonable(
            {
                "metrics": self.metrics,
                "confusion": self.confusion,
                "per_defect": {k: asdict(v) for k, v in self.per_defect.items()},
                "timings": self.timings,
                "context": self.context,
                "notes": self.notes,
                "counts": {
                    "images": len(self.records),
                    "good": int(sum(r.label == 0 for r in self.records)),
                    "defective": int(sum(r.label == 1 for r in self.records)),
                    "defective_with_mask": int(
                        sum(r.label == 1 and r.has_mask for r in self.records)
                    ),
                },
                "overlays": [
                    {
                        "source": o.source,
                        "defect_type": o.defect_type,
                        "score": o.score,
                        "reason": o.reason,
                    }
                    for o in self.overlays
                ],
                "records": records,
            }
        )


def jsonable(value: Any) -> Any:
    """Recursively convert numpy scalars/arrays, Paths and non-finite floats for ``json``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str):
        return value
    return str(value)
