"""The served model: its description, its thresholds (settable) and its evaluation report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from defectscope.detector.model_file import compact_metadata
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
    return described


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

    Other worker processes pick the new thresholds up from the file within about a second.
    """
    if update.image is None and update.pixel is None:
        raise HTTPException(422, "give at least one of 'image' and 'pixel'")
    with as_http_error():
        await run_in_threadpool(state.save_thresholds, update)
    return await model_info(state, state.ready_detector())


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
