"""The web UI's own logic as plain functions, no server: number formats, the threshold step
line and slider stops, re-classification, filtering, rates, friendly errors, picking a
prediction, the review queue, zoom and keyboard shortcuts."""

from __future__ import annotations

import io
from datetime import UTC, date, datetime

import pandas as pd
import pytest
from PIL import Image

pytest.importorskip("streamlit")

from _images import png, texture_crops

from defectscope.client import ClientError, DefectscopeClient
from defectscope.ui import analysis, review_keys
from defectscope.ui.api import UiSettings, friendly, sample_sets
from defectscope.ui.formatting import display_name, fmt_p, fmt_score, unique_names
from defectscope.ui.review_logic import AUDIT_SIZE, crop, left, next_unreviewed, queue_query


def test_scores_and_p_values_have_one_format_everywhere() -> None:
    assert fmt_score(1.428) == fmt_score(1.4280) == "1.428"
    assert (fmt_score(1.4), fmt_score(0.012345), fmt_score(12.3456)) == (
        "1.4",
        "0.01235",
        "12.35",
    )
    assert fmt_score(None) == fmt_score(float("nan")) == "—"
    assert (fmt_p(0.00001234), fmt_p(0.012345), fmt_p(0.5)) == ("<0.001", "0.0123", "0.5")
    assert display_name("/data/test/broken_large/000.png") == "test/broken_large/000.png"
    assert unique_names(["000.png", "a.png", "000.png"]) == ["000.png", "a.png", "000.png (2)"]


def test_threshold_is_drawn_as_steps_between_saves() -> None:
    times = [f"2026-01-01T10:0{i}:00+00:00" for i in range(6)]
    thresholds = [1.0, 1.0, 2.0, 2.0, 2.0, 1.5]
    frame = analysis.log_frame(
        [
            {"created_at": t, "score": 1.0, "is_anomalous": False, "threshold": h}
            for t, h in zip(times, thresholds, strict=True)
        ]
    )
    steps = analysis.threshold_steps(frame)
    # A corner where it changed, and the last value carried to the newest prediction: with
    # step-after interpolation the line is flat between saves, never a ramp.
    assert list(steps["threshold"]) == [1.0, 2.0, 1.5, 1.5]
    assert list(steps["created_at"]) == [pd.Timestamp(times[i]) for i in (0, 2, 5, 5)]
    assert analysis.threshold_steps(analysis.log_frame([])).empty


def test_a_click_on_the_chart_or_a_row_opens_that_prediction() -> None:
    table = pd.DataFrame({"id": [7, 5, 3]})
    assert analysis.picked_id({"selection": {"pick": [{"id": 5}]}}, None, table) == 5
    row = {"selection": {"rows": [2]}}
    assert analysis.picked_id({"selection": {"pick": [{"id": 5}]}}, row, table) == 3
    assert (
        analysis.picked_id({"selection": {"pick": []}}, {"selection": {"rows": []}}, table) is None
    )


def test_threshold_options_return_exactly_to_the_stored_value() -> None:
    stored = 1.4283719
    options = analysis.threshold_options(0.5, 3.0, stored)
    assert stored in options
    labels = [fmt_score(o) for o in options]
    assert len(set(labels)) == len(labels)  # a label maps back to one value only
    assert analysis.false_alarm_rate([1.0, 2.0, 3.0, 4.0], 2.0) == 0.75
    assert analysis.page_of(list(range(25)), 2, 12) == ([24], 3)
    assert analysis.page_of([], 5, 12) == ([], 1)


