"""Several models in one service: list them, score with one by name, its thresholds, reload.

The scoring routes run the very code of /v1/predict and /v1/predict/batch on the named model's
state; an unknown name is a 404 listing the names served.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import BackgroundTasks, Depends, File, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from defectscope.serving.dependencies import Flags
from defectscope.serving.limits import as_http_error
from defectscope.serving.model_pool import ModelPool
from defectscope.serving.routes import v1_router
from defectscope.serving.routes.model import check_threshold_update
from defectscope.serving.routes.predict import (
    SINGLE_BODY,
    NameForm,
    PartIdForm,
    TagsForm,
    batch_part_info,
    score_batch,
    score_single,
)
from defectscope.serving.schemas import (
    UNPARSABLE_MULTIPART,
    BatchResponse,
    PredictionResult,
    ThresholdUpdate,
    error_responses,
)
from defectscope.serving.state import ServingState

router = v1_router()

UNKNOWN = error_responses({404: "No model of that name (the answer lists the names)."})


async def get_pool(request: Request) -> ModelPool:
    return request.app.state.models


Pool = Annotated[ModelPool, Depends(get_pool)]


async def named_model(name: str, pool: Pool) -> ServingState:
    """The named model, loaded on first use (404 for an unknown name, 503 if it cannot load)."""
    state = await pool.ready(name)
    state.follow_model_file()  # thresholds another worker saved meanwhile
    pool.follow_stage(name)  # a promotion in the registry, when following is on
    return state


Named = Annotated[ServingState, Depends(named_model)]


@router.get("/models")
async def list_models(pool: Pool) -> dict[str, Any]:
    """The models served: name, loaded or not, backbone (and which loaded models share its one
    copy), version, fingerprint, thresholds and estimated memory; the memory budget."""
    return pool.summary()


@router.post(
    "/models/{name}/predict",
    response_model=PredictionResult,
    openapi_extra=SINGLE_BODY,
    responses=UNKNOWN,
)
async def predict_named(
    name: str, request: Request, background: BackgroundTasks, state: Named, flags: Flags
) -> PredictionResult:
    """Score one image with the named model (as /v1/predict)."""
    return await score_single(request, background, state, flags, "/v1/models/{name}/predict")


@router.post(
    "/models/{name}/predict/batch",
    response_model=BatchResponse,
    responses={**UNPARSABLE_MULTIPART, **UNKNOWN},
)
async def predict_batch_named(
    name: str,
    request: Request,
    background: BackgroundTasks,
    state: Named,
    flags: Flags,
    files: Annotated[list[UploadFile], File(description="Images, field 'files' repeated.")],
    part_id: PartIdForm = None,
    line: NameForm = None,
    station: NameForm = None,
    tags: TagsForm = None,
) -> BatchResponse:
    """Score several images with the named model (as /v1/predict/batch)."""
    part = batch_part_info(state, len(files), part_id, line, station, tags)
    route = "/v1/models/{name}/predict/batch"
    return await score_batch(request, background, state, flags, files, part, route)


def thresholds_of(name: str, state: ServingState) -> dict[str, Any]:
    detector = state.ready_detector()
    extras = state.model_extras
    return {
        "name": name,
        "served_version": state.served_version,
        "threshold": detector.threshold,
        "pixel_threshold": detector.pixel_threshold,
        "calibrated_threshold": extras.get("calibrated_threshold"),
        "threshold_audit": list(extras.get("threshold_audit") or []),
    }


@router.get("/models/{name}/thresholds", responses=UNKNOWN)
async def get_thresholds(name: str, state: Named) -> dict[str, Any]:
    """The named model's image and pixel thresholds, and their audit trail."""
    return thresholds_of(name, state)


@router.put(
    "/models/{name}/thresholds",
    responses=error_responses(
        {404: "No model of that name.", 409: "The thresholds cannot be saved."}
    ),
)
async def put_thresholds(name: str, state: Named, update: ThresholdUpdate) -> dict[str, Any]:
    """Set the named model's thresholds and save them to its model file (as
    PUT /v1/model/thresholds)."""
    check_threshold_update(update)
    with as_http_error():
        await run_in_threadpool(state.save_thresholds, update)
    return thresholds_of(name, state)


@router.post(
    "/models/{name}/reload",
    responses=error_responses({404: "No model of that name.", 409: "The model did not load."}),
)
async def reload_named(name: str, pool: Pool) -> dict[str, Any]:
    """Load the named model again (a registry reference: the version it names now, e.g. after
    a promotion) and swap it in without dropping a request; the old one serves meanwhile."""
    await pool.reload(name)
    return pool.describe(name)
