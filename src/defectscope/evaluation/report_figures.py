"""The evaluation report's figures: ROC curves, the score histogram and the overlay grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defectscope.evaluation.formatting import fmt, short_name
from defectscope.evaluation.metrics import roc_curve_points
from defectscope.evaluation.result import EvaluationResult
from defectscope.visualize import mask_to_png_array, overlay


def _new_figure(width: float, height: float):
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def roc_figure(result: EvaluationResult, path: Path) -> Path | None:
    labels = result.labels
    scores = result.scores
    if labels.size == 0 or labels.min() == labels.max():
        return None
    figure = _new_figure(5.5, 5.0)
    ax = figure.add_subplot()
    fpr, tpr, _ = roc_curve_points(labels, scores)
    ax.plot(fpr, tpr, color="black", lw=2.2, label=f"all (AUROC {fmt(result.image_auroc, 3)})")
    good = labels == 0
    types = np.array([r.defect_type for r in result.records])
    for name, row in result.per_defect.items():
        members = (types == name) & (labels == 1)
        if row.defect_type == "good" or not members.any():
            continue
        subset = good | members
        fpr, tpr, _ = roc_curve_points(labels[subset], scores[subset])
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({fmt(row.image_auroc, 3)})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False-positive rate (good images flagged)")
    ax.set_ylabel("True-positive rate (defects caught)")
    ax.set_title("Image-level ROC")
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def histogram_figure(result: EvaluationResult, path: Path) -> Path:
    labels = result.labels
    scores = result.scores
    figure = _new_figure(7.0, 4.0)
    ax = figure.add_subplot()
    finite = scores[np.isfinite(scores)]
    lines = [v for v in (result.threshold, result.f1_threshold) if math.isfinite(v)]
    lo = min([*finite.tolist(), *lines]) if finite.size or lines else 0.0
    hi = max([*finite.tolist(), *lines]) if finite.size or lines else 1.0
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    for label, name, color in ((0, "good", "tab:green"), (1, "defective", "tab:red")):
        chosen = scores[labels == label]
        if chosen.size:
            ax.hist(chosen, bins=bins, alpha=0.55, color=color, label=f"{name} ({chosen.size})")
    marks = (
        (result.threshold, "black", "--", 1.5, "stored threshold"),
        (result.f1_threshold, "tab:blue", ":", 1.8, "F1-optimal"),
    )
    for value, color, style, width, name in marks:
        if math.isfinite(value):
            ax.axvline(value, color=color, ls=style, lw=width, label=f"{name} {fmt(value, 3)}")
    ax.set_xlabel("Image anomaly score")
    ax.set_ylabel("Images")
    ax.set_title("Scores of good vs defective test images")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def overlay_figure(result: EvaluationResult, path: Path) -> Path | None:
    items = result.overlays
    if not items:
        return None
    threshold = result.threshold if math.isfinite(result.threshold) else None
    columns = ("original", "heatmap", "predicted mask", "ground truth")
    figure = _new_figure(4 * 2.4, len(items) * 2.5 + 0.3)
    for row, item in enumerate(items):
        heat = overlay(
            item.image, item.anomaly_map, 0.5, vmin=0.0, mask=item.ground_truth, threshold=threshold
        )
        panels: Sequence[np.ndarray | None] = (
            item.image,
            heat,
            mask_to_png_array(item.predicted_mask),
            None if item.ground_truth is None else mask_to_png_array(item.ground_truth),
        )
        for col, panel in enumerate(panels):
            ax = figure.add_subplot(len(items), 4, row * 4 + col + 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                ax.imshow(
                    np.zeros_like(mask_to_png_array(item.predicted_mask)),
                    cmap="gray",
                    vmin=0,
                    vmax=255,
                )
                ax.text(
                    0.5,
                    0.5,
                    "no mask",
                    color="white",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
            else:
                ax.imshow(panel, cmap="gray" if panel.ndim == 2 else None, vmin=0, vmax=255)
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
            if col == 0:
                ax.set_ylabel(
                    f"{short_name(item.source)}\n{item.defect_type}  score {fmt(item.score, 3)}"
                    f"\n{item.reason}",
                    fontsize=7,
                )
    figure.tight_layout()
    figure.savefig(path)
    return path
