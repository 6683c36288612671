"""Write an evaluation to a folder: JSON, CSV, PNG figures, a self-contained HTML and Markdown.

Layout of ``out_dir``::

    metrics.json          everything in EvaluationResult.to_dict()
    predictions.csv       one row per test image
    figures/roc.png       ROC curves: overall and each defect type against the good images
    figures/score_histogram.png
    figures/overlays.png  original | heatmap overlay | predicted mask | ground truth
    report.html           figures embedded (base64), so the file can be sent on its own
    report.md             the same tables, figures linked relatively
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.evaluation.metrics import roc_curve_points
from defectscope.evaluation.result import EvaluationResult, jsonable
from defectscope.visualize import mask_to_png_array, overlay

CSV_COLUMNS = (
    "source",
    "defect_type",
    "label",
    "score",
    "normalized_score",
    "decision",
    "has_mask",
    "defect_area",
    "predicted_area",
    "iou",
)
FIGURES = "figures"


def write_report(result: EvaluationResult, out_dir: str | Path) -> Path:
    """Write every report file into ``out_dir`` (created if needed); returns report.html's path."""
    out = Path(out_dir)
    figures_dir = out / FIGURES
    figures_dir.mkdir(parents=True, exist_ok=True)

    payload = result.to_dict()
    (out / "metrics.json").write_text(
        json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    _write_csv(result, out / "predictions.csv")

    figures: list[tuple[str, str, Path]] = []  # (title, caption, path)
    roc = _roc_figure(result, figures_dir / "roc.png")
    if roc is not None:
        figures.append(("ROC curves", "Image-level ROC, overall and per defect type.", roc))
    figures.append(
        (
            "Score distribution",
            "Image scores of good and defective test images; dashed: the detector's stored "
            "threshold, dotted: the F1-optimal threshold on this test set.",
            _histogram_figure(result, figures_dir / "score_histogram.png"),
        )
    )
    grid = _overlay_figure(result, figures_dir / "overlays.png")
    if grid is not None:
        figures.append(
            (
                "Example images",
                "Original | anomaly heatmap (colour scale 0 to 2x threshold, ground truth "
                "outlined in green) | predicted mask | ground truth.",
                grid,
            )
        )

    sections = _sections(result)
    (out / "report.md").write_text(_markdown(result, sections, figures, out), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(_html(result, sections, figures, out), encoding="utf-8")
    return html_path


# --------------------------------------------------------------------------- tables


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else "n/a"
    return str(value)


Table = tuple[list[str], list[list[str]]]


def _sections(result: EvaluationResult) -> list[tuple[str, Table]]:
    m = result.metrics
    overall = [
        ["Image AUROC", _fmt(m["image_auroc"])],
        ["Pixel AUROC", _fmt(m["pixel_auroc"])],
        [f"AUPRO (FPR <= {result.fpr_limit:g})", _fmt(m["aupro"])],
        ["Best F1 (on this test set)", _fmt(m["f1_max"])],
        ["F1-optimal threshold", _fmt(m["f1_threshold"])],
        ["Mean IoU of predicted vs true defect masks", _fmt(m["mean_defect_iou"])],
    ]
    c = result.confusion
    stored = [
        ["Image threshold", _fmt(result.threshold)],
        ["Pixel threshold", _fmt(result.pixel_threshold)],
        ["Accuracy", _fmt(result.accuracy)],
        ["Precision", _fmt(result.precision)],
        ["Recall (defects caught)", _fmt(result.recall)],
        ["False-alarm rate (good flagged)", _fmt(result.false_alarm_rate)],
        [
            "Confusion (TP / FP / TN / FN)",
            f"{c.get('tp', 0)} / {c.get('fp', 0)} / {c.get('tn', 0)} / {c.get('fn', 0)}",
        ],
    ]
    per_defect = [
        [
            row.defect_type,
            str(row.count),
            str(row.with_mask),
            _fmt(row.mean_score),
            _fmt(row.flagged_rate),
            _fmt(row.image_auroc),
            _fmt(row.pixel_auroc),
            _fmt(row.aupro),
        ]
        for row in result.per_defect.values()
    ]
    timings = [[key, _fmt(value, 3)] for key, value in result.timings.items()]
    return [
        ("Overall metrics", (["Metric", "Value"], overall)),
        ("At the detector's stored threshold", (["Metric", "Value"], stored)),
        (
            "Per defect type (each against all good images)",
            (
                [
                    "Type",
                    "Images",
                    "With mask",
                    "Mean score",
                    "Flagged",
                    "Image AUROC",
                    "Pixel AUROC",
                    "AUPRO",
                ],
                per_defect,
            ),
        ),
        ("Mistakes at the stored threshold", _mistakes(result)),
        ("How the configuration was chosen", _selection(result)),
        ("Timings", (["Measure", "Value"], timings)),
        ("Model", (["Field", "Value"], _flatten(result.context.get("detector") or {}))),
        ("Dataset", (["Field", "Value"], _flatten(result.context.get("dataset") or {}))),
    ]


def _selection(result: EvaluationResult) -> Table:
    """Auto mode's candidates (synthetic or known defects against held-out good images), its
    choice, and the half-size bank where the model has one."""
    described = result.context.get("detector") or {}
    selection = described.get("selection") or {}
    header = ["Candidate", "Image AUROC", "Pixel AUROC", "Objective", "Chosen"]
    rows = [
        [
            f"{row['name']}: {row.get('description', '')}",
            _fmt(row.get("image_auroc")),
            _fmt(row.get("pixel_auroc")),
            _fmt(row.get("objective")),
            "yes" if row["name"] == selection.get("chosen") else "",
        ]
        for row in selection.get("candidates", [])
    ]
    notes = [selection.get("reason"), (selection.get("geometry") or {}).get("reason")]
    if isinstance(scales := described.get("scales"), dict):
        notes.append(
            f"plus a bank at half size ({scales.get('half_bank_size')} rows, grid "
            f"{scales.get('half_grid_size')}) at weight {scales.get('half_weight')}, in units"
        )
    rows += [[note, "", "", "", ""] for note in notes if note]
    return header, rows or [["(not recorded for this model)", "", "", "", ""]]


def _mistakes(result: EvaluationResult, limit: int = 10) -> Table:
    wrong = [r for r in result.records if r.is_anomalous != bool(r.label)]
    # The most confident mistakes first: furthest from the threshold.
    threshold = result.threshold if math.isfinite(result.threshold) else 0.0
    wrong.sort(key=lambda r: -abs(r.score - threshold))
    rows = [
        [_short_name(r.source), r.defect_type, r.decision, _fmt(r.score)] for r in wrong[:limit]
    ]
    if len(wrong) > limit:
        rows.append([f"... {len(wrong) - limit} more in predictions.csv", "", "", ""])
    return ["Image", "True type", "Decision", "Score"], rows


def _short_name(source: str) -> str:
    # The parent folder disambiguates MVTec's 000.png, 001.png ... across defect types.
    path = Path(source)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _flatten(data: Any, prefix: str = "") -> list[list[str]]:
    rows: list[list[str]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            rows.extend(_flatten(value, f"{prefix}{key}."))
        return rows
    name = prefix.rstrip(".")
    if isinstance(data, list) and not any(isinstance(v, (dict, list)) for v in data):
        return [[name, ", ".join(_fmt(v) for v in data)]]
    if isinstance(data, list):
        return [[name, json.dumps(jsonable(data))]]
    return [[name, _fmt(data)]]


def _write_csv(result: EvaluationResult, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for r in result.records:
            writer.writerow(
                [
                    r.source,
                    r.defect_type,
                    r.label,
                    _csv_float(r.score),
                    _csv_float(r.normalized_score),
                    r.decision,
                    int(r.has_mask),
                    _csv_float(r.defect_area),
                    _csv_float(r.predicted_area),
                    _csv_float(r.iou),
                ]
            )


def _csv_float(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else ""


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no GUI.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _roc_figure(result: EvaluationResult, path: Path) -> Path | None:
    labels = result.labels
    scores = result.scores
    if labels.size == 0 or labels.min() == labels.max():
        return None
    figure = _new_figure(5.5, 5.0)
    ax = figure.add_subplot()
    fpr, tpr, _ = roc_curve_points(labels, scores)
    ax.plot(fpr, tpr, color="black", lw=2.2, label=f"all (AUROC {_fmt(result.image_auroc, 3)})")
    good = labels == 0
    types = np.array([r.defect_type for r in result.records])
    for name, row in result.per_defect.items():
        members = (types == name) & (labels == 1)
        if row.defect_type == "good" or not members.any():
            continue
        subset = good | members
        fpr, tpr, _ = roc_curve_points(labels[subset], scores[subset])
        ax.plot(fpr, tpr, lw=1.2, label=f"{name} ({_fmt(row.image_auroc, 3)})")
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


def _histogram_figure(result: EvaluationResult, path: Path) -> Path:
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
    if math.isfinite(result.threshold):
        ax.axvline(
            result.threshold,
            color="black",
            ls="--",
            lw=1.5,
            label=f"stored threshold {_fmt(result.threshold, 3)}",
        )
    if math.isfinite(result.f1_threshold):
        ax.axvline(
            result.f1_threshold,
            color="tab:blue",
            ls=":",
            lw=1.8,
            label=f"F1-optimal {_fmt(result.f1_threshold, 3)}",
        )
    ax.set_xlabel("Image anomaly score")
    ax.set_ylabel("Images")
    ax.set_title("Scores of good vs defective test images")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _overlay_figure(result: EvaluationResult, path: Path) -> Path | None:
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
                    f"{_short_name(item.source)}\n{item.defect_type}  score {_fmt(item.score, 3)}"
                    f"\n{item.reason}",
                    fontsize=7,
                )
    figure.tight_layout()
    figure.savefig(path)
    return path


# --------------------------------------------------------------------------- documents


def _headline(result: EvaluationResult) -> str:
    records = result.records
    good = sum(r.label == 0 for r in records)
    masked = sum(r.label == 1 and r.has_mask for r in records)
    name = (result.context.get("dataset") or {}).get("name") or "test set"
    return (
        f"{len(records)} test images of {name}: {good} good, {len(records) - good} defective "
        f"({masked} with a ground-truth mask)."
    )


def _markdown(
    result: EvaluationResult,
    sections: list[tuple[str, Table]],
    figures: list[tuple[str, str, Path]],
    out: Path,
) -> str:
    lines = ["# defectscope evaluation report", "", _headline(result), ""]
    if result.notes:
        lines += ["**Notes**", ""] + [f"- {note}" for note in result.notes] + [""]
    for title, (header, rows) in sections:
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for row in rows:
            lines.append("| " + " | ".join(_md_cell(cell) for cell in row) + " |")
        lines.append("")
    lines += ["## Figures", ""]
    for title, caption, path in figures:
        lines += [
            f"### {title}",
            "",
            caption,
            "",
            f"![{title}]({path.relative_to(out).as_posix()})",
            "",
        ]
    lines += ["Files: `metrics.json` (all numbers), `predictions.csv` (one row per image).", ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.notes { background: #fff8e0; border: 1px solid #e8d48a; padding: 0.5em 1em; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
"""


def _html(
    result: EvaluationResult,
    sections: list[tuple[str, Table]],
    figures: list[tuple[str, str, Path]],
    out: Path,
) -> str:
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>defectscope evaluation report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>defectscope evaluation report</h1>",
        f"<p>{esc(_headline(result))}</p>",
    ]
    if result.notes:
        items = "".join(f"<li>{esc(note)}</li>" for note in result.notes)
        parts.append(f'<div class="notes"><strong>Notes</strong><ul>{items}</ul></div>')
    for title, (header, rows) in sections:
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(_html_cell(cell) for cell in row) + "</tr>" for row in rows)
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("<h2>Figures</h2>")
    for title, caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        relative = path.relative_to(out).as_posix()
        parts.append(
            f"<figure><h3>{esc(title)}</h3>"
            f'<img src="data:image/png;base64,{data}" alt="{esc(title)}" '
            f'data-file="{esc(relative)}">'
            f'<figcaption>{esc(caption)} (<a href="{esc(relative)}">{esc(relative)}</a>)'
            "</figcaption></figure>"
        )
    parts.append(
        '<p>Files: <a href="metrics.json">metrics.json</a> (all numbers), '
        '<a href="predictions.csv">predictions.csv</a> (one row per image).</p>'
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_cell(text: str) -> str:
    numeric = text.replace(".", "", 1).replace("-", "", 1).isdigit()
    return (
        f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"
    )
