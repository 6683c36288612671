"""REST serving: routes, limits, errors, micro-batching, prediction log, metrics."""

from __future__ import annotations

import asyncio
import base64
import csv
import hashlib
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from _images import FAST_CONFIG, free_port, png, texture_crops, with_defect  # noqa: E402
from _server import (  # noqa: E402
    MAX_UPLOAD,
    assert_json_error,
    settings_for,
    wait_ready,
)
from fastapi.testclient import TestClient  # noqa: E402

from defectscope.detector.detector import Detector  # noqa: E402
from defectscope.serving.app import create_app  # noqa: E402
from defectscope.serving.batching import MicroBatcher  # noqa: E402
from defectscope.serving.settings import ServingSettings  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    detector = Detector(FAST_CONFIG).fit(texture_crops(8, seed=0))
    out = tmp_path_factory.mktemp("model")
    detector.save(out)
    return out


@pytest.fixture(scope="module")
def reference(model_dir) -> Detector:
    return Detector.load(model_dir)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    good = texture_crops(6, seed=7)
    return [*good, with_defect(good[0])[0], with_defect(good[1], seed=3)[0]]


@contextmanager
def client_for(settings: ServingSettings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        wait_ready(client.get)
        yield client


@pytest.fixture(scope="module")
def client(model_dir, tmp_path_factory) -> Iterator[TestClient]:
    with client_for(settings_for(model_dir, tmp_path_factory.mktemp("log"))) as c:
        yield c


# ------------------------------------------------------------------------------- predict
def test_predict_multipart_and_base64_match_the_detector(client, reference, images):
    for image in (images[0], images[-1]):
        expected = reference.predict(image)[0]
        data = png(image)
        by_file = client.post("/v1/predict", files={"file": ("x.bin", data, "text/plain")})
        by_json = client.post("/v1/predict", json={"image_base64": base64.b64encode(data).decode()})
        for response in (by_file, by_json):
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["score"] == pytest.approx(expected.score, rel=1e-5)
            assert body["normalized_score"] == pytest.approx(expected.normalized_score, rel=1e-5)
            assert body["is_anomalous"] == expected.is_anomalous
            assert body["threshold"] == pytest.approx(reference.threshold)
            assert (body["width"], body["height"]) == (128, 128)
            assert body["model_fingerprint"] and body["timing_ms"]["total_ms"] > 0
            assert body["heatmap_png"] is None
    assert response.headers["x-request-id"]


def test_threshold_override_flips_the_decision(client, images):
    data = {"file": ("a.png", png(images[0]), "image/png")}
    score = client.post("/v1/predict", files=data).json()["score"]
    low = client.post("/v1/predict", params={"threshold": score / 2}, files=data).json()
    high = client.post("/v1/predict", params={"threshold": score * 2}, files=data).json()
    assert low["is_anomalous"] and low["threshold"] == pytest.approx(score / 2)
    assert not high["is_anomalous"] and high["normalized_score"] < 0.5 < low["normalized_score"]


def test_heatmap_overlay_and_mask_pngs(client, images):
    response = client.post(
        "/v1/predict",
        params={"heatmap": "true", "overlay": "true", "mask": "true"},
        files={"file": ("a.png", png(images[-1]), "image/png")},
    )
    body = response.json()
    for key in ("heatmap_png", "overlay_png", "mask_png"):
        decoded = Image.open(io.BytesIO(base64.b64decode(body[key])))
        assert decoded.size == (128, 128)


def test_batch_gives_a_corrupt_item_its_own_error(client, reference, images):
    files = [
        ("files", ("good.png", png(images[2]), "image/png")),
        ("files", ("broken.png", b"definitely not an image", "image/png")),
        ("files", ("bad.png", png(images[-1]), "image/png")),
    ]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["n_ok"], body["n_failed"]) == (2, 1)
    items = body["items"]
    assert items[1]["filename"] == "broken.png" and items[1]["result"] is None
    assert (
        items[1]["error"]["status"] == 415 and "not a readable image" in items[1]["error"]["detail"]
    )
    expected = reference.predict([images[2], images[-1]])
    for item, prediction in zip((items[0], items[2]), expected, strict=True):
        assert item["error"] is None
        assert item["result"]["score"] == pytest.approx(prediction.score, rel=1e-5)


