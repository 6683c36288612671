"""BentoML service: a real `defectscope bento` server, adaptive batching, same scores."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip(
    "bentoml", reason="bentoml is not installed (pip install 'defectscope[bentoml]')"
)
httpx = pytest.importorskip("httpx")

from _images import free_port, png, texture_crops, with_defect  # noqa: E402
from _models import copy_model  # noqa: E402

from defectscope.detector.detector import Detector  # noqa: E402

START_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def detector(fitted, texture_model_dir, tmp_path_factory) -> tuple[Detector, Path]:
    """The session's model, and a folder of this module's own holding its model file."""
    return fitted, copy_model(texture_model_dir, tmp_path_factory.mktemp("bento_model"))


@contextmanager
def bento_server(model: Path, runtime: str, tmp: Path) -> Iterator[str]:
    """`defectscope bento MODEL` for real, in its own process group so that every BentoML worker
    it spawns is stopped with it."""
    port = free_port()
    log_path = tmp / "serve.log"
    env = {
        **os.environ,
        "BENTOML_HOME": str(tmp / "bentoml_home"),
        "DEFECTSCOPE_BENTO_MAX_LATENCY_MS": "500",
    }
    command = [sys.executable, "-m", "defectscope.cli", "bento", str(model)]
    command += ["--port", str(port), "--runtime", runtime]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"bentoml serve exited early:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"bentoml serve not ready in {START_TIMEOUT_S} s:\n"
                    + log_path.read_text()[-3000:]
                )
            time.sleep(0.25)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(detector, tmp_path_factory) -> Iterator[str]:
    _, folder = detector
    with bento_server(folder, "torch", tmp_path_factory.mktemp("bento_torch")) as url:
        yield url


def batch_sizes(url: str) -> tuple[float, float]:
    """(number of model calls, images in them) from BentoML's adaptive-batch histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    count = total = 0.0
    for line in text.splitlines():
        match = re.match(r'\w*adaptive_batch_size_(count|sum)\{[^}]*method_name="predict"', line)
        if match:
            value = float(line.rsplit(" ", 1)[1])
            count, total = (value, total) if match[1] == "count" else (count, value)
    return count, total


def test_concurrent_requests_are_batched_and_match_the_detector(server, detector):
    reference, _ = detector
    good = texture_crops(6, seed=21)
    images = [*good, with_defect(good[0])[0], with_defect(good[1], seed=4)[0]]
    expected = reference.predict(images)
    calls_before, images_before = batch_sizes(server)

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/predict", files=[("images", (f"{i}.png", png(im), "image/png"))])
                    for i, im in enumerate(images)
                )
            )

    responses = asyncio.run(post_all())
    for response, prediction in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        (body,) = response.json()
        assert body["score"] == pytest.approx(prediction.score, rel=1e-5)
        assert body["normalized_score"] == pytest.approx(prediction.normalized_score, rel=1e-5)
        assert body["is_anomalous"] == prediction.is_anomalous
        assert body["threshold"] == pytest.approx(prediction.threshold)
        assert body["pixel_threshold"] == pytest.approx(prediction.pixel_threshold)
        assert body["defect_area_fraction"] == pytest.approx(
            prediction.summary()["defect_area_fraction"]
        )
    calls, n_images = batch_sizes(server)
    assert n_images - images_before == len(images)
    # Adaptive batching grouped some of the concurrent requests into one model call.
    assert calls - calls_before < len(images)


def test_several_images_in_one_request(server, detector):
    reference, _ = detector
    images = texture_crops(2, seed=33)
    files = [("images", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(images)]
    response = httpx.post(f"{server}/v1/predict", files=files, timeout=60)
    assert response.status_code == 200, response.text
    scores = [item["score"] for item in response.json()]
    assert scores == pytest.approx([p.score for p in reference.predict(images)], rel=1e-5)


def test_bad_image_is_a_4xx_with_a_message(server):
    response = httpx.post(
        f"{server}/v1/predict",
        files=[("images", ("x.png", b"not an image", "image/png"))],
        timeout=30,
    )
    assert 400 <= response.status_code < 500
    assert "not a readable image" in response.text
    assert "Traceback" not in response.text
    missing = httpx.post(f"{server}/v1/predict", files=[("other", ("x.png", b"x"))], timeout=30)
    assert 400 <= missing.status_code < 500


def test_model_and_health(server, detector):
    reference, folder = detector
    model = httpx.post(f"{server}/v1/model", json={}, timeout=30)
    assert model.status_code == 200
    body = model.json()
    assert body["calibration"]["threshold"] == pytest.approx(reference.threshold)
    assert "good_scores" not in body["calibration"]
    health = httpx.post(f"{server}/v1/health", json={}, timeout=30).json()
    assert health["status"] == "ok" and health["runtime"] == "torch"
    assert health["model_path"] == str(folder.resolve())
    assert httpx.get(f"{server}/livez", timeout=10).status_code == 200


def test_onnx_runtime_serves_the_same_scores(detector, onnx_file, tmp_path):
    reference, _ = detector  # onnx_file is its export
    image = texture_crops(1, seed=42)[0]
    with bento_server(onnx_file, "onnx", tmp_path) as url:
        files = [("images", ("a.png", png(image), "image/png"))]
        response = httpx.post(f"{url}/v1/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        health = httpx.post(f"{url}/v1/health", json={}, timeout=30).json()
    assert health["runtime"] == "onnx"
    assert response.json()[0]["score"] == pytest.approx(reference.predict(image)[0].score, rel=1e-4)


def test_cli_refuses_a_missing_model(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", "bento", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "nope" in done.stderr
