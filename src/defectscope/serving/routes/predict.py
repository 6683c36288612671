"""Scoring: one image (multipart or JSON base64) or a batch of uploads."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import BackgroundTasks, File, Request, UploadFile

from defectscope.serving.dependencies import Flags, ReadyDetector, State, request_id
from defectscope.serving.limits import RequestError, as_http_error
from defectscope.serving.routes import v1_router
from defectscope.serving.schemas import (
    UNPARSABLE_MULTIPART,
    Base64Image,
    BatchItem,
    BatchResponse,
    ItemError,
    PredictionResult,
)
from defectscope.serving.scoring import holding_pixels, score_bytes
from defectscope.serving.uploads import (
    check_image_count,
    check_request_pixels,
    pixels_within,
    read_single_image,
    read_upload,
)

router = v1_router()

# /v1/predict reads its body itself (multipart or JSON): the schema documents both.
SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/json": {"schema": Base64Image.model_json_schema()},
        },
    }
}


@router.post("/predict", response_model=PredictionResult, openapi_extra=SINGLE_BODY)
async def predict(
    request: Request, background: BackgroundTasks, state: State, flags: Flags, _: ReadyDetector
) -> PredictionResult:
    """Score one image: multipart field ``file``, or JSON ``{"image_base64": ...}``."""
    started = time.perf_counter()
    with as_http_error():
        data = await read_single_image(request, state.settings.max_upload_bytes)
        async with holding_pixels(state, pixels_within(state.settings, data)):
            result, record = await score_bytes(
                state, data, flags, started, "/v1/predict", request_id(request)
            )
    background.add_task(state.record, [record])
    return result


@router.post("/predict/batch", response_model=BatchResponse, responses=UNPARSABLE_MULTIPART)
async def predict_batch(
    request: Request,
    background: BackgroundTasks,
    state: State,
    flags: Flags,
    _: ReadyDetector,
    files: Annotated[list[UploadFile], File(description="Images, field 'files' repeated.")],
) -> BatchResponse:
    """Score several images; an unreadable one gets an error entry, the others still succeed."""
    started = time.perf_counter()
    settings = state.settings
    with as_http_error():
        check_image_count(settings, len(files))
    rid = request_id(request)
    uploads: list[bytes | RequestError] = []
    for upload in files:
        try:
            uploads.append(await read_upload(upload, settings.max_upload_bytes))
        except RequestError as exc:
            uploads.append(exc)
    sizes = [pixels_within(settings, data) for data in uploads if isinstance(data, bytes)]

    async def one(index: int, upload: UploadFile) -> tuple[BatchItem, dict | None]:
        try:
            data = uploads[index]
            if isinstance(data, RequestError):
                raise data
            result, record = await score_bytes(
                state, data, flags, started, "/v1/predict/batch", rid
            )
        except RequestError as exc:
            error = ItemError(status=exc.status, detail=exc.detail)
            return BatchItem(index=index, filename=upload.filename, error=error), None
        return BatchItem(index=index, filename=upload.filename, result=result), record

    with as_http_error():
        check_request_pixels(settings, sizes)
        async with holding_pixels(state, sum(sizes)):
            # All items are queued at once, so the micro-batcher can put them in one model call.
            outcomes = await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))
    items = [item for item, _ in outcomes]
    background.add_task(state.record, [record for _, record in outcomes if record])
    n_ok = sum(item.error is None for item in items)
    return BatchResponse(items=items, n_ok=n_ok, n_failed=len(items) - n_ok)
