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
from pathlib import Path
from typing import Any

from defectscope.detector.calibration import threshold_rule
from defectscope.evaluation.formatting import fmt as _fmt
from defectscope.evaluation.formatting import short_name as _short_name
from defectscope.evaluation.report_figures import histogram_figure, overlay_figure, roc_figure
from defectscope.evaluation.result import EvaluationResult, jsonable

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
    roc = roc_figure(result, figures_dir / "roc.png")
    if roc is not None:
        figures.append(("ROC curves", "Image-level ROC, overall and per defect type.", roc))
    figures.append(
        (
            "Score distribution",
            "Image scores of good and defective test images; dashed: the detector's stored "
            "threshold, dotted: the F1-optimal threshold on this test set.",
            histogram_figure(result, figures_dir / "score_histogram.png"),
        )
    )
    grid = overlay_figure(result, figures_dir / "overlays.png")
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
        ["Threshold set by", _threshold_rule(result)],
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


def _threshold_rule(result: EvaluationResult) -> str:
    """Where the stored threshold came from: the fit's rule on good images, or a person."""
    calibration = (result.context.get("detector") or {}).get("calibration") or {}
    return threshold_rule(calibration) if calibration else "(not recorded)"


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
    from defectscope.detector.edge_profile import edge_profile_summary

    half = scales.get("edge_profile") if isinstance(scales, dict) else None
    if edges := edge_profile_summary(described.get("edge_profile"), half):
        notes.append(f"edge profile (from good images): {edges}")
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
