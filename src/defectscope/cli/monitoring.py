"""Monitoring commands: drift (recent images or logged scores) and drift-study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from defectscope.cli.console import console, out, progress_bars
from defectscope.cli.options import DeviceOpt, LabelledDataArg, ModelArg

if TYPE_CHECKING:
    from datetime import datetime

    import numpy as np


def drift(
    model: ModelArg,
    images: Annotated[
        list[Path] | None,
        typer.Option("--images", "-i", help="Images or folders of recent inputs (all tests)."),
    ] = None,
    log: Annotated[
        str | None,
        typer.Option(
            help="Prediction log URL of `defectscope serve` (e.g. sqlite:///predictions.db): "
            "tests the logged scores of this model (score tests only)."
        ),
    ] = None,
    since: Annotated[str | None, typer.Option(help="With --log: ISO 8601 start (UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="With --log: ISO 8601 end (UTC).")] = None,
    limit: Annotated[int, typer.Option(help="With --log: newest predictions tested.")] = 500,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full drift report here.")
    ] = None,
    min_window: Annotated[int, typer.Option(help="Fewest images a window may have.")] = 10,
    fail_on: Annotated[
        str,
        typer.Option(help="Exit with status 1 on this verdict or worse: never, warning, drift."),
    ] = "never",
    device: DeviceOpt = None,
) -> None:
    """Test whether recent images drifted from the model's training images."""
    from defectscope.data.io import expand_image_paths
    from defectscope.errors import DefectscopeError
    from defectscope.monitoring.drift import VERDICTS, DriftDetector, DriftThresholds

    if fail_on not in ("never", *VERDICTS[1:]):
        raise DefectscopeError("--fail-on must be 'never', 'warning' or 'drift'")
    if (images is None) == (log is None):
        raise DefectscopeError("give either --images or --log")
    bounds = time_bounds(since, until)
    # Imported after the checks: a mistake is answered before torch loads (seconds).
    from defectscope.detector.detector import Detector

    detector = Detector.load(model, device=device)
    monitor = DriftDetector.from_detector(detector, DriftThresholds(min_window=min_window))
    if log is not None:
        scores = logged_scores(model, log, bounds, limit)
        report = monitor.check_scores(scores)
        title = f"Drift check: {len(scores)} logged predictions"
    else:
        assert images is not None  # exactly one of --images / --log, checked above
        paths = expand_image_paths(images)
        if not paths:
            raise DefectscopeError("no images found in " + ", ".join(str(i) for i in images))
        with progress_bars() as progress:
            report = monitor.check_images(detector, paths, progress=progress)
        title = f"Drift check: {len(paths)} images"
    table = Table(title=title)
    for column in ("test", "statistic", "p-value", "adjusted p", "verdict"):
        table.add_column(column, justify="left" if column == "test" else "right")
    for test in report.tests:
        table.add_row(
            test.name,
            f"{test.statistic:.4g}",
            "-" if test.p_value is None else f"{test.p_value:.3g}",
            "-" if test.adjusted_p is None else f"{test.adjusted_p:.3g}",
            test.verdict or "(info)",
        )
    out.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    colour = {"ok": "green", "warning": "yellow", "drift": "red"}[report.verdict]
    out.print(f"verdict: [bold {colour}]{report.verdict}[/]")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        out.print(f"Report: {json_out}")
    if fail_on != "never" and VERDICTS.index(report.verdict) >= VERDICTS.index(fail_on):
        raise typer.Exit(1)


def time_bounds(since: str | None, until: str | None) -> list[datetime | None]:
    """--since and --until as times (None where not given); a one-line error otherwise."""
    from datetime import datetime

    from defectscope.errors import DefectscopeError

    try:
        return [datetime.fromisoformat(v) if v else None for v in (since, until)]
    except ValueError as exc:
        raise DefectscopeError(f"--since/--until must be ISO 8601 times: {exc}") from None


def logged_scores(model: Path, url: str, bounds: list[datetime | None], limit: int) -> np.ndarray:
    """Scores this model logged while serving (rows of other models are not comparable);
    ``bounds`` from `time_bounds`."""
    import numpy as np

    from defectscope.errors import DefectscopeError

    try:
        from defectscope.serving.predictions_log import LogQuery, PredictionLogRepository
        from defectscope.serving.thresholds import file_fingerprint
    except ImportError:
        raise DefectscopeError(
            "--log needs the serve extra: pip install 'defectscope[serve]'"
        ) from None
    try:
        repository = PredictionLogRepository(url)
        rows = repository.recent_scores(
            LogQuery(limit=limit, since=bounds[0], until=bounds[1]), file_fingerprint(model)
        )
    except DefectscopeError:
        raise
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or database
        raise DefectscopeError(f"cannot read the prediction log {url}: {exc}") from None
    return np.array([score for _, score in rows])


def drift_study(
    model: ModelArg,
    data: LabelledDataArg,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the study.")] = Path(
        "drift_study"
    ),
    shifts: Annotated[
        list[str] | None,
        typer.Option(
            "--shift",
            help="Shift to study (repeatable): brightness, contrast, color, blur, rotate, "
            "noise, shift. Default: all.",
        ),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(help="Subsample the test split (stratified by label).")
    ] = None,
    refit: Annotated[
        bool, typer.Option(help="Refit on shifted train images at each shift's strongest level.")
    ] = True,
    max_train: Annotated[int, typer.Option(help="Training images per refit.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (subsampling, permutations).")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Score the test split under controlled shifts; AUROC, false alarms and drift verdicts."""
    from defectscope import storage
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.monitoring.study import run_drift_study

    storage.check_output_folder(out_dir, "--out")
    detector = Detector.load(model, device=device)
    dataset = open_dataset(data)
    with progress_bars() as progress:
        result = run_drift_study(
            detector,
            dataset,
            out_dir,
            shifts=shifts,
            max_images=max_images,
            refit=refit,
            max_train=max_train,
            seed=seed,
            progress=progress,
        )
    table = Table(title=f"Drift study ({result['seconds']:.0f} s)")
    for column in ("shift", "strength", "AUROC", "false alarms", "verdict", "refit AUROC"):
        table.add_column(column)
    for row in result["rows"]:
        verdict = (row.get("drift_all") or {}).get("verdict", "-")
        refit_auroc = row.get("refit_image_auroc")
        table.add_row(
            row["shift"],
            row["label"],
            "-" if row["image_auroc"] is None else f"{row['image_auroc']:.3f}",
            "-" if row["false_alarm_rate"] is None else f"{row['false_alarm_rate']:.2f}",
            verdict,
            "" if refit_auroc is None else f"{refit_auroc:.3f}",
        )
    out.print(table)
    out.print(f"Study: {out_dir / 'study.md'}  {out_dir / 'study.html'}  {out_dir / 'study.png'}")
