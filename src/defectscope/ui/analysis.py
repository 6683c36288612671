"""UI logic as plain functions: re-classification, sorting and filtering, rates over time.

Kept apart from the Streamlit scripts so unit tests can call them directly. The decision rule
is the detector's own: anomalous when ``score >= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

SortKey = Literal["score, highest first", "score, lowest first", "name"]
SORT_KEYS: tuple[SortKey, ...] = ("score, highest first", "score, lowest first", "name")
DecisionFilter = Literal["all", "anomalous", "good"]


@dataclass(frozen=True)
class Reclassification:
    """What a new threshold does to a set of scored images."""

    threshold: float
    n_images: int
    n_anomalous: int
    to_anomalous: int  # good at the stored threshold, anomalous at the new one
    to_good: int  # and the other way round

    @property
    def n_changed(self) -> int:
        return self.to_anomalous + self.to_good


def is_anomalous(score: float, threshold: float) -> bool:
    return score >= threshold


def reclassify(
    scores: Sequence[float], stored_threshold: float, threshold: float
) -> Reclassification:
    """Decisions at ``threshold`` compared with those at the model's stored threshold."""
    before = [is_anomalous(s, stored_threshold) for s in scores]
    after = [is_anomalous(s, threshold) for s in scores]
    return Reclassification(
        threshold=float(threshold),
        n_images=len(after),
        n_anomalous=sum(after),
        to_anomalous=sum(a and not b for a, b in zip(after, before, strict=True)),
        to_good=sum(b and not a for a, b in zip(after, before, strict=True)),
    )


def slider_range(scores: Sequence[float], stored_threshold: float) -> tuple[float, float]:
    """Bounds for the threshold slider: every score and the stored threshold, with a margin."""
    values = [*scores, stored_threshold]
    low, high = min(values), max(values)
    margin = max(0.1 * (high - low), 0.05 * abs(high), 1e-3)
    return max(0.0, low - margin), high + margin


def select_results(
    results: Sequence[dict[str, Any]],
    threshold: float,
    decision: DecisionFilter = "all",
    min_score: float | None = None,
    sort: SortKey = "score, highest first",
) -> list[dict[str, Any]]:
    """Scored items (``name``, ``score``) filtered by decision at ``threshold`` and score, sorted.

    Items with an ``error`` (rejected uploads) are never dropped by score or decision filters:
    they are listed last so a user sees what was not scored.
    """
    scored = [r for r in results if r.get("error") is None]
    failed = [r for r in results if r.get("error") is not None]
    if decision != "all":
        wanted = decision == "anomalous"
        scored = [r for r in scored if is_anomalous(r["score"], threshold) == wanted]
    if min_score is not None:
        scored = [r for r in scored if r["score"] >= min_score]
    if sort == "name":
        scored.sort(key=lambda r: r["name"])
    else:
        scored.sort(key=lambda r: r["score"], reverse=sort == "score, highest first")
    return [*scored, *failed]


def log_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Prediction-log rows (``GET /v1/predictions`` items) as a time-ordered DataFrame."""
    columns = ["created_at", "score", "normalized_score", "is_anomalous", "threshold"]
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
    return frame.sort_values("created_at").reset_index(drop=True)


def anomaly_rate(frame: pd.DataFrame, period: Literal["hour", "day"]) -> pd.DataFrame:
    """Images, anomalies and anomaly rate per calendar hour or day (UTC), oldest first.

    Periods without predictions are left out rather than shown as a rate of zero: no images
    is not the same as no anomalies.
    """
    columns = ["period", "images", "anomalies", "rate"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    floor = "h" if period == "hour" else "D"
    start = frame["created_at"].dt.floor(floor)
    grouped = frame.assign(period=start).groupby("period")["is_anomalous"]
    out = pd.DataFrame({"images": grouped.size(), "anomalies": grouped.sum().astype(int)})
    out["rate"] = out["anomalies"] / out["images"]
    return out.reset_index()[columns]
