"""The web UI's pages run by Streamlit's AppTest against a real uvicorn API server (no browser
here; see test_ui_e2e.py and test_ui_review_e2e.py for that; the plain logic is in
tests/unit/test_ui_logic.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("streamlit")
pytest.importorskip("uvicorn")

from _images import free_port, png, texture_crops, with_defect
from _models import copy_model
from _server import running_server
from streamlit.testing.v1 import AppTest

from defectscope.client import DefectscopeClient
from defectscope.detector.detector import Detector
from defectscope.serving.settings import ServingSettings
from defectscope.ui import analysis
from defectscope.ui.api import (
    UiSettings,
    connection_state,
    drift_skipping_bad,
    score_images,
)
from defectscope.ui.formatting import fmt_score
from defectscope.ui.threshold_panel import PROPOSED

UI = Path(__file__).parents[2] / "src" / "defectscope" / "ui"
RUN_TIMEOUT = 60  # a page run that scores images waits for the model


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
    assert at.file_uploader[0].proto.max_upload_size_mb == 20  # the API's limit, not 200 MB
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
    # The opened image (original, overlay, mask) and a thumbnail per scored image.
    assert len(at.image) == 3 + 3
    table = at.dataframe[0].value
    assert set(table["image"]) == {"good_0.png", "good_1.png", "defect.png"}
    assert list(table["score"]) == sorted(table["score"], reverse=True)
    assert table["image"].iloc[0] == "defect.png"  # red blob: the highest score
    # The highest score is opened first; "Open" on a thumbnail opens another one.
    assert any(m.value.startswith("**defect.png** —") for m in at.markdown)
    at.button(key=next(b.key for b in at.button if b.key and "good_1.png" in b.key)).click().run()
    assert any(m.value.startswith("**good_1.png** —") for m in at.markdown)

    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        stored = client.model_info()["calibration"]["threshold"]
    slider = at.select_slider[0]
    assert slider.value == stored  # exactly: the stored value is one of the options
    assert next(b for b in at.button if b.label.startswith("Review and save")).disabled
    # Just below the lowest score: every image becomes anomalous.
    lowest = float(table["score"].min())
    options = analysis.threshold_options(
        *analysis.slider_range(list(table["score"]), stored), stored
    )
    below = max(o for o in options if o < lowest)
    slider.set_value(below).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Anomalous at this threshold"] == "3 / 3"
    changed = int(metrics["Decisions changed"])
    expected = analysis.reclassify(list(table["score"]), stored, below)
    assert changed == expected.n_changed and changed >= 1
    assert f"{changed} image(s) change decision" in texts(at)

    at.selectbox[0].set_value("good").run()  # decision filter: nothing is good any more
    assert at.dataframe[0].value.empty

    # Saving is handed to the Model page's checked flow, which opens on the chosen value.
    handover = next(b for b in at.button if b.label.startswith("Review and save"))
    handover.click().run()
    assert at.session_state[PROPOSED] == pytest.approx(below, rel=1e-12)
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        assert client.model_info()["calibration"]["threshold"] == stored  # nothing saved yet
    model = page("model")
    model.session_state[PROPOSED] = at.session_state[PROPOSED]
    model.run()
    assert not model.exception, model.exception
    box = next(n for n in model.number_input if n.label.startswith("New image threshold"))
    assert box.value == pytest.approx(below, rel=1e-12)
    model.button(key="threshold-save").click().run()
    model.button(key="threshold-confirm").click().run()
    assert not model.exception, model.exception
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        calibration = client.model_info()["calibration"]
    assert calibration["threshold"] == pytest.approx(below, rel=1e-9)
    # Saved: the model's threshold is now the chosen one, so nothing changes against it.
    at.run()
    assert {m.label: m.value for m in at.metric}["Decisions changed"] == "0"
    assert at.select_slider[0].value == calibration["threshold"]


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
    assert metrics["Image threshold"] == fmt_score(info["calibration"]["threshold"])
    assert "no evaluation report" in texts(at)
    table = at.dataframe[0].value
    facts = dict(zip(table["property"], table["value"], strict=True))
    preprocessing = info["preprocessing"]
    assert facts["resize"] == preprocessing["aspect"]
    expected = preprocessing["padding"] if preprocessing["aspect"] == "pad" else "none"
    assert facts["padding"] == expected

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
        tables = [d.value for d in at.dataframe]
        facts = next(t for t in tables if "property" in t)
        confusion = next(t for t in tables if "flagged anomalous" in t)
        per_defect = next(t for t in tables if "defect_type" in t)
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
    facts = at.dataframe[0].value
    spread = facts.loc[facts["property"] == "threshold tail spread", "value"].tolist()
    assert spread == ["1.2"]  # the leave-one-out rule the model was fitted with


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


# --------------------------------------------------------------- fixes against a real API
def test_results_stay_when_the_api_drops(ui_env, monkeypatch) -> None:
    at = page("inspect_images").run()
    at.file_uploader[0].set_value(
        [(f"{i}.png", png(image), "image/png") for i, image in enumerate(texture_crops(2))]
    )
    at.run()
    at.button[0].click().run()
    assert len(at.dataframe[0].value) == 2
    monkeypatch.setenv("DEFECTSCOPE_API_URL", f"http://127.0.0.1:{free_port()}")
    at.select_slider[0].set_value(at.select_slider[0].value).run()  # a nudge: a rerun
    assert not at.exception, at.exception
    assert len(at.dataframe[0].value) == 2  # still there
    assert "Showing the last results" in texts(at)
    assert next(b for b in at.button if b.label.startswith("Review and save")).disabled


def test_switching_to_a_sample_set_forgets_the_uploads_results(
    ui_env, monkeypatch, tmp_path
) -> None:
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "000.png").write_bytes(png(texture_crops(1, seed=5)[0]))
    monkeypatch.setenv("DEFECTSCOPE_UI_SAMPLES", str(tmp_path))
    at = page("inspect_images").run()
    at.file_uploader[0].set_value([("up.png", png(texture_crops(1)[0]), "image/png")])
    at.run()
    at.button[0].click().run()
    assert list(at.dataframe[0].value["image"]) == ["up.png"]
    at.radio[0].set_value("Sample set").run()
    assert not at.dataframe and "Upload images or pick a sample set" in texts(at)


def test_sidebar_checks_the_key_on_an_authenticated_route(ui_env, monkeypatch) -> None:
    monkeypatch.delenv("DEFECTSCOPE_API_KEY")
    at = AppTest.from_file(str(UI / "app.py"), default_timeout=RUN_TIMEOUT).run()
    assert not at.exception, at.exception
    assert not at.sidebar.success
    assert "API key refused" in at.sidebar.error[0].value
    settings = UiSettings(ui_env, "ui-key", 60.0, None)
    assert connection_state(settings.client(quick=True), settings)[0] == "ok"


def test_a_hung_api_fails_fast_on_metadata(ui_env, monkeypatch) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("DEFECTSCOPE_API_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("DEFECTSCOPE_UI_TIMEOUT", "60")
        monkeypatch.setenv("DEFECTSCOPE_UI_QUICK_TIMEOUT", "1")
        started = time.monotonic()
        at = AppTest.from_file(str(UI / "app.py"), default_timeout=RUN_TIMEOUT).run()
        elapsed = time.monotonic() - started
    # Sidebar and page each waited the 1 s quick timeout, not the 60 s scoring one.
    assert elapsed < 10, elapsed
    shown = at.sidebar.error[0].value + at.error[0].value
    assert "did not answer within 1 s" in shown and "fewer images" not in shown


def test_drift_window_skips_a_bad_file(ui_env) -> None:
    window = [(f"{i}.png", png(image)) for i, image in enumerate(texture_crops(10, seed=81))]
    window.insert(4, ("broken.png", b"not an image at all"))
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        report, skipped = drift_skipping_bad(client, window)
    assert report["n_window"] == 10
    assert len(skipped) == 1 and skipped[0].startswith("broken.png: ")


def test_review_page_records_verdicts_and_moves_on(ui_env) -> None:
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        client.set_thresholds(image=1e-6)  # every new prediction is flagged
    predict_and_wait_for_the_log(ui_env, texture_crops(2, seed=95))
    at = page("review").run()
    assert not at.exception, at.exception
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        total = client.review_queue(scope="flagged", since=datetime.now(UTC).date())["total"]
    assert total >= 2
    assert f"{total} left of" in at.get("progress")[0].proto.text
    at.text_input(key="reviewer").set_value("Ana")
    first_id = int(
        next(m.value for m in at.markdown if m.value.startswith("**Prediction "))
        .split()[1]
        .strip("*")
    )
    note = next(t for t in at.text_input if t.key.startswith("review-note-"))
    note.set_value("glare, not a defect")
    at.button(key="review-false_alarm").click().run()
    assert not at.exception, at.exception
    assert f"{total - 1} left of" in at.get("progress")[0].proto.text
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        review = client.prediction(first_id)["review"]
    assert (review["verdict"], review["note"], review["reviewer"]) == (
        "false_alarm",
        "glare, not a defect",
        "Ana",
    )
    at.button(key="review-prev").click().run()  # back to it: its review is shown
    assert "Reviewed: **false alarm** by Ana" in texts(at)


def test_model_page_saves_a_threshold_after_confirmation_and_lists_it(ui_env) -> None:
    at = page("model").run()
    assert not at.exception, at.exception
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        stored = client.model_info()["calibration"]["threshold"]
    box = next(n for n in at.number_input if n.label.startswith("New image threshold"))
    assert box.value == stored
    assert at.button(key="threshold-save").disabled  # nothing changed yet
    box.set_value(stored * 0.5).run()
    assert "below the lowest good training score" in texts(at)
    at.text_input(key="threshold-reviewer").set_value("Ben")
    at.text_input(key="threshold-reason").set_value("trial")
    at.button(key="threshold-save").click().run()
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        assert client.model_info()["calibration"]["threshold"] == stored  # not yet
    at.button(key="threshold-confirm").click().run()
    assert not at.exception, at.exception
    with DefectscopeClient(ui_env, api_key="ui-key") as client:
        info = client.model_info()
    assert info["calibration"]["threshold"] == pytest.approx(stored * 0.5)
    last = info["threshold_audit"][-1]
    assert (last["who"], last["new"]) == ("Ben", pytest.approx(stored * 0.5))
    # The confirmation stays on the page after the rerun that follows the save.
    notice = f"Threshold saved to the model: {fmt_score(stored)} → {fmt_score(stored * 0.5)}."
    assert any(s.value.startswith(notice) for s in at.success), [s.value for s in at.success]
    audit = at.table[0].value
    assert "Ben" in set(audit["who"])
