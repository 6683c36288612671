"""The Review page's logic as plain functions: which queue, where next, how much is left, and
the zoomed crop of an image."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from PIL import Image

QUEUES = {
    "Flagged today": "flagged",
    "Audit sample of today's passed parts": "audit",
    "Custom period": None,
}
AUDIT_SIZE = 20


def start_of_day(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def queue_query(
    choice: str,
    today: date,
    period: tuple[date, date] | None = None,
    custom_scope: str = "flagged",
    seed: int = 0,
) -> dict[str, Any]:
    """Parameters of ``GET /v1/reviews/queue`` for a choice of ``QUEUES`` (days in UTC)."""
    scope = QUEUES.get(choice) or custom_scope
    if QUEUES.get(choice) is not None or not period:
        since, until = start_of_day(today), None
    else:
        since, until = start_of_day(period[0]), start_of_day(period[-1]) + timedelta(days=1)
    query: dict[str, Any] = {"scope": scope, "since": since, "until": until}
    if scope == "audit":
        query.update(limit=AUDIT_SIZE, seed=seed)  # the same sample on every rerun
    return query


def left(items: Sequence[dict[str, Any]]) -> int:
    return sum(1 for item in items if not item.get("review"))


def next_unreviewed(items: Sequence[dict[str, Any]], after: int) -> int:
    """Index of the next item without a review after ``after`` (wrapping), else ``after``."""
    n = len(items)
    for step in range(1, n + 1):
        index = (after + step) % n
        if not items[index].get("review"):
            return index
    return after


def crop(data: bytes, zoom: float, x: float = 0.5, y: float = 0.5) -> bytes:
    """The PNG of ``1/zoom`` of the image around the point (x, y) (fractions of its size),
    kept inside the image; zoom 1 gives the image back unchanged."""
    if zoom <= 1.0:
        return data
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        w, h = max(1, round(width / zoom)), max(1, round(height / zoom))
        left_px = min(max(round(x * width - w / 2), 0), width - w)
        top_px = min(max(round(y * height - h / 2), 0), height - h)
        part = image.crop((left_px, top_px, left_px + w, top_px + h))
        out = io.BytesIO()
        part.save(out, format="PNG")
    return out.getvalue()