# ------------------------------------------------------------------------------- errors
def test_bad_input_gives_json_errors_without_tracebacks(client, images):
    post = client.post
    noise = np.random.default_rng(0).integers(0, 256, MAX_UPLOAD + 10, dtype=np.uint8).tobytes()
    assert_json_error(post("/v1/predict", files={"file": ("a.png", noise)}), 413)
    assert_json_error(post("/v1/predict", files={"file": ("a.png", noise * 3)}), 413)
    big = np.zeros((400, 400, 3), dtype=np.uint8)
    assert (
        "over the limit"
        in assert_json_error(post("/v1/predict", files={"file": ("big.png", png(big))}), 413)[
            "detail"
        ]
    )
    assert_json_error(post("/v1/predict", files={"file": ("a.png", b"GIF? no, text")}), 415)
    truncated = png(images[0])[:400]
    assert (
        "corrupt"
        in assert_json_error(post("/v1/predict", files={"file": ("a.png", truncated)}), 422)[
            "detail"
        ]
    )
    assert_json_error(post("/v1/predict", files={"other": ("a.png", png(images[0]))}), 422)
    assert_json_error(post("/v1/predict", json={"image_base64": "***"}), 422)
    assert_json_error(post("/v1/predict", json={"wrong": "x"}), 422)
    assert_json_error(post("/v1/predict", content=b"x", headers={"content-type": "text/csv"}), 415)
    assert_json_error(post("/v1/predict", content=b""), 422)
    good = {"file": ("a.png", png(images[0]))}
    assert_json_error(post("/v1/predict", params={"threshold": "abc"}, files=good), 422)
    assert_json_error(post("/v1/predict", params={"heatmap": "maybe"}, files=good), 422)
    assert_json_error(post("/v1/predict/batch", data={"x": "1"}), 422)
    many = [("files", ("a.png", png(images[0]))) for _ in range(5)]
    assert_json_error(post("/v1/predict/batch", files=many), 413)
    assert_json_error(client.get("/v1/nope"), 404)
    assert_json_error(client.get("/v1/predictions", params={"limit": 0}), 422)


