"""The served model: its description, its thresholds (settable) and its evaluation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import HTTPException, Query
from starlette.concurrency import run_in_threadpool

from defectscope.detector.calibration import estimated_false_alarm_rate, false_alarm_rate
from defectscope.detector.model_file import compact_metadata
from defectscope.detector.teaching import calibrated_thresholds
from defectscope.serving.dependencies import ReadyDetector, State
from defectscope.serving.limits import as_http_error
from defectscope.serving.routes import v1_router
from defectscope.serving.schemas import ThresholdUpdate, error_responses
from defectscope.serving.settings import ServingSettings

router = v1_router()


@router.get("/model")
async def model_info(state: State, detector: ReadyDetector) -> dict[str, Any]:
    """The model's description (``Detector.describe``) without per-image calibration lists."""
    # Calibration keeps every good image's score; useful in the model file, noise in an answer.
    described = compact_metadata(detector.describe())
    described["model_fingerprint"] = state.model_fingerprint
    described["served_version"] = state.served_version
    extras = state.model_extras
    described["threshold_audit"] = list(extras.get("threshold_audit") or [])
    described["calibrated_threshold"] = extras.get("calibrated_threshold")
    described["lineage"] = extras.get("lineage")
    if described["calibrated_threshold"] is None and detector.calibration is not None:
        described["calibrated_threshold"] = calibrated_thresholds(detector.calibration)[0]
    return described


@router.get("/model/calibration")
async def calibration(
    state: State,
    detector: ReadyDetector,
    threshold: Annotated[
        float | None,
        Query(allow_inf_nan=False, description="A candidate image threshold (default: current)."),
    ] = None,
) -> dict[str, Any]:
    """The good training images' calibration scores, and what a threshold would do to them:
    the expected false-alarm rate (share of good scores at or above it, as predict decides),
    the rate the fit's rule estimates for new good images at it (through its tail spread) and
    whether it is below the lowest good score."""
    calibration = detector.calibration
    if calibration is None or not calibration.good_scores:
        raise HTTPException(409, "this model keeps no calibration scores of good images")
    value = detector.threshold if threshold is None else threshold
    scores = [float(s) for s in calibration.good_scores]
    calibrated = state.model_extras.get("calibrated_threshold")
    return {
        "good_scores": sorted(scores),
        "lowest_good_score": min(scores),
        "calibrated_threshold": (
            calibrated if calibrated is not None else calibrated_thresholds(calibration)[0]
        ),
        "current_threshold": detector.threshold,
        "threshold": value,
        "expected_false_alarm_rate": false_alarm_rate(scores, value),
        "estimated_false_alarm_rate": estimated_false_alarm_rate(calibration, value),
        "below_lowest_good": value < min(scores),
        "fit_false_alarm_rate": calibration.false_alarm_rate,
    }


@router.put(
    "/model/thresholds",
    responses=error_responses(
        {400: "The body is not valid JSON.", 409: "The thresholds cannot be saved."}
    ),
)
async def update_thresholds(
    state: State, _: ReadyDetector, update: ThresholdUpdate
) -> dict[str, Any]:
    """Set the stored thresholds and save them to the served model file (atomic replace).

    ``{"reset": true}`` restores the calibrated thresholds. Each change is appended to the
    model's ``threshold_audit`` (who: ``reviewer``, else 'anonymous'; ``reason``). Other
    worker processes pick the new thresholds up from the file within about a second.
    """
    check_threshold_update(update)
    with as_http_error():
        await run_in_threadpool(state.save_thresholds, update)
    return await model_info(state, state.ready_detector())


def check_threshold_update(update: ThresholdUpdate) -> None:
    """422 for an update that asks for nothing, or for a reset and values at once."""
    if update.reset and (update.image is not None or update.pixel is not None):
        raise HTTPException(422, "give either 'reset' or thresholds, not both")
    if update.image is None and update.pixel is None and not update.reset:
        raise HTTPException(422, "give at least one of 'image' and 'pixel' (or 'reset': true)")


def report_folder(settings: ServingSettings) -> Path | None:
    """``--report DIR``, else ``report/`` beside the model file, if it holds metrics.json."""
    folder = settings.report_dir
    if folder is None and settings.model_path is not None:
        model = Path(settings.model_path)
        folder = (model if model.is_dir() else model.parent) / "report"
    if folder is None or not (folder / "metrics.json").is_file():
        return None
    return folder


@router.get("/model/report", responses=error_responses({404: "No evaluation report."}))
def model_report(state: State) -> dict[str, Any]:
    """The model's evaluation report (``defectscope evaluate --report``'s metrics.json)."""
    folder = report_folder(state.settings)
    if folder is None:
        raise HTTPException(
            404,
            "no evaluation report for this model: write one with `defectscope evaluate MODEL "
            "DATA --report MODEL/report`, or start the server with --report DIR",
        )
    try:
        report = json.loads((folder / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = f"the evaluation report in {folder} is unreadable: {exc}"
        raise HTTPException(404, detail) from None
    return {"source": str(folder), "report": report}
