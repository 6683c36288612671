"""Reviews of logged predictions: verdicts kept on the prediction's row, review queues, and
the reviewed false alarms that teach the model.

A review is stored in the prediction's own row (verdict, note, reviewer, time); reviewing the
same prediction again replaces it: the log keeps the latest verdict only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from defectscope.serving.predictions_log import (
    LogQuery,
    PredictionLogRepository,
    PredictionRecord,
    as_utc,
    utc_now,
)

# The audit sample draws from at most this many newest passed predictions.
AUDIT_POOL = 100_000


def set_review(
    repository: PredictionLogRepository,
    prediction_id: int,
    verdict: str,
    note: str | None,
    reviewer: str,
) -> dict | None:
    """Store (or replace) the review of one prediction; its item, or None for an unknown id."""
    with Session(repository.engine, expire_on_commit=False) as session, session.begin():
        record = session.get(PredictionRecord, prediction_id)
        if record is None:
            return None
        record.review_verdict = verdict
        record.review_note = note
        record.reviewer = reviewer
        record.reviewed_at = utc_now()
    return record.to_item()


def audit_sample(
    repository: PredictionLogRepository, query: LogQuery, seed: int
) -> tuple[int, list[dict]]:
    """A seeded random sample (``query.limit``) of passed, unreviewed predictions."""
    query.is_anomalous, query.reviewed = False, False
    statement = repository.filtered(query, select(PredictionRecord.id))
    statement = statement.order_by(PredictionRecord.id.desc()).limit(AUDIT_POOL)
    with Session(repository.engine) as session:
        ids = sorted(session.scalars(statement))
        chosen = random.Random(seed).sample(ids, min(query.limit, len(ids)))
        rows = session.scalars(
            select(PredictionRecord)
            .where(PredictionRecord.id.in_(chosen))
            .order_by(PredictionRecord.id)
        )
        items = [record.to_item() for record in rows]
    return len(ids), items


def teachable(
    repository: PredictionLogRepository,
    prediction_ids: Sequence[int] | None,
    since: datetime | None,
    limit: int,
) -> list[PredictionRecord]:
    """Reviewed false alarms not taught yet (all, or only ``prediction_ids``), oldest first."""
    statement = select(PredictionRecord).where(
        PredictionRecord.review_verdict == "false_alarm",
        PredictionRecord.taught_version.is_(None),
    )
    if prediction_ids is not None:
        statement = statement.where(PredictionRecord.id.in_(list(prediction_ids)))
    if since is not None:
        statement = statement.where(PredictionRecord.created_at >= as_utc(since))
    statement = statement.order_by(PredictionRecord.id).limit(limit)
    with Session(repository.engine, expire_on_commit=False) as session:
        return list(session.scalars(statement))


def mark_taught(
    repository: PredictionLogRepository, prediction_ids: Sequence[int], version: str
) -> None:
    if not prediction_ids:
        return
    with Session(repository.engine) as session, session.begin():
        session.execute(
            update(PredictionRecord)
            .where(PredictionRecord.id.in_(list(prediction_ids)))
            .values(taught_version=version)
        )


def flagged(
    repository: PredictionLogRepository, since: datetime | None, limit: int
) -> tuple[int, list[PredictionRecord]]:
    """(how many, the newest ``limit``) anomalous predictions since a moment."""
    where: list[ColumnElement[bool]] = [PredictionRecord.is_anomalous.is_(True)]
    if since is not None:
        where.append(PredictionRecord.created_at >= as_utc(since))
    with Session(repository.engine, expire_on_commit=False) as session:
        total = session.scalar(select(func.count()).select_from(PredictionRecord).where(*where))
        rows = session.scalars(
            select(PredictionRecord).where(*where).order_by(PredictionRecord.id.desc()).limit(limit)
        )
        return int(total or 0), list(rows)


def count_reviewed(repository: PredictionLogRepository, query: LogQuery) -> int:
    query.reviewed = True
    statement = repository.filtered(query, select(func.count()).select_from(PredictionRecord))
    with Session(repository.engine) as session:
        return int(session.scalar(statement) or 0)


def iter_reviewed(
    repository: PredictionLogRepository, query: LogQuery, chunk: int = 200
) -> Iterator[PredictionRecord]:
    """Reviewed predictions matching ``query``, oldest first, a chunk of rows at a time."""
    query.reviewed = True
    last_id = 0
    while True:
        statement = (
            repository.filtered(query, select(PredictionRecord))
            .where(PredictionRecord.id > last_id)
            .order_by(PredictionRecord.id)
            .limit(chunk)
        )
        with Session(repository.engine, expire_on_commit=False) as session:
            rows = list(session.scalars(statement))
        yield from rows
        if len(rows) < chunk:
            return
        last_id = rows[-1].id
