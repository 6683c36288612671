"""PUT /v1/model/thresholds and GET /v1/model/report: what the web UI saves and reads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

from _images import png, texture_crops, with_defect
from _models import copy_model
from _server import assert_json_error, settings_for, wait_ready
from fastapi.testclient import TestClient

from defectscope.detector.detector import Detector
from defectscope.serving.app import create_app

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture
def model_dir(texture_model_dir, tmp_path) -> Path:
    # A fresh copy per test: these tests rewrite the model file.
    return copy_model(texture_model_dir, tmp_path / "model")


def started(settings) -> TestClient:
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.__enter__()
    wait_ready(client.get)
    return client


def test_saved_thresholds_are_applied_persisted_and_followed_by_other_workers(
    model_dir, tmp_path
) -> None:
    settings = settings_for(model_dir, tmp_path, api_key="s3cret")
    # Two apps on one model file: what two `serve --workers 2` processes are.
    first, second = started(settings), started(settings)
    try:
        before = first.get("/v1/model", headers=KEY).json()
        old = before["calibration"]["threshold"]
        image = with_defect(texture_crops(1, seed=5)[0])[0]
        files = {"file": ("a.png", png(image), "image/png")}
        score = first.post("/v1/predict", files=files, headers=KEY).json()["score"]
        new = score * 1.5  # above this image's score: it must be judged good afterwards

        assert_json_error(first.put("/v1/model/thresholds", json={"image": new}), 401)
        response = first.put("/v1/model/thresholds", json={"image": new}, headers=KEY)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["calibration"]["threshold"] == pytest.approx(new)
        assert body["calibration"]["threshold_source"] == "ui"
        assert body["calibration"]["pixel_threshold"] == before["calibration"]["pixel_threshold"]
        assert body["model_fingerprint"] != before["model_fingerprint"]  # the file changed

        answer = first.post("/v1/predict", files=files, headers=KEY).json()
        assert answer["threshold"] == pytest.approx(new) and not answer["is_anomalous"]
        # Persisted: a fresh load of the file has it, the memory bank unchanged.
        reloaded = Detector.load(model_dir)
        assert reloaded.threshold == pytest.approx(new) and reloaded.threshold != old
        assert reloaded.calibration.threshold_source == "ui"

        # The other worker adopts it from the file within about a second.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            info = second.get("/v1/model", headers=KEY).json()
            if info["calibration"]["threshold"] == pytest.approx(new):
                break
            time.sleep(0.2)
        assert info["calibration"]["threshold"] == pytest.approx(new)
        assert info["model_fingerprint"] == body["model_fingerprint"]
        assert second.post("/v1/predict", files=files, headers=KEY).json()["is_anomalous"] is False

        pixel = first.put("/v1/model/thresholds", json={"pixel": 2.5}, headers=KEY).json()
        assert pixel["calibration"]["pixel_threshold"] == pytest.approx(2.5)
        assert pixel["calibration"]["threshold"] == pytest.approx(new)  # left as it was
    finally:
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)


@pytest.mark.parametrize(
    "body",
    [
        {"image": 0},
        {"image": -1.0},
        {"image": "NaN"},
        {"image": "Infinity"},
        {"image": "high"},
        {},
        {"image": None, "pixel": None},
        {"image": 1.0, "colour": "red"},
    ],
)
def test_bad_thresholds_are_422_and_change_nothing(model_dir, tmp_path, body) -> None:
    before = model_dir.joinpath("model.safetensors").read_bytes()
    with TestClient(
        create_app(settings_for(model_dir, tmp_path)), raise_server_exceptions=False
    ) as c:
        wait_ready(c.get)
        threshold = c.get("/v1/model").json()["calibration"]["threshold"]
        assert_json_error(c.put("/v1/model/thresholds", json=body), 422)
        assert c.get("/v1/model").json()["calibration"]["threshold"] == threshold
    assert model_dir.joinpath("model.safetensors").read_bytes() == before


def test_thresholds_that_cannot_be_persisted_are_409(
    fitted_copy, model_dir, tmp_path, monkeypatch
) -> None:
    # No model file behind the served detector (embedded use): nothing to persist to.
    app = create_app(settings_for(None, tmp_path), detector=fitted_copy)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c.get)
        detail = assert_json_error(c.put("/v1/model/thresholds", json={"image": 1.0}), 409)
        assert "no model file" in detail["detail"]
        assert fitted_copy.threshold != 1.0

    # The file cannot be written (a full disk; root ignores permissions, so simulate the write
    # error): the live thresholds stay as they were, so memory and file never disagree.
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with TestClient(
        create_app(settings_for(model_dir, tmp_path)), raise_server_exceptions=False
    ) as c:
        wait_ready(c.get)
        threshold = c.get("/v1/model").json()["calibration"]["threshold"]
        detail = assert_json_error(c.put("/v1/model/thresholds", json={"image": 9.0}), 409)
        assert "cannot save the model file" in detail["detail"]
        assert c.get("/v1/model").json()["calibration"]["threshold"] == threshold


def test_exported_model_thresholds_are_409(onnx_file, tmp_path) -> None:
    settings = settings_for(onnx_file, tmp_path, runtime="onnx")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        detail = assert_json_error(c.put("/v1/model/thresholds", json={"image": 1.0}), 409)
        assert "exported onnx model" in detail["detail"]


def test_report_next_to_the_model_or_from_report_dir(model_dir, tmp_path) -> None:
    settings = settings_for(model_dir, tmp_path)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        detail = assert_json_error(c.get("/v1/model/report"), 404)["detail"]
        assert "evaluate" in detail
        (model_dir / "report").mkdir()
        metrics = {"metrics": {"image_auroc": 0.97}, "per_defect": {}}
        (model_dir / "report" / "metrics.json").write_text(json.dumps(metrics))
        body = c.get("/v1/model/report").json()
        assert body["report"] == metrics and body["source"] == str(model_dir / "report")
        (model_dir / "report" / "metrics.json").write_text("{not json")
        assert "unreadable" in assert_json_error(c.get("/v1/model/report"), 404)["detail"]

    elsewhere = tmp_path / "evaluation"
    elsewhere.mkdir()
    (elsewhere / "metrics.json").write_text(json.dumps({"metrics": {"image_auroc": 1.0}}))
    settings = settings_for(model_dir, tmp_path, report_dir=elsewhere)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        report = c.get("/v1/model/report").json()["report"]
        assert report["metrics"]["image_auroc"] == pytest.approx(1.0)