def test_unexpected_exception_is_a_500_with_request_id(client, images, monkeypatch):
    detector = client.app.state.serving.detector

    def boom(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(detector, "predict", boom)
    response = client.post("/v1/predict", files={"file": ("a.png", png(images[0]))})
    body = assert_json_error(response, 500)
    assert body["detail"] == "internal error" and body["request_id"]
    assert "secret internals" not in response.text
    assert response.headers["x-request-id"] == body["request_id"]


def test_slow_model_gives_504_and_the_server_keeps_serving(model_dir, tmp_path, images):
    with client_for(settings_for(model_dir, tmp_path, request_timeout_s=0.2)) as c:
        detector = c.app.state.serving.detector
        fast_predict = detector.predict

        def slow(*args, **kwargs):
            time.sleep(0.6)
            return fast_predict(*args, **kwargs)

        detector.predict = slow
        try:
            body = assert_json_error(
                c.post("/v1/predict", files={"file": ("a.png", png(images[0]))}), 504
            )
            assert "did not answer within 0.2 s" in body["detail"]
        finally:
            detector.predict = fast_predict
        time.sleep(0.6)  # let the abandoned batch finish
        ok = c.post("/v1/predict", files={"file": ("a.png", png(images[0]))})
        assert ok.status_code == 200


def test_heatmap_colour_scale_ignores_a_zero_threshold_override(client, images):
    params = {"threshold": 0, "heatmap": "true"}
    response = client.post("/v1/predict", params=params, files={"file": ("a.png", png(images[0]))})
    assert response.status_code == 200 and response.json()["is_anomalous"]
    heatmap = Image.open(io.BytesIO(base64.b64decode(response.json()["heatmap_png"])))
    # A degenerate 0..0 scale would paint everything one colour.
    assert np.asarray(heatmap).reshape(-1, 3).std(axis=0).max() > 5


def test_api_key(model_dir, tmp_path):
    with client_for(settings_for(model_dir, tmp_path, api_key="s3cret")) as c:
        assert_json_error(c.get("/v1/model"), 401)
        assert_json_error(c.get("/v1/model", headers={"X-API-Key": "wrong"}), 401)
        assert_json_error(c.get("/metrics"), 401)
        assert c.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200


def test_not_ready_without_a_model(tmp_path):
    settings = ServingSettings(model_path=None, prediction_log_url=None)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert_json_error(c.post("/v1/predict", json={"image_base64": "AAAA"}), 503)
        assert_json_error(c.get("/v1/predictions"), 404)


def test_model_route_leaves_out_bulky_lists(client, reference):
    body = client.get("/v1/model").json()
    assert body["backbone"]["name"] == reference.describe()["backbone"]["name"]
    assert body["calibration"]["threshold"] == pytest.approx(reference.threshold)
    assert "good_scores" not in body["calibration"]
    assert "good_pixel_maxima" not in body["calibration"]


# ------------------------------------------------------------------------- prediction log
def test_prediction_log_is_written_and_queryable(model_dir, tmp_path, images):
    with client_for(settings_for(model_dir, tmp_path)) as c:
        data = [png(images[0]), png(images[-1]), png(images[1])]
        scores = [c.post("/v1/predict", files={"file": ("a", d)}).json() for d in data]
        c.post("/v1/predict/batch", files=[("files", ("b", data[0]))])
        page = c.get("/v1/predictions").json()
        assert page["total"] == 4 and len(page["items"]) == 4
        oldest_first = page["items"][::-1]
        assert oldest_first[0]["image_sha256"] == hashlib.sha256(data[0]).hexdigest()
        assert oldest_first[1]["score"] == pytest.approx(scores[1]["score"])
        assert oldest_first[3]["route"] == "/v1/predict/batch"
        row = oldest_first[0]
        assert (row["width"], row["height"]) == (128, 128) and row["latency_ms"] > 0
        assert row["model_fingerprint"] == scores[0]["model_fingerprint"]
        assert datetime.fromisoformat(row["created_at"]).utcoffset() == timedelta(0)
        n_bad = sum(s["is_anomalous"] for s in scores) + scores[0]["is_anomalous"]
        assert c.get("/v1/predictions?is_anomalous=true").json()["total"] == n_bad
        assert c.get("/v1/predictions?since=2999-01-01T00:00:00Z").json()["total"] == 0
        assert c.get("/v1/predictions?until=2000-01-01T00:00:00Z").json()["total"] == 0
        assert (
            c.get("/v1/predictions", params={"since": "2000-01-01T00:00:00+02:00"}).json()["total"]
            == 4
        )
        paged = c.get("/v1/predictions?limit=1&offset=1").json()
        assert len(paged["items"]) == 1 and paged["items"][0]["id"] == page["items"][1]["id"]
        exported = c.get("/v1/predictions.csv")
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert len(rows) == 4 and rows[0]["image_sha256"] == row["image_sha256"]

        def fail(records):
            raise RuntimeError("disk full")

        monkey = c.app.state.serving.repository
        monkey.add_many = fail  # a failing log must not fail the request
        assert c.post("/v1/predict", files={"file": ("a", data[0])}).status_code == 200


# ------------------------------------------------------------------------------- metrics
def test_metrics_names(client, images):
    client.post("/v1/predict", files={"file": ("a.png", png(images[0]))})
    text = client.get("/metrics").text
    for name in (
        "defectscope_http_requests_total",
        "defectscope_http_request_duration_seconds_bucket",
        "defectscope_batch_size_bucket",
        "defectscope_normalized_score_bucket",
        "defectscope_anomalies_total",
        "defectscope_model_info",
    ):
        assert name in text
    assert 'route="/v1/predict"' in text and 'status="200"' in text


# --------------------------------------------------------------------- micro-batching
def test_microbatcher_groups_requests_and_keeps_thresholds_apart():
    calls: list[tuple[int, float | None]] = []

    def predict(batch, threshold):
        calls.append((len(batch), threshold))
        return [(float(image[0, 0, 0]), threshold) for image in batch]

    async def main():
        batcher = MicroBatcher(predict, max_size=8, max_wait_ms=50)
        await batcher.start()
        try:
            arrays = [np.full((2, 2, 3), i, dtype=np.uint8) for i in range(6)]
            thresholds = [None, None, 1.0, None, 1.0, None]
            return await asyncio.gather(
                *(batcher.submit(a, t) for a, t in zip(arrays, thresholds, strict=True))
            ), thresholds
        finally:
            await batcher.stop()

    results, thresholds = asyncio.run(main())
    assert results == [(float(i), t) for i, t in enumerate(thresholds)]
    assert sorted(calls, key=str) == sorted([(4, None), (2, 1.0)], key=str)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory) -> Iterator[tuple[str, object]]:
    """A real uvicorn server on a free localhost port, in a background thread."""
    settings = settings_for(model_dir, tmp_path_factory.mktemp("srv"), batch_max_wait_ms=50)
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(base_url=url) as http:
        wait_ready(http.get)
    yield url, app
    instance.should_exit = True
    thread.join(timeout=10)


