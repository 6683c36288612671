"""GET /v1/drift: score drift over the prediction log, errors and Prometheus gauges."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from _images import png, texture_crops
from _server import settings_for, wait_ready
from fastapi.testclient import TestClient

from defectscope.data import augment as A
from defectscope.detector.detector import Detector
from defectscope.serving.app import create_app


@pytest.fixture(scope="module")
def client(texture_model_dir, tmp_path_factory) -> Iterator[TestClient]:
    settings = settings_for(texture_model_dir, tmp_path_factory.mktemp("log"), max_batch_images=16)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        yield c


def post_all(client: TestClient, images: list[np.ndarray]) -> None:
    files = [("files", (f"{i}.png", png(image), "image/png")) for i, image in enumerate(images)]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200 and response.json()["n_failed"] == 0, response.text


def test_drift_verdicts_errors_and_gauges(client) -> None:
    good = texture_crops(16, seed=21)
    post_all(client, good[:4])
    response = client.get("/v1/drift")
    assert response.status_code == 422 and "too small" in response.json()["detail"]

    post_all(client, good[4:])
    body = client.get("/v1/drift").json()
    assert body["verdict"] != "drift", body
    assert body["n_window"] == 16
    assert set(body["tests"]) >= {"score_ks", "score_psi", "alarm_rate"}
    assert "feature_mmd" not in body["tests"] and body["feature_test"].startswith("not run")
    assert body["window"]["first"] <= body["window"]["last"]
    metrics = client.get("/metrics").text
    assert "defectscope_drift_verdict" in metrics
    assert "defectscope_drift_score_p_value" in metrics

    start = datetime.now(UTC)
    post_all(client, [A.brightness(image, 0.3) for image in texture_crops(16, seed=22)])
    body = client.get("/v1/drift", params={"since": start.isoformat()}).json()
    assert body["verdict"] == "drift", body
    assert body["n_window"] == 16
    assert body["tests"]["score_ks"]["p_value"] < 0.001
    assert "defectscope_drift_verdict 2.0" in client.get("/metrics").text

    # limit takes the newest rows: the darkened ones only.
    assert client.get("/v1/drift", params={"limit": 12}).json()["verdict"] == "drift"
    assert client.get("/v1/drift", params={"limit": 1}).status_code == 422


def test_model_without_reference_is_409(texture_model_dir, tmp_path) -> None:
    detector = Detector.load(texture_model_dir)
    detector.info.reference = None
    app = create_app(settings_for(texture_model_dir, tmp_path), detector=detector)
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c.get)
        response = c.get("/v1/drift")
    assert response.status_code == 409 and "refit" in response.json()["detail"]


def test_drift_cli_reads_the_prediction_log(client, texture_model_dir) -> None:
    # Runs after the API test above, whose newest 16 logged predictions are darkened images.
    import subprocess
    import sys

    url = client.app.state.serving.settings.prediction_log_url

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "defectscope.cli", "drift", str(texture_model_dir), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=300)

    proc = cli("--log", url, "--limit", "12", "--fail-on", "drift")
    assert proc.returncode == 1 and "verdict: drift" in proc.stdout, proc.stdout + proc.stderr
    assert "12 logged predictions" in proc.stdout
    bad = cli("--log", url, "--since", "yesterday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr and "Traceback" not in bad.stderr
    neither = cli()
    assert neither.returncode == 2 and "either --images or --log" in neither.stderr
