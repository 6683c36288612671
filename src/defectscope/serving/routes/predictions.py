"""The prediction log: filtered pages as JSON, or the whole filtered log as CSV."""

from __future__ import annotations

from fastapi.responses import StreamingResponse

from defectscope.serving.dependencies import LogFilter, Repository
from defectscope.serving.routes import v1_router
from defectscope.serving.schemas import PredictionLogPage

router = v1_router()


@router.get("/predictions", response_model=PredictionLogPage)
def list_predictions(query: LogFilter, repository: Repository) -> PredictionLogPage:
    """The prediction log, newest first, filtered and paged."""
    total, rows = repository.query(query)
    return PredictionLogPage(total=total, limit=query.limit, offset=query.offset, items=rows)


@router.get("/predictions.csv", response_class=StreamingResponse)
def export_predictions(query: LogFilter, repository: Repository) -> StreamingResponse:
    """The filtered prediction log as CSV, oldest first (limit and offset are ignored)."""
    return StreamingResponse(
        repository.iter_csv(query),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
    )
