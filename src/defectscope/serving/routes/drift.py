"""Drift verdicts: over the logged scores of recent predictions, or over uploaded images."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import File, HTTPException, Query, UploadFile
from fastapi.encoders import jsonable_encoder
from starlette.concurrency import run_in_threadpool

from defectscope.detector.detector import Detector
from defectscope.errors import DefectscopeError
from defectscope.monitoring.drift import VERDICTS, DriftDetector, DriftError, MissingReferenceError
from defectscope.serving.dependencies import ReadyDetector, Repository, Since, State, Until
from defectscope.serving.limits import RequestError, as_http_error
from defectscope.serving.predictions_log import LogQuery
from defectscope.serving.routes import v1_router
from defectscope.serving.schemas import UNPARSABLE_MULTIPART, error_responses
from defectscope.serving.scoring import decode, holding_pixels
from defectscope.serving.uploads import (
    check_image_count,
    check_request_pixels,
    pixels_within,
    read_upload,
)

router = v1_router()

MAX_DRIFT_WINDOW = 5000


def drift_monitor(detector: Detector) -> DriftDetector:
    """The model's drift reference; HTTP 409 when it has none."""
    try:
        return DriftDetector.from_detector(detector)
    except MissingReferenceError as exc:
        raise HTTPException(409, str(exc)) from None


@router.get(
    "/drift",
    responses=error_responses(
        {409: "The model has no drift reference.", 422: "Window too small or bad query value."}
    ),
)
def drift_check(
    state: State,
    detector: ReadyDetector,
    repository: Repository,
    since: Since = None,
    until: Until = None,
    limit: Annotated[
        int, Query(ge=2, le=MAX_DRIFT_WINDOW, description="Newest predictions tested.")
    ] = 500,
) -> dict[str, Any]:
    """Drift verdict over the window of recent predictions of this model in the log.

    Score tests only (KS, PSI, alarm rate): the log keeps scores, not embeddings, and pooling
    them in the request path would change every predict call for a check run now and then.
    Use ``defectscope drift MODEL --images`` for the feature test.
    """
    monitor = drift_monitor(detector)
    query = LogQuery(limit=limit, since=since, until=until)
    rows = repository.recent_scores(query, state.model_fingerprint or None)
    try:
        report = monitor.check_scores(np.array([score for _, score in rows]))
    except DriftError as exc:
        raise HTTPException(422, str(exc)) from None
    body = jsonable_encoder(report.to_dict())
    body.update(
        feature_test="not run: the prediction log holds scores only",
        model_fingerprint=state.model_fingerprint,
        window={
            "since": since,
            "until": until,
            "limit": limit,
            "first": rows[0][0].isoformat(),
            "last": rows[-1][0].isoformat(),
        },
    )
    state.metrics.observe_drift(report.test("score_ks").p_value, VERDICTS.index(report.verdict))
    return jsonable_encoder(body)


@router.post(
    "/drift/images",
    responses={
        **UNPARSABLE_MULTIPART,
        **error_responses(
            {
                409: "No drift reference, or no embeddings.",
                422: "Window too small or an unreadable image.",
            }
        ),
    },
)
async def drift_images(
    state: State,
    detector: ReadyDetector,
    files: Annotated[list[UploadFile], File(description="The window: images, 'files' repeated.")],
) -> dict[str, Any]:
    """Drift verdict over a window of uploaded images: score tests and the feature test (MMD).

    The images are embedded and scored in one pass, as ``defectscope drift MODEL --images`` does;
    they are not logged as predictions.
    """
    settings = state.settings
    with as_http_error():
        check_image_count(settings, len(files))
    monitor = drift_monitor(detector)
    uploads = []
    for upload in files:
        try:
            uploads.append(await read_upload(upload, settings.max_upload_bytes))
        except RequestError as exc:
            raise HTTPException(exc.status, f"{upload.filename}: {exc.detail}") from None
    sizes = [pixels_within(settings, data) for data in uploads]
    try:
        check_request_pixels(settings, sizes)
        async with holding_pixels(state, sum(sizes)):
            images = []
            for upload, data in zip(files, uploads, strict=True):
                try:
                    images.append(await decode(state, data))
                except RequestError as exc:
                    raise HTTPException(exc.status, f"{upload.filename}: {exc.detail}") from None
            report = await run_in_threadpool(monitor.check_images, detector, images)
    except RequestError as exc:
        raise HTTPException(exc.status, exc.detail) from None
    except DriftError as exc:
        raise HTTPException(422, str(exc)) from None
    except DefectscopeError as exc:  # an exported runtime has no embeddings
        raise HTTPException(409, f"the feature test needs the PyTorch model: {exc}") from None
    body = report.to_dict()
    body.update(model_fingerprint=state.model_fingerprint, window={"images": len(images)})
    return jsonable_encoder(body)