def test_real_http_predict_health_metrics(server, reference, images):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        response = http.post("/v1/predict", files={"file": ("a.png", png(images[3]))})
        assert response.status_code == 200
        expected = reference.predict(images[3])[0].score
        assert response.json()["score"] == pytest.approx(expected, rel=1e-5)
        assert_json_error(http.get("/nowhere"), 404)
        assert "defectscope_http_requests_total" in http.get("/metrics").text


def test_concurrent_requests_are_microbatched_and_each_gets_its_own_result(
    server, reference, images
):
    url, app = server
    expected = [p.score for p in reference.predict(images)]
    registry = app.state.serving.metrics.registry

    def batches_over_one() -> float:
        total = registry.get_sample_value("defectscope_batch_size_count") or 0.0
        ones = registry.get_sample_value("defectscope_batch_size_bucket", {"le": "1.0"}) or 0.0
        return total - ones

    before = batches_over_one()

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            return await asyncio.gather(
                *(http.post("/v1/predict", files={"file": ("x.png", png(im))}) for im in images)
            )

    responses = asyncio.run(main())
    scores = [r.json()["score"] for r in responses]
    assert scores == pytest.approx(expected, rel=1e-5)
    assert batches_over_one() > before


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFECTSCOPE_MODEL_PATH", str(tmp_path))
    monkeypatch.setenv("DEFECTSCOPE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("DEFECTSCOPE_PREDICTION_LOG_URL", "none")
    monkeypatch.setenv("DEFECTSCOPE_BATCH_MAX_WAIT_MS", "12.5")
    settings = ServingSettings()
    assert settings.model_path == tmp_path
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.prediction_log_url is None and settings.batch_max_wait_ms == 12.5
    assert ServingSettings().max_upload_bytes == 20 * 1024 * 1024


def test_serves_an_exported_onnx_model_with_the_same_scores(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from defectscope.export import export_onnx

    detector = Detector(FAST_CONFIG).fit(texture_crops(8))
    exported = export_onnx(detector, tmp_path / "model.onnx")
    settings = ServingSettings(model_path=exported, prediction_log_url=None)
    image = texture_crops(1, seed=42)[0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    with TestClient(create_app(settings)) as client:
        for _ in range(100):  # the model loads in the background
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        response = client.post("/v1/predict", files={"file": ("a.png", buffer.getvalue())})
    assert response.status_code == 200, response.text
    expected = detector.predict(image)[0].score
    assert response.json()["score"] == pytest.approx(expected, rel=1e-4)


def test_two_worker_processes_report_summed_metrics(model_dir, tmp_path, images):
    import os
    import re
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    env = {
        **os.environ,
        "DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{tmp_path / 'log.db'}",
        "DEFECTSCOPE_BATCH_MAX_WAIT_MS": "0",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "defectscope.cli", "serve", str(model_dir), "--port", str(port),
           "--workers", "2"]  # fmt: skip
    process = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        ready = 0
        while ready < 8 and time.monotonic() < deadline:  # both workers must have loaded
            try:
                ready = ready + 1 if httpx.get(f"{url}/readyz").status_code == 200 else 0
            except httpx.TransportError:
                ready = 0
            time.sleep(0.2)
        assert ready >= 8, "server did not become ready"
        answered = 0
        while answered < 6:  # /readyz may have reached one worker only: the other may still load
            response = httpx.post(f"{url}/v1/predict", files={"file": ("a.png", png(images[0]))})
            if response.status_code == 503 and "still loading" in response.text:
                assert time.monotonic() < deadline, "a worker never loaded the model"
                time.sleep(0.2)
                continue
            assert response.status_code == 200, response.text
            answered += 1
        for _ in range(4):  # whichever worker answers, the counts are the sum over both
            text = httpx.get(f"{url}/metrics").text
            total = re.search(r"^defectscope_predictions_total (\S+)$", text, re.MULTILINE)
            assert total and float(total.group(1)) == 6.0
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def test_prediction_log_query_bounds_are_validated(client):
    # Found by schemathesis: an offset past SQL's integer range was a 500 from the database.
    assert_json_error(client.get("/v1/predictions", params={"offset": 2**70}), 422)
    assert client.get("/v1/predictions", params={"offset": 2**62}).status_code == 200
