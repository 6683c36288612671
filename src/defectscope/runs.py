"""One experiment run (fit, save, evaluate, report) and the summary of a sweep."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from defectscope.experiment import Experiment
from defectscope.tracking import NullRun, log_evaluation, log_fit

SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")


def run_experiment(
    experiment: Experiment,
    run_dir: Path,
    progress: Callable[[str, int, int], None] | None = None,
    tracking: NullRun | None = None,
) -> dict[str, Any]:
    """Fit on the train split, evaluate on the test split; write model, report and config.

    ``tracking`` (a run of `defectscope.tracking`) records the config, fit and evaluation.
    """
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.errors import DefectscopeError
    from defectscope.evaluation.report import write_report
    from defectscope.evaluation.runner import evaluate

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({**experiment.raw, "overrides": experiment.overrides}, sort_keys=False)
    )
    if not experiment.data:
        raise DefectscopeError("no dataset: set data=PATH or use an experiment=... config")
    dataset = open_dataset(experiment.data)
    if not dataset.test:
        raise DefectscopeError(f"{experiment.data}: no labelled test images to evaluate on")
    detector = Detector(experiment.detector)
    detector.fit([s.path for s in dataset.train], progress=progress)
    detector.save(run_dir / "model")
    tracking = tracking or NullRun()
    overrides = " ".join(experiment.overrides) or "(defaults)"
    tracking.set_tags({"defectscope.dataset": experiment.data, "defectscope.overrides": overrides})
    log_fit(tracking, detector, run_dir / "model", config=experiment.raw)
    tracking.log_artifacts(run_dir / "config.yaml")
    result = evaluate(
        detector,
        dataset,
        progress=(lambda d, t: progress("evaluate", d, t)) if progress else None,
    )
    write_report(result, run_dir / "report")
    summary = result.to_dict()
    log_evaluation(tracking, summary, run_dir / "report")
    summary["overrides"] = experiment.overrides
    summary["fit_timings"] = detector.info["timings"]
    summary["run_dir"] = str(run_dir)
    return summary


def write_sweep_summary(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """A CSV and a Markdown table of every run's overrides, metrics and fit time."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for result in results:
        row = {"overrides": " ".join(result["overrides"]) or "(defaults)"}
        row.update({k: result["metrics"].get(k) for k in SUMMARY_METRICS})
        row["fit_s"] = result["fit_timings"]["total_s"]
        row["run_dir"] = result["run_dir"]
        rows.append(row)
    with (out_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for row in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    return out_dir / "summary.md"
