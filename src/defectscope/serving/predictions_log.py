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

from sqlalchemy import (
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    create_engine,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
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
    "part_id",
    "line",
    "station",
    "tags",
    "model_version",
    "review_verdict",
    "review_note",
    "reviewer",
    "reviewed_at",
    "taught_version",
]
# Logged with each prediction, not part of the CSV: the key of its pictures on disk.
PICTURE_KEY = "picture_key"
VERDICTS = ("correct", "false_alarm", "missed_defect")


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
    # Added after the first release: nullable, so old databases gain them (see `migrate`).
    part_id: Mapped[str | None] = mapped_column(String(256), index=True, nullable=True)
    line: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    station: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    # ",a,b," so that one tag is matched with LIKE '%,a,%' on every database.
    tags: Mapped[str | None] = mapped_column(String(1100), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    picture_key: Mapped[str | None] = mapped_column(String(32), nullable=True)
    review_verdict: Mapped[str | None] = mapped_column(String(16), index=True, nullable=True)
    review_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    reviewer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The model version this image was taught into (a reviewed false alarm), if any.
    taught_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The named model that scored it (a service of several models); None for the only one.
    model_name: Mapped[str | None] = mapped_column(String(100), index=True, nullable=True)

    def to_dict(self) -> dict:
        """A flat row (the CSV's columns): tags comma-separated, times in ISO 8601 UTC."""
        row = {name: getattr(self, name) for name in CSV_COLUMNS}
        row["created_at"] = as_utc(self.created_at).isoformat()
        row["tags"] = ",".join(split_tags(self.tags))
        if self.reviewed_at is not None:
            row["reviewed_at"] = as_utc(self.reviewed_at).isoformat()
        return row

    def to_item(self) -> dict:
        """What the API answers: tags as a list, the review as one object (or None)."""
        item = self.to_dict()
        item["tags"] = split_tags(self.tags)
        for key in ("review_verdict", "review_note", "reviewer", "reviewed_at"):
            item.pop(key)
        item["review"] = (
            None
            if self.review_verdict is None
            else {
                "verdict": self.review_verdict,
                "note": self.review_note,
                "reviewer": self.reviewer,
                "reviewed_at": as_utc(self.reviewed_at or self.created_at).isoformat(),
            }
        )
        item[PICTURE_KEY] = self.picture_key
        item["model_name"] = self.model_name
        return item


def join_tags(tags: Sequence[str]) -> str | None:
    return f",{','.join(tags)}," if tags else None


def split_tags(value: str | None) -> list[str]:
    return [tag for tag in (value or "").split(",") if tag]


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
    tag: str | None = None
    station: str | None = None
    line: str | None = None
    part_id: str | None = None
    reviewed: bool | None = None
    verdict: str | None = None
    model_version: str | None = None
    oldest_first: bool = False
    model_name: str | None = None


def migrate(engine: Engine) -> list[str]:
    """Add the columns (and their indexes) a log database of an older release lacks.

    Every added column is nullable, so ``ALTER TABLE ADD COLUMN`` works on SQLite and
    PostgreSQL alike; a worker racing another one to the same column is harmless.
    """
    table = Base.metadata.tables[PredictionRecord.__tablename__]
    present = {column["name"] for column in inspect(engine).get_columns(table.name)}
    added = []
    for column in table.columns:
        if column.name in present:
            continue
        kind = column.type.compile(dialect=engine.dialect)
        try:
            with engine.begin() as connection:
                connection.execute(
                    text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}')
                )
        except SQLAlchemyError:
            fresh = {c["name"] for c in inspect(engine).get_columns(table.name)}
            if column.name not in fresh:
                raise
        added.append(column.name)
    if added:
        for index in table.indexes:
            if {c.name for c in index.columns} & set(added):
                try:
                    index.create(engine, checkfirst=True)
                except SQLAlchemyError as exc:  # another worker made it meanwhile
                    log.debug("index %s not created: %s", index.name, exc)
        log.info("prediction log: added columns %s", ", ".join(added))
    return added


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
        migrate(self.engine)

    def add_many(self, records: Sequence[dict]) -> list[int]:
        """Write rows; their ids, in order."""
        if not records:
            return []
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            rows = [PredictionRecord(**record) for record in records]
            session.add_all(rows)
            session.flush()
            return [row.id for row in rows]

    def get(self, prediction_id: int) -> PredictionRecord | None:
        with Session(self.engine, expire_on_commit=False) as session:
            return session.get(PredictionRecord, prediction_id)

    def filtered(self, query: LogQuery, statement):
        if query.since is not None:
            statement = statement.where(PredictionRecord.created_at >= as_utc(query.since))
        if query.until is not None:
            statement = statement.where(PredictionRecord.created_at < as_utc(query.until))
        if query.is_anomalous is not None:
            statement = statement.where(PredictionRecord.is_anomalous == query.is_anomalous)
        if query.tag is not None:
            statement = statement.where(
                PredictionRecord.tags.contains(f",{query.tag},", autoescape=True)
            )
        for name in ("station", "line", "part_id", "model_version", "model_name"):
            value = getattr(query, name)
            if value is not None:
                statement = statement.where(getattr(PredictionRecord, name) == value)
        if query.reviewed is not None:
            column = PredictionRecord.review_verdict
            statement = statement.where(column.is_not(None) if query.reviewed else column.is_(None))
        if query.verdict is not None:
            statement = statement.where(PredictionRecord.review_verdict == query.verdict)
        return statement

    def _ordered(self, query: LogQuery, statement):
        order = PredictionRecord.id if query.oldest_first else PredictionRecord.id.desc()
        return statement.order_by(order).limit(query.limit).offset(query.offset)

    def items(self, query: LogQuery) -> tuple[int, list[dict]]:
        """As `query`, each row as `PredictionRecord.to_item` (the API's shape)."""
        with Session(self.engine) as session:
            total = session.scalar(
                self.filtered(query, select(func.count()).select_from(PredictionRecord))
            )
            statement = self._ordered(query, self.filtered(query, select(PredictionRecord)))
            rows = [record.to_item() for record in session.scalars(statement)]
        return int(total or 0), rows

    def query(self, query: LogQuery) -> tuple[int, list[dict]]:
        """(total matching rows, the requested page as dicts), newest first."""
        with Session(self.engine) as session:
            total = session.scalar(
                self.filtered(query, select(func.count()).select_from(PredictionRecord))
            )
            statement = self._ordered(query, self.filtered(query, select(PredictionRecord)))
            rows = [record.to_dict() for record in session.scalars(statement)]
        return int(total or 0), rows

    def recent_scores(
        self, query: LogQuery, model_fingerprint: str | None = None
    ) -> list[tuple[datetime, float]]:
        """(time, image score) of the newest ``query.limit`` matching rows, oldest first.

        Restricted to one model when given: scores of different models are not comparable.
        """
        statement = self.filtered(
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
                    self.filtered(query, select(PredictionRecord))
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
