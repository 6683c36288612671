"""The prediction log: one row per scored image, through SQLAlchemy 2 (SQLite by default).

Only portable column types and query constructs are used, so a PostgreSQL URL works the same
way; SQLite-specific settings are applied only when the URL is SQLite.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Boolean, DateTime, Float, Integer, String, create_engine, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

log = logging.getLogger(__name__)

CSV_COLUMNS = [
    "id",
    "created_at",
    "route",
    "request_id",
    "model_fingerprint",
    "image_sha256",
    "width",
    "height",
    "score",
    "normalized_score",
    "is_anomalous",
    "threshold",
    "latency_ms",
]


class Base(DeclarativeBase):
    pass


class PredictionRecord(Base):
    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    route: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str] = mapped_column(String(64))
    model_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    score: Mapped[float] = mapped_column(Float)
    normalized_score: Mapped[float] = mapped_column(Float)
    is_anomalous: Mapped[bool] = mapped_column(Boolean, index=True)
    threshold: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)

    def to_dict(self) -> dict:
        row = {name: getattr(self, name) for name in CSV_COLUMNS}
        row["created_at"] = as_utc(self.created_at).isoformat()
        return row


def as_utc(moment: datetime) -> datetime:
    # Everything is stored and compared in UTC; SQLite drops the zone on the way back, and
    # naive input is taken as UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass
class LogQuery:
    limit: int = 100
    offset: int = 0
    since: datetime | None = None
    until: datetime | None = None
    is_anomalous: bool | None = None


class PredictionLogRepository:
    """Writes and queries prediction records; thread-safe (one session per call)."""

    def __init__(self, url: str, *, engine: Engine | None = None) -> None:
        self.url = url
        if engine is None:
            kwargs: dict = {}
            if url.startswith("sqlite"):
                # Writes come from worker threads, not the thread that opened the connection.
                kwargs["connect_args"] = {"check_same_thread": False}
            engine = create_engine(url, **kwargs)
        self.engine = engine
        Base.metadata.create_all(self.engine)

    def add_many(self, records: Sequence[dict]) -> None:
        if not records:
            return
        with Session(self.engine) as session, session.begin():
            session.add_all(PredictionRecord(**record) for record in records)

    def _filtered(self, query: LogQuery, statement):
        if query.since is not None:
            statement = statement.where(PredictionRecord.created_at >= as_utc(query.since))
        if query.until is not None:
            statement = statement.where(PredictionRecord.created_at < as_utc(query.until))
        if query.is_anomalous is not None:
            statement = statement.where(PredictionRecord.is_anomalous == query.is_anomalous)
        return statement

    def query(self, query: LogQuery) -> tuple[int, list[dict]]:
        """(total matching rows, the requested page as dicts), newest first."""
        with Session(self.engine) as session:
            total = session.scalar(
                self._filtered(query, select(func.count()).select_from(PredictionRecord))
            )
            statement = (
                self._filtered(query, select(PredictionRecord))
                .order_by(PredictionRecord.id.desc())
                .limit(query.limit)
                .offset(query.offset)
            )
            rows = [record.to_dict() for record in session.scalars(statement)]
        return int(total or 0), rows

    def recent_scores(
        self, query: LogQuery, model_fingerprint: str | None = None
    ) -> list[tuple[datetime, float]]:
        """(time, image score) of the newest ``query.limit`` matching rows, oldest first.

        Restricted to one model when given: scores of different models are not comparable.
        """
        statement = self._filtered(
            query, select(PredictionRecord.created_at, PredictionRecord.score)
        )
        if model_fingerprint is not None:
            statement = statement.where(PredictionRecord.model_fingerprint == model_fingerprint)
        statement = statement.order_by(PredictionRecord.id.desc()).limit(query.limit)
        with Session(self.engine) as session:
            rows = [(as_utc(moment), float(score)) for moment, score in session.execute(statement)]
        return rows[::-1]

    def iter_csv(self, query: LogQuery, chunk: int = 1000) -> Iterator[str]:
        """CSV text in pieces, oldest first, so an export never holds the whole table."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        last_id = 0
        while True:
            with Session(self.engine) as session:
                statement = (
                    self._filtered(query, select(PredictionRecord))
                    .where(PredictionRecord.id > last_id)
                    .order_by(PredictionRecord.id)
                    .limit(chunk)
                )
                rows = [record.to_dict() for record in session.scalars(statement)]
            for row in rows:
                writer.writerow(row)
            if rows:
                last_id = rows[-1]["id"]
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            if len(rows) < chunk:
                return

    def close(self) -> None:
        self.engine.dispose()


def utc_now() -> datetime:
    return datetime.now(UTC)
