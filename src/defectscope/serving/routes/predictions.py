"""The prediction log: filtered pages as JSON, one prediction with its pictures, or the whole
filtered log as CSV."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import HTTPException, Path
from fastapi.responses import Response, StreamingResponse

from defectscope.serving.dependencies import LogFilter, Repository, State
from defectscope.serving.predictions_log import PICTURE_KEY
from defectscope.serving.routes import v1_router
from defectscope.serving.schemas import PredictionDetail, PredictionLogPage, error_responses
from defectscope.serving.state import ServingState

router = v1_router()

PredictionId = Annotated[int, Path(ge=1, le=2**62)]


def with_pictures(state: ServingState, item: dict) -> dict:
    """The item as answered: ``has_pictures`` from the store, the picture key left out."""
    key = item.pop(PICTURE_KEY, None)
    item["has_pictures"] = state.pictures is not None and state.pictures.has(key)
    return item


def one_prediction(state: ServingState, repository: Repository, prediction_id: int) -> dict:
    record = repository.get(prediction_id)
    if record is None:
        raise HTTPException(404, f"no prediction {prediction_id} in the log")
    return record.to_item()


@router.get("/predictions", response_model=PredictionLogPage)
def list_predictions(query: LogFilter, repository: Repository, state: State) -> PredictionLogPage:
    """The prediction log, newest first, filtered and paged."""
    total, rows = repository.items(query)
    items = [with_pictures(state, row) for row in rows]
    return PredictionLogPage(total=total, limit=query.limit, offset=query.offset, items=items)


@router.get("/predictions.csv", response_class=StreamingResponse)
def export_predictions(query: LogFilter, repository: Repository) -> StreamingResponse:
    """The filtered prediction log as CSV, oldest first (limit and offset are ignored)."""
    return StreamingResponse(
        repository.iter_csv(query),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
    )


@router.get(
    "/predictions/{prediction_id}",
    response_model=PredictionDetail,
    responses=error_responses({404: "No such prediction."}),
)
def get_prediction(
    prediction_id: PredictionId, repository: Repository, state: State
) -> PredictionDetail:
    """One logged prediction, with the URLs of its stored pictures (null when not kept)."""
    item = one_prediction(state, repository, prediction_id)
    key = item.get(PICTURE_KEY)
    store = state.pictures
    for kind in ("thumbnail", "overlay", "image"):
        found = store is not None and store.path(key, kind) is not None
        item[f"{kind}_url"] = f"/v1/predictions/{prediction_id}/{kind}.png" if found else None
    return PredictionDetail(**with_pictures(state, item))


@router.get(
    "/predictions/{prediction_id}/{kind}.png",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}},
        **error_responses({404: "No such prediction, or its picture was not kept or pruned."}),
    },
)
def prediction_picture(
    prediction_id: PredictionId,
    kind: Literal["thumbnail", "overlay", "image"],
    repository: Repository,
    state: State,
) -> Response:
    """A stored picture of a prediction: thumbnail (256 px), overlay (1024 px) or the image."""
    item = one_prediction(state, repository, prediction_id)
    store = state.pictures
    file = store.path(item.get(PICTURE_KEY), kind) if store is not None else None
    try:
        if file is None:
            raise FileNotFoundError
        data = file.read_bytes()
    except OSError:  # never kept, or pruned (maybe this very moment)
        raise HTTPException(
            404, f"the {kind} of prediction {prediction_id} is not stored (off, or pruned)"
        ) from None
    return Response(data, media_type="image/png")
