"""The web UI: its logic as plain functions, and its pages run by Streamlit's AppTest
against a real uvicorn API server (no browser here; see test_ui_e2e.py for that)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("streamlit")
pytest.importorskip("uvicorn")

from _images import free_port, png, texture_crops, with_defect
from _models import copy_model
from _server import running_server
from streamlit.testing.v1 import AppTest

from defectscope.client import ClientError, DefectscopeClient
from defectscope.detector.detector import Detector
from defectscope.serving.settings import ServingSettings
from defectscope.ui import analysis
from defectscope.ui.api import UiSettings, friendly, sample_sets, score_images

UI = Path(__file__).parents[2] / "src" / "defectscope" / "ui"
RUN_TIMEOUT = 60  # a page run that scores images waits for the model


# --------------------------------------------------------------------------- plain logic
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
    slow = friendly(ClientError("x", timed_out=True), settings, "scoring")
    assert slow.startswith("scoring: ") and "did not answer within 2 s" in slow
    assert "--api-key" in friendly(ClientError("x", 401, "missing or wrong API key"), settings)
    rejected = friendly(ClientError("x", 415, "not a readable image"), settings, "a.txt")
    assert rejected == "a.txt: rejected by the API (415): not a readable image"
    listed = friendly(ClientError("x", 422, [{"msg": "too big", "loc": ["q"]}]), settings)
    assert "too big" in listed
    assert "not ready yet" in friendly(ClientError("x", 503, "loading"), settings)


# ------------------------------------------------------------------- pages against an API
@pytest.fixture(scope="module")
def model_dir(texture_model_dir, tmp_path_factory) -> Path:
    # This module's own copy of the session's model: the pages save thresholds and reports.
    return copy_model(texture_model_dir, tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def api(model_dir, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("log") / "predictions.db"
    settings = ServingSettings(
        model_path=model_dir, prediction_log_url=f"sqlite:///{log}", api_key="ui-key"
    )
    with running_server(settings, Detector.load(model_dir)) as (url, _):
        yield url


@pytest.fixture
def ui_env(api, monkeypatch) -> str:
    monkeypatch.setenv("DEFECTSCOPE_API_URL", api)
    monkeypatch.setenv("DEFECTSCOPE_API_KEY", "ui-key")
    monkeypatch.setenv("DEFECTSCOPE_UI_TIMEOUT", "60")
    monkeypatch.delenv("DEFECTSCOPE_UI_SAMPLES", raising=False)
    return api


def page(name: str) -> AppTest:
    return AppTest.from_file(str(UI / "views" / f"{name}.py"), default_timeout=RUN_TIMEOUT)


def texts(at: AppTest) -> str:
    parts = [*at.markdown, *at.caption, *at.info, *at.warning, *at.error, *at.success]
    return "\n".join(str(p.value) for p in parts)


def test_inspect_scores_uploads_reclassifies_and_saves_the_threshold(ui_env) -> None:
    good = texture_crops(2, seed=31)
    defect = with_defect(good[0], seed=4)[0]
    at = page("inspect_images").run()
    assert not at.exception
    assert "Upload images" in texts(at)
    at.file_uploader[0].set_value(
        [
            ("good_0.png", png(good[0]), "image/png"),
            ("good_1.png", png(good[1]), "image/png"),
            ("defect.png", png(defect), "image/png"),
            ("notes.txt", b"not an image at all", "text/plain"),
        ]
    )
    at.run()
    at.button[0].click().run()
    assert not at.exception, at.exception
    shown = texts(at)
    assert "notes.txt: rejected by the API" in shown and "not a readable image" in shown
    # Original, overlay and mask for each of the three scored images.
    assert len(at.image) == 9
    table = at.dataframe[0].value
    assert set(table["image"]) == {"good_0.png", "good_1.png", "defect.png"}
    assert list(table["score"]) == sorted(table["score"], reverse=True)
    assert table["image"].iloc[0] == "defect.png"  # red blob: the highest score

    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        stored = client.model_info()["calibration"]["threshold"]
    slider = at.slider[0]
    assert slider.value == pytest.approx(stored, abs=slider.proto.step)
    # Just below the lowest score: every image becomes anomalous.
    lowest = float(table["score"].min())
    slider.set_value(lowest - 1e-3).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Anomalous at this threshold"] == "3 / 3"
    changed = int(metrics["Decisions changed"])
    expected = analysis.reclassify(list(table["score"]), stored, lowest - 1e-3)
    assert changed == expected.n_changed and changed >= 1
    assert f"{changed} image(s) change decision" in texts(at)

    at.selectbox[0].set_value("good").run()  # decision filter: nothing is good any more
    assert at.dataframe[0].value.empty

    save = next(b for b in at.button if b.label.startswith("Save threshold"))
    save.click().run()
    assert not at.exception, at.exception
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        calibration = client.model_info()["calibration"]
    assert calibration["threshold"] == pytest.approx(lowest - 1e-3, abs=1e-3)
    assert calibration["threshold_source"] == "ui"
    # Saved: the model's threshold is now the chosen one, so nothing changes against it.
    assert {m.label: m.value for m in at.metric}["Decisions changed"] == "0"


def test_inspect_picks_a_sample_set(ui_env, monkeypatch, tmp_path) -> None:
    for i, image in enumerate(texture_crops(3, seed=41)):
        (tmp_path / "good").mkdir(exist_ok=True)
        (tmp_path / "good" / f"{i:03d}.png").write_bytes(png(image))
    monkeypatch.setenv("DEFECTSCOPE_UI_SAMPLES", str(tmp_path))
    at = page("inspect_images").run()
    at.radio[0].set_value("Sample set").run()
    assert at.selectbox[0].options == ["good"]
    at.slider[0].set_value(2).run()
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["image"].sort_values()) == ["good/000.png", "good/001.png"]


def predict_and_wait_for_the_log(ui_env, images: list) -> None:
    """Predict a batch, then wait until the server's background writer has logged it: the
    pages read the log, and a row still in flight would make them count short."""
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        before = client.predictions(limit=1)["total"]
        client.predict_batch([png(image) for image in images])
        deadline = time.monotonic() + 15.0
        while client.predictions(limit=1)["total"] < before + len(images):
            assert time.monotonic() < deadline, "the prediction log did not catch up in 15 s"
            time.sleep(0.05)


def test_history_shows_the_log_and_rates(ui_env) -> None:
    predict_and_wait_for_the_log(ui_env, texture_crops(3, seed=51))
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        total = client.predictions(limit=1)["total"]
    at = page("history").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Predictions"] == str(total) and total >= 3
    rates, log = at.dataframe[0].value, at.dataframe[1].value
    assert rates["images"].sum() == total
    assert len(log) == total and log["created_at"].is_monotonic_decreasing
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        anomalous = client.predictions(limit=1, is_anomalous=True)["total"]
    at.selectbox[1].set_value("anomalous").run()  # decision filter, done by the API
    if anomalous:
        metrics = {m.label: m.value for m in at.metric}
        assert (metrics["Predictions"], metrics["Anomaly rate"]) == (str(anomalous), "100.0%")
    else:
        assert "No predictions logged" in texts(at)


def test_model_page_shows_metadata_and_report(ui_env, model_dir) -> None:
    at = page("model").run()
    assert not at.exception, at.exception
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        info = client.model_info()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Image threshold"] == f"{info['calibration']['threshold']:.4f}"
    assert "no evaluation report" in texts(at)

    (model_dir / "report").mkdir(exist_ok=True)
    # The shape `defectscope evaluate --report` writes (evaluation/report.py).
    report = {
        "metrics": {"image_auroc": 0.9921, "pixel_auroc": 0.9812, "aupro": 0.9345, "f1_max": 0.97},
        "confusion": {"tp": 60, "fp": 2, "tn": 18, "fn": 3},
        "per_defect": {
            "good": {"defect_type": "good", "count": 20, "flagged_rate": 0.1},
            "crack": {"defect_type": "crack", "count": 63, "flagged_rate": 0.95},
        },
    }
    (model_dir / "report" / "metrics.json").write_text(json.dumps(report))
    try:
        at.run()
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Image AUROC"] == f"{report['metrics']['image_auroc']:.3f}"
        assert metrics["AUPRO"] == f"{report['metrics']['aupro']:.3f}"
        facts, confusion, per_defect = (d.value for d in at.dataframe)
        assert (
            dict(zip(facts["property"], facts["value"], strict=True))["backbone"]
            == (info["backbone"]["name"])
        )
        assert list(confusion["flagged anomalous"]) == [60, 2]  # tp, fp
        assert list(per_defect["defect_type"]) == ["good", "crack"]
    finally:
        (model_dir / "report" / "metrics.json").unlink()


def test_drift_page_window_too_small_then_a_verdict(ui_env) -> None:
    at = page("drift").run()
    at.number_input[0].set_value(5)
    at.selectbox[0].set_value("last hour").run()
    assert not at.exception, at.exception
    # At most 5 predictions, under the drift check's minimum window of 10.
    assert "Not enough predictions in this window yet" in texts(at)
    predict_and_wait_for_the_log(ui_env, texture_crops(12, seed=61))
    at.number_input[0].set_value(12).run()
    assert not at.exception, at.exception
    shown = texts(at)
    assert "Verdict: **" in shown and "over 12 predictions" in shown
    tests = at.dataframe[0].value
    assert "Scores: Kolmogorov-Smirnov" in set(tests["test"])
    assert "Feature test (MMD)" in [h.value for h in at.subheader]

    # The feature test on an uploaded window of images.
    window = [(f"{i}.png", png(image), "image/png") for i, image in enumerate(texture_crops(4))]
    at.file_uploader[0].set_value(window).run()
    at.button[0].click().run()
    assert "Not enough images yet" in texts(at)  # 4 < 10 images
    window = [(f"{i}.png", png(image), "image/png") for i, image in enumerate(texture_crops(10))]
    at.file_uploader[0].set_value(window).run()
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert "over 10 uploaded images" in texts(at)
    assert "Features: MMD (pooled patch embeddings)" in set(at.dataframe[1].value["test"])


def test_drift_page_without_reference(model_dir, tmp_path, monkeypatch) -> None:
    detector = Detector.load(model_dir)
    detector.info.reference = None
    settings = ServingSettings(model_path=None, prediction_log_url=f"sqlite:///{tmp_path}/l.db")
    with running_server(settings, detector) as (url, _):
        monkeypatch.setenv("DEFECTSCOPE_API_URL", url)
        monkeypatch.delenv("DEFECTSCOPE_API_KEY", raising=False)
        at = page("drift").run()
    assert not at.exception, at.exception
    assert "no drift reference" in texts(at)


def test_entry_page_shows_connection_and_navigation(ui_env) -> None:
    at = AppTest.from_file(str(UI / "app.py"), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception, at.exception
    assert "Connected, model ready" in [s.value for s in at.sidebar.success]
    assert at.title[0].value == "Inspect images"  # the default page
    at.switch_page(str(UI / "views" / "model.py")).run()
    assert at.title[0].value == "Model"


def test_api_down_slow_or_key_refused_gives_friendly_errors(ui_env, monkeypatch) -> None:
    monkeypatch.setenv("DEFECTSCOPE_API_URL", f"http://127.0.0.1:{free_port()}")
    for name in ("inspect_images", "history", "model"):
        at = page(name).run()
        assert not at.exception, at.exception
        assert "Cannot reach the defectscope API" in at.error[0].value

    # A server that accepts the connection and never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("DEFECTSCOPE_API_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("DEFECTSCOPE_UI_TIMEOUT", "0.5")
        at = page("drift").run()
    assert "did not answer within 0.5 s" in at.error[0].value

    monkeypatch.setenv("DEFECTSCOPE_API_URL", ui_env)
    monkeypatch.setenv("DEFECTSCOPE_API_KEY", "wrong")
    at = page("inspect_images").run()
    assert "refused the API key" in at.error[0].value


def test_score_images_keeps_names_and_per_item_errors(ui_env) -> None:
    images = [(f"{i}.png", png(image)) for i, image in enumerate(texture_crops(9, seed=71))]
    images.insert(3, ("broken.png", b"\x89PNG truncated"))
    seen = []
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        items = score_images(client, images, lambda done, total: seen.append((done, total)))
    assert [item["name"] for item in items] == [name for name, _ in images]
    assert items[3]["error"] and all(i["error"] is None for i in items if i["name"] != "broken.png")
    assert all(i["overlay_png"] and i["mask_png"] for i in items if i["error"] is None)
    assert seen == [(8, 10), (10, 10)]  # two batch requests of at most 8


def test_cli_ui_and_serve_report_refuse_bad_arguments(model_dir, tmp_path) -> None:
    for args, message in (
        (["ui", "--api", "localhost:8000"], "must be an http"),
        (["ui", "--samples", str(tmp_path / "missing")], "not a folder"),
        (["ui", "--timeout", "0"], "must be positive"),
        (["serve", str(model_dir), "--report", str(tmp_path)], "no metrics.json"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "defectscope.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "200"},  # one line, unwrapped
        )
        assert done.returncode == 2, done.stderr
        assert message in done.stdout + done.stderr


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