def test_review_queue_choices_and_position() -> None:
    today = date(2026, 3, 4)
    flagged = queue_query("Flagged today", today)
    assert flagged == {"scope": "flagged", "since": datetime(2026, 3, 4, tzinfo=UTC), "until": None}
    audit = queue_query("Audit sample of today's passed parts", today, seed=7)
    assert (audit["scope"], audit["seed"], audit["limit"]) == ("audit", 7, AUDIT_SIZE)
    custom = queue_query("Custom period", today, (date(2026, 3, 1), date(2026, 3, 2)), "audit")
    assert (custom["since"], custom["until"]) == (
        datetime(2026, 3, 1, tzinfo=UTC),
        datetime(2026, 3, 3, tzinfo=UTC),  # the whole last day
    )
    items = [{"id": 1, "review": {"verdict": "correct"}}, {"id": 2}, {"id": 3, "review": None}]
    assert left(items) == 2
    assert (next_unreviewed(items, 1), next_unreviewed(items, 2)) == (2, 1)  # wraps round
    assert next_unreviewed([{"id": 1, "review": {"verdict": "correct"}}], 0) == 0


def test_review_zoom_crops_around_a_point() -> None:
    data = png(texture_crops(1)[0])
    assert crop(data, 1.0) is data
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    with Image.open(io.BytesIO(crop(data, 2.0, 1.0, 0.0))) as zoomed:
        assert zoomed.size == (round(width / 2), round(height / 2))  # kept inside the image


def test_review_keys_press_buttons_by_their_stable_keys() -> None:
    html = review_keys.script()
    assert "window.parent.document" in html and "st-key-" in html
    assert {"arrowright", "arrowleft", "a", "f", "m"} <= set(review_keys.SHORTCUTS)
    assert set(review_keys.SHORTCUTS.values()) == {
        "review-next",
        "review-prev",
        "review-correct",
        "review-false_alarm",
        "review-missed_defect",
    }


def test_reclassify_counts_changed_decisions() -> None:
    scores = [0.5, 1.0, 1.5, 2.0]
    same = analysis.reclassify(scores, 1.5, 1.5)
    assert (same.n_anomalous, same.n_changed) == (2, 0)
    lower = analysis.reclassify(scores, 1.5, 0.9)  # 1.0 becomes anomalous
    assert (lower.n_anomalous, lower.to_anomalous, lower.to_good) == (3, 1, 0)
    higher = analysis.reclassify(scores, 1.5, 1.75)  # 1.5 becomes good
    assert (higher.n_anomalous, higher.to_anomalous, higher.to_good, higher.n_changed) == (
        1,
        0,
        1,
        1,
    )
    # The detector's rule: a score equal to the threshold is anomalous.
    assert analysis.reclassify([2.0], 3.0, 2.0).to_anomalous == 1


def test_slider_range_covers_scores_and_stored_threshold() -> None:
    low, high = analysis.slider_range([1.0, 1.2], 3.0)
    assert low < 1.0 and high > 3.0 and low >= 0
    low, high = analysis.slider_range([2.0], 2.0)  # one value: still a usable range
    assert low < 2.0 < high


def test_select_results_filters_sorts_and_keeps_errors_last() -> None:
    results = [
        {"name": "b", "score": 2.0, "error": None},
        {"name": "broken", "error": "not a readable image (415)"},
        {"name": "a", "score": 0.5, "error": None},
        {"name": "c", "score": 1.2, "error": None},
    ]
    names = [r["name"] for r in analysis.select_results(results, 1.0)]
    assert names == ["b", "c", "a", "broken"]
    names = [r["name"] for r in analysis.select_results(results, 1.0, sort="score, lowest first")]
    assert names == ["a", "c", "b", "broken"]
    names = [r["name"] for r in analysis.select_results(results, 1.0, "anomalous", sort="name")]
    assert names == ["b", "c", "broken"]
    assert [r["name"] for r in analysis.select_results(results, 1.0, "good")] == ["a", "broken"]
    assert [r["name"] for r in analysis.select_results(results, 1.0, min_score=1.5)] == [
        "b",
        "broken",
    ]


