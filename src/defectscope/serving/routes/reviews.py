"""Reviewing logged predictions: verdicts, the review queues, and exports (CSV, and a ZIP of
images and labels that ``defectscope evaluate`` reads as a dataset)."""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
from typing import Annotated, Any, Literal

from fastapi import BackgroundTasks, HTTPException, Query
from fastapi.responses import FileResponse, StreamingResponse

from defectscope.serving.dependencies import LogFilter, Repository, Since, State, Until
from defectscope.serving.predictions_log import LogQuery, PredictionRecord, as_utc
from defectscope.serving.reviews_log import audit_sample, count_reviewed, iter_reviewed, set_review
from defectscope.serving.routes import v1_router
from defectscope.serving.routes.predictions import PredictionId, with_pictures
from defectscope.serving.schemas import (
    PredictionLogEntry,
    ReviewQueue,
    ReviewRequest,
    error_responses,
)
from defectscope.serving.state import ServingState

router = v1_router()

LABEL_COLUMNS = [
    "id",
    "label",
    "verdict",
    "image",
    "overlay",
    "part_id",
    "line",
    "station",
    "tags",
    "score",
    "threshold",
    "is_anomalous",
    "model_version",
    "reviewer",
    "reviewed_at",
    "note",
    "created_at",
]


def label_of(verdict: str, is_anomalous: bool) -> str:
    """What the part really is: a false alarm is good, a missed defect or a confirmed flag is
    a defect, a confirmed pass is good."""
    if verdict == "false_alarm":
        return "good"
    if verdict == "missed_defect":
        return "defect"
    return "defect" if is_anomalous else "good"


def actor(given: str | None) -> str:
    """Who acts: the request's reviewer (the API key carries no name), else 'anonymous'."""
    return given.strip() if given and given.strip() else "anonymous"


@router.post(
    "/predictions/{prediction_id}/review",
    response_model=PredictionLogEntry,
    responses=error_responses({404: "No such prediction.", 422: "Bad verdict or note."}),
)
def review_prediction(
    prediction_id: PredictionId, body: ReviewRequest, repository: Repository, state: State
) -> PredictionLogEntry:
    """Store a verdict on one prediction; reviewing it again replaces the earlier review
    (the log keeps the latest only). Answers the prediction with its review."""
    item = set_review(repository, prediction_id, body.verdict, body.note, actor(body.reviewer))
    if item is None:
        raise HTTPException(404, f"no prediction {prediction_id} in the log")
    return PredictionLogEntry(**with_pictures(state, item))


@router.get("/reviews/queue", response_model=ReviewQueue)
def review_queue(
    repository: Repository,
    state: State,
    scope: Annotated[Literal["flagged", "audit"], Query()] = "flagged",
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    seed: Annotated[int, Query(ge=0, le=2**31)] = 0,
) -> ReviewQueue:
    """What to review next: ``flagged`` (anomalous, unreviewed, oldest first) or ``audit`` (a
    seeded random sample of passed, unreviewed predictions, to catch missed defects)."""
    query = LogQuery(limit=limit, since=since, until=until)
    if scope == "audit":
        total, rows = audit_sample(repository, query, seed)
    else:
        query.is_anomalous, query.reviewed, query.oldest_first = True, False, True
        total, rows = repository.items(query)
    return ReviewQueue(total=total, items=[with_pictures(state, row) for row in rows])


@router.get("/reviews.csv", response_class=StreamingResponse)
def export_reviews(query: LogFilter, repository: Repository) -> StreamingResponse:
    """Reviewed predictions (the list's filters apply) as CSV, oldest first."""
    query.reviewed = True
    return StreamingResponse(
        repository.iter_csv(query),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="reviews.csv"'},
    )


def label_row(record: PredictionRecord, label: str, image: str, overlay: str) -> dict[str, Any]:
    row = record.to_dict()
    return {
        "id": record.id,
        "label": label,
        "verdict": record.review_verdict,
        "image": image,
        "overlay": overlay,
        **{k: row[k] for k in ("part_id", "line", "station", "tags", "score", "threshold")},
        "is_anomalous": record.is_anomalous,
        "model_version": record.model_version,
        "reviewer": record.reviewer,
        "reviewed_at": row["reviewed_at"],
        "note": record.review_note,
        "created_at": as_utc(record.created_at).isoformat(),
    }


def write_zip(state: ServingState, repository: Repository, query: LogQuery, target: str) -> None:
    """The reviewed predictions as a dataset: ``test/good``, ``test/defect`` (what
    ``defectscope evaluate`` reads; the good ones also in ``train/good``, which the dataset
    loader requires), ``overlays/`` and ``labels.csv``."""
    labels = io.StringIO()
    writer = csv.DictWriter(labels, fieldnames=LABEL_COLUMNS)
    writer.writeheader()
    store = state.pictures
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:  # PNGs: compressed already
        for folder in ("train/good/", "test/good/", "test/defect/"):
            archive.writestr(folder, b"")
        for record in iter_reviewed(repository, query):
            label = label_of(record.review_verdict or "", record.is_anomalous)
            image = overlay = ""
            if store is not None and (file := store.path(record.picture_key, "image")):
                image = f"test/{label}/{record.id}.png"
                archive.write(file, image)
                if label == "good":  # the loader wants a train split: the good ones, again
                    archive.write(file, f"train/good/{record.id}.png")
            if store is not None and (file := store.path(record.picture_key, "overlay")):
                overlay = f"overlays/{record.id}.png"
                archive.write(file, overlay)
            writer.writerow(label_row(record, label, image, overlay))
        archive.writestr("labels.csv", labels.getvalue())


@router.get(
    "/reviews.zip",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/zip": {}}},
        **error_responses({413: "More reviewed predictions than one export may hold."}),
    },
)
def export_reviews_zip(
    repository: Repository,
    state: State,
    background: BackgroundTasks,
    since: Since = None,
    until: Until = None,
) -> FileResponse:
    """Reviewed predictions with their images, overlays and labels, as a dataset folder layout
    (``test/good`` = false alarms and confirmed passes, ``test/defect`` = missed defects and
    confirmed flags): unzip it and run ``defectscope evaluate MODEL FOLDER``."""
    query = LogQuery(since=since, until=until)
    count = count_reviewed(repository, query)
    limit = state.settings.export_max_items
    if count > limit:
        raise HTTPException(
            413,
            f"{count} reviewed predictions match; one export holds at most {limit}: "
            "narrow it with since/until",
        )
    handle, target = tempfile.mkstemp(prefix="defectscope-reviews-", suffix=".zip")
    os.close(handle)
    try:
        write_zip(state, repository, LogQuery(since=since, until=until), target)
    except BaseException:
        os.unlink(target)
        raise
    background.add_task(os.unlink, target)
    return FileResponse(
        target,
        media_type="application/zip",
        filename="reviews.zip",
    )
