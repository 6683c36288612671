"""Scoring: one image (multipart or JSON base64) or a batch of uploads."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import BackgroundTasks, File, Form, Request, UploadFile

from defectscope.serving.dependencies import Flags, ReadyDetector, State, request_id
from defectscope.serving.limits import RequestError, as_http_error
from defectscope.serving.pictures import RenderFlags
from defectscope.serving.request_meta import (
    MAX_NAME,
    MAX_PART_ID,
    PartInfo,
    parse_part_info,
    single_part_info,
)
from defectscope.serving.routes import v1_router
from defectscope.serving.schemas import (
    UNPARSABLE_MULTIPART,
    Base64Image,
    BatchItem,
    BatchResponse,
    ItemError,
    PredictionResult,
)
from defectscope.serving.scoring import (
    Scored,
    holding_pixels,
    log_scored,
    save_pictures,
    score_bytes,
)
from defectscope.serving.state import ServingState
from defectscope.serving.uploads import (
    check_image_count,
    check_request_pixels,
    pixels_within,
    read_single_image,
    read_upload,
)

router = v1_router()

# The part fields of a batch's multipart form (applied to every file), for both batch routes.
PartIdForm = Annotated[str | None, Form(description="Default: each file's name.")]
NameForm = Annotated[str | None, Form()]
TagsForm = Annotated[str | None, Form(description="Comma-separated, at most 16.")]

# /v1/predict reads its body itself (multipart or JSON): the schema documents both.
SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "part_id": {"type": "string", "maxLength": MAX_PART_ID},
                        "line": {"type": "string", "maxLength": MAX_NAME},
                        "station": {"type": "string", "maxLength": MAX_NAME},
                        "tags": {"type": "string", "description": "Comma-separated, <= 16."},
                    },
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
    """Score one image: multipart field ``file``, or JSON ``{"image_base64": ...}``.

    Optional fields (form fields, or in the JSON body): ``part_id`` (default: the file name),
    ``line``, ``station``, ``tags`` (comma-separated). They are kept in the prediction log with
    the prediction, whose id the answer gives (``prediction_id``).
    """
    return await score_single(request, background, state, flags, "/v1/predict")


async def score_single(
    request: Request,
    background: BackgroundTasks,
    state: ServingState,
    flags: RenderFlags,
    route: str,
) -> PredictionResult:
    """The body of a single-image predict route, for the model of ``state``."""
    started = time.perf_counter()
    with as_http_error():
        data = await read_single_image(request, state.settings.max_upload_bytes)
        part = await single_part_info(request)
        async with holding_pixels(state, pixels_within(state.settings, data)):
            result, scored = await score_bytes(
                state, data, flags, started, route, request_id(request), part
            )
    await log_scored(state, [result], [scored])
    background.add_task(save_pictures, state, [scored])
    return result


@router.post("/predict/batch", response_model=BatchResponse, responses=UNPARSABLE_MULTIPART)
async def predict_batch(
    request: Request,
    background: BackgroundTasks,
    state: State,
    flags: Flags,
    _: ReadyDetector,
    files: Annotated[list[UploadFile], File(description="Images, field 'files' repeated.")],
    part_id: PartIdForm = None,
    line: NameForm = None,
    station: NameForm = None,
    tags: TagsForm = None,
) -> BatchResponse:
    """Score several images; an unreadable one gets an error entry, the others still succeed.

    ``part_id``, ``line``, ``station`` and ``tags`` apply to every file.
    """
    part = batch_part_info(state, len(files), part_id, line, station, tags)
    return await score_batch(request, background, state, flags, files, part, "/v1/predict/batch")


def batch_part_info(
    state: ServingState,
    n_files: int,
    part_id: str | None,
    line: str | None,
    station: str | None,
    tags: str | None,
) -> PartInfo:
    """A batch's checks before any file is read: the image count, then the part fields."""
    with as_http_error():
        check_image_count(state.settings, n_files)
        return parse_part_info({"part_id": part_id, "line": line, "station": station, "tags": tags})


async def score_batch(
    request: Request,
    background: BackgroundTasks,
    state: ServingState,
    flags: RenderFlags,
    files: list[UploadFile],
    part: PartInfo,
    route: str,
) -> BatchResponse:
    """The body of a batch predict route, for the model of ``state`` (count checked)."""
    started = time.perf_counter()
    served = state.served()  # every image of the request is scored by this one version
    settings = state.settings
    rid = request_id(request)
    uploads: list[bytes | RequestError] = []
    for upload in files:
        try:
            uploads.append(await read_upload(upload, settings.max_upload_bytes))
        except RequestError as exc:
            uploads.append(exc)
    sizes = [pixels_within(settings, data) for data in uploads if isinstance(data, bytes)]

    async def one(index: int, upload: UploadFile) -> tuple[BatchItem, Scored | None]:
        try:
            data = uploads[index]
            if isinstance(data, RequestError):
                raise data
            result, record = await score_bytes(
                state,
                data,
                flags,
                started,
                route,
                rid,
                part.with_default_id(upload.filename),
                served,
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
    done = [(item.result, scored) for item, scored in outcomes if item.result and scored]
    await log_scored(state, [r for r, _ in done], [s for _, s in done])
    background.add_task(save_pictures, state, [s for _, s in done])
    n_ok = sum(item.error is None for item in items)
    return BatchResponse(items=items, n_ok=n_ok, n_failed=len(items) - n_ok)
