"""Evaluation of a detector on a labelled test split: metrics, runner and report."""

from __future__ import annotations

from defectscope.evaluation.metrics import (
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    roc_curve_points,
    threshold_metrics,
)
from defectscope.evaluation.result import (
    DefectTypeMetrics,
    EvaluationResult,
    ImageRecord,
    Overlay,
)
from defectscope.evaluation.runner import evaluate

__all__ = [
    "DefectTypeMetrics",
    "EvaluationResult",
    "ImageRecord",
    "Overlay",
    "aupro",
    "evaluate",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "roc_curve_points",
    "threshold_metrics",
    "write_report",
]


def __getattr__(name: str):
    # The report pulls in matplotlib; load it only when asked for.
    if name == "write_report":
        from defectscope.evaluation.report import write_report

        return write_report
    raise AttributeError(f"module 'defectscope.evaluation' has no attribute {name!r}")
