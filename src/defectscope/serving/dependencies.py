"""What routes receive through ``Depends``: the state, settings, detector, log and query values.

Going through dependencies (never module globals) lets tests and other deployments swap them.
They are coroutines because they never block: FastAPI runs a plain ``def`` dependency in the
thread pool, a thread hop per dependency on every request.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, HTTPException, Query, Request

from defectscope.detector.detector import Detector
from defectscope.serving.pictures import RenderFlags
from defectscope.serving.predictions_log import LogQuery, PredictionLogRepository
from defectscope.serving.schemas import UtcMoment
from defectscope.serving.settings import ServingSettings
from defectscope.serving.state import ServingState


async def get_state(request: Request) -> ServingState:
    return request.app.state.serving


async def get_settings(state: Annotated[ServingState, Depends(get_state)]) -> ServingSettings:
    return state.settings


async def get_detector(state: Annotated[ServingState, Depends(get_state)]) -> Detector:
    detector = state.ready_detector()  # HTTP 503 until the model is loaded
    state.follow_model_file()  # may update this detector's thresholds
    return detector


async def get_log_repository(
    state: Annotated[ServingState, Depends(get_state)],
) -> PredictionLogRepository:
    if state.repository is None:
        raise HTTPException(404, "the prediction log is disabled on this server")
    return state.repository


async def render_flags(
    threshold: Annotated[
        float | None, Query(description="Override the image threshold.", allow_inf_nan=False)
    ] = None,
    heatmap: Annotated[bool, Query(description="Include a base64 heatmap PNG.")] = False,
    overlay: Annotated[bool, Query(description="Include a base64 overlay PNG.")] = False,
    mask: Annotated[bool, Query(description="Include a base64 mask PNG.")] = False,
) -> RenderFlags:
    return RenderFlags(threshold, heatmap, overlay, mask)


Since = Annotated[UtcMoment | None, Query(description="ISO 8601; naive means UTC.")]
Until = Annotated[UtcMoment | None, Query(description="ISO 8601, exclusive.")]


Text64 = Annotated[str | None, Query(min_length=1, max_length=64)]


async def log_query(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,  # SQL BIGINT range
    since: Since = None,
    until: Until = None,
    is_anomalous: bool | None = None,
    decision: Annotated[
        Literal["anomalous", "normal"] | None, Query(description="Same as is_anomalous.")
    ] = None,
    tag: Annotated[str | None, Query(min_length=1, max_length=64, pattern=r"^[^,]+$")] = None,
    station: Text64 = None,
    line: Text64 = None,
    part_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    model_version: Text64 = None,
    model_name: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
    reviewed: bool | None = None,
    verdict: Annotated[Literal["correct", "false_alarm", "missed_defect"] | None, Query()] = None,
) -> LogQuery:
    if decision is not None:
        wanted = decision == "anomalous"
        if is_anomalous is not None and is_anomalous != wanted:
            raise HTTPException(422, "decision and is_anomalous disagree")
        is_anomalous = wanted
    return LogQuery(
        limit,
        offset,
        since,
        until,
        is_anomalous,
        tag=tag,
        station=station,
        line=line,
        part_id=part_id,
        reviewed=reviewed,
        verdict=verdict,
        model_version=model_version,
        model_name=model_name,
    )


State = Annotated[ServingState, Depends(get_state)]
Flags = Annotated[RenderFlags, Depends(render_flags)]
ReadyDetector = Annotated[Detector, Depends(get_detector)]
Repository = Annotated[PredictionLogRepository, Depends(get_log_repository)]
LogFilter = Annotated[LogQuery, Depends(log_query)]


def request_id(request: Request) -> str:
    """The request's id (``X-Request-ID``), set by the app's ``observe`` middleware."""
    return getattr(request.state, "request_id", "")