def test_anomaly_rate_per_hour_and_day_skips_empty_periods() -> None:
    def row(when: str, anomalous: bool) -> dict:
        return {"created_at": when, "score": 1.0, "is_anomalous": anomalous, "threshold": 1.0}

    rows = [
        row("2026-01-01T10:05:00+00:00", True),
        row("2026-01-01T10:55:00+00:00", False),
        row("2026-01-01T13:00:00+00:00", True),
        row("2026-01-02T09:00:00Z", False),
    ]
    frame = analysis.log_frame(rows[::-1])  # the API sends newest first
    assert list(frame["created_at"]) == sorted(frame["created_at"])
    hourly = analysis.anomaly_rate(frame, "hour")
    assert list(hourly["images"]) == [2, 1, 1]  # 11:00 and 12:00 had no images: not rows
    assert list(hourly["rate"]) == [0.5, 1.0, 0.0]
    assert hourly["period"][0] == pd.Timestamp("2026-01-01T10:00:00Z")
    daily = analysis.anomaly_rate(frame, "day")
    assert list(daily["anomalies"]) == [2, 0] and list(daily["rate"]) == [2 / 3, 0.0]
    assert analysis.anomaly_rate(analysis.log_frame([]), "day").empty


def test_sample_sets_lists_image_folders(tmp_path) -> None:
    image = png(texture_crops(1)[0])
    for name in ("test/good/000.png", "test/crack/001.png", "top.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(image)
    (tmp_path / "test" / "crack" / "notes.txt").write_text("not an image")
    sets = sample_sets(tmp_path)
    assert list(sets) == [".", "test/crack", "test/good"]
    assert [p.name for p in sets["test/crack"]] == ["001.png"]
    assert sample_sets(None) == {} and sample_sets(tmp_path / "missing") == {}


def test_friendly_messages_say_what_to_do() -> None:
    settings = UiSettings("http://127.0.0.1:9", None, 2.0, None)
    down = friendly(ClientError("x"), settings)
    assert "Cannot reach" in down and "defectscope serve" in down
    slow = friendly(ClientError("x", timed_out=True), settings, "scoring", scoring=True)
    assert slow.startswith("scoring: ") and "did not answer within 2 s" in slow
    assert "fewer images" in slow
    # A metadata request waited only the short timeout, and sent no images to advise about.
    hung = friendly(ClientError("x", timed_out=True), settings)
    assert "did not answer within 2 s" in hung and "fewer images" not in hung
    quick = UiSettings("http://127.0.0.1:9", None, 60.0, None, quick_timeout_s=3.0)
    assert "within 3 s" in friendly(ClientError("x", timed_out=True), quick)
    assert (quick.client(quick=True).timeout, quick.client().timeout) == (3.0, 60.0)
    assert "--api-key" in friendly(ClientError("x", 401, "missing or wrong API key"), settings)
    rejected = friendly(ClientError("x", 415, "not a readable image"), settings, "a.txt")
    assert rejected == "a.txt: rejected by the API (415): not a readable image"
    listed = friendly(ClientError("x", 422, [{"msg": "too big", "loc": ["q"]}]), settings)
    assert "too big" in listed
    assert "not ready yet" in friendly(ClientError("x", 503, "loading"), settings)


def test_all_predictions_pages_through_the_log() -> None:
    httpx = pytest.importorskip("httpx")
    rows = [{"id": i} for i in range(2500)]
    asked = []

    def answer(request) -> object:
        limit, offset = int(request.url.params["limit"]), int(request.url.params["offset"])
        asked.append((limit, offset))
        body = {"total": len(rows), "limit": limit, "offset": offset}
        return httpx.Response(200, json={**body, "items": rows[offset : offset + limit]})

    with DefectscopeClient("http://test", transport=httpx.MockTransport(answer)) as client:
        assert client.all_predictions(max_rows=2200) == rows[:2200]
        assert asked == [(1000, 0), (1000, 1000), (200, 2000)]
        asked.clear()
        assert len(client.all_predictions(max_rows=10_000)) == 2500
        assert asked == [(1000, 0), (1000, 1000), (1000, 2000)]
