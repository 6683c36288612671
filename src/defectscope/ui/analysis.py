"""UI logic as plain functions: re-classification, sorting and filtering, rates over time.

Kept apart from the Streamlit scripts so unit tests can call them directly. The decision rule
is the detector's own: anomalous when ``score >= threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from defectscope.ui.formatting import fmt_score

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


def threshold_steps(frame: pd.DataFrame, until: pd.Timestamp | None = None) -> pd.DataFrame:
    """The threshold in force over time as the corners of a step line (``created_at``,
    ``threshold``): one row where it changed, and one at the end so the last value reaches
    ``until`` (default: the newest prediction). Drawn with ``interpolate="step-after"`` it is
    flat between saves, never a diagonal ramp from one saved value to the next."""
    columns = ["created_at", "threshold"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    ordered = frame.sort_values("created_at")[columns]
    changed = ordered["threshold"].ne(ordered["threshold"].shift())
    steps = ordered[changed]
    end = until if until is not None else ordered["created_at"].iloc[-1]
    last = pd.DataFrame({"created_at": [end], "threshold": [ordered["threshold"].iloc[-1]]})
    return pd.concat([steps, last], ignore_index=True)


def false_alarm_rate(good_scores: Sequence[float], threshold: float) -> float:
    """Share of good (training) scores the detector's rule flags at ``threshold``."""
    if not good_scores:
        return float("nan")
    return sum(is_anomalous(s, threshold) for s in good_scores) / len(good_scores)


def threshold_options(low: float, high: float, *exact: float, steps: int = 400) -> list[float]:
    """Values for a threshold slider: an even grid over [low, high] plus the ``exact`` ones
    (the stored and calibrated thresholds), so the slider can go back to them exactly.

    No two options share a label (``fmt_score``): Streamlit maps a chosen label back to its
    value, so a grid point shown like the stored threshold would stand in for it.
    """
    pinned = {float(v) for v in exact}
    labels = {fmt_score(v) for v in pinned}
    grid = [low + (high - low) * i / steps for i in range(steps + 1)]
    kept = set(pinned)
    for value in grid:
        label = fmt_score(value)
        if label not in labels:
            labels.add(label)
            kept.add(value)
    return sorted(kept)


def nearest(options: Sequence[float], value: float) -> float:
    return min(options, key=lambda option: abs(option - value))


def page_of(items: Sequence[Any], page: int, per_page: int) -> tuple[list[Any], int]:
    """Items on ``page`` (0-based, clamped) and the number of pages (at least 1)."""
    n_pages = max(1, -(-len(items) // per_page))
    page = min(max(page, 0), n_pages - 1)
    return list(items[page * per_page : (page + 1) * per_page]), n_pages


def picked_id(chart_state: Any, table_state: Any, table: pd.DataFrame) -> Any:
    """The prediction id picked by a click on the chart's ``pick`` selection or a table row
    (the row wins when both are set), or None."""

    def get(obj: Any, key: str) -> Any:
        if obj is None:
            return None
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    rows = get(get(table_state, "selection"), "rows") or []
    if rows and "id" in table and rows[0] < len(table):
        return table["id"].iloc[rows[0]].item()
    points = get(get(chart_state, "selection"), "pick") or []
    if points and isinstance(points[0], dict) and "id" in points[0]:
        return points[0]["id"]
    return None
