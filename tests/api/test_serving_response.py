"""The /v1/predict answer, field by field: what the detector says about the same bytes, the
model's identity, and pictures only when asked (the fast path must not change a response)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

from _images import png, texture_crops, with_defect
from _server import settings_for, wait_ready
from fastapi.testclient import TestClient

from defectscope.detector.detector import Detector
from defectscope.serving.app import create_app
from defectscope.serving.pictures import png_base64
from defectscope.visualize import render_prediction

FIELDS = {
    "score",
    "normalized_score",
    "is_anomalous",
    "label",
    "threshold",
    "pixel_threshold",
    "defect_area_fraction",
    "height",
    "width",
    "model_version",
    "model_fingerprint",
    "served_version",
    "prediction_id",
    "timing_ms",
    "heatmap_png",
    "overlay_png",
    "mask_png",
}


@pytest.fixture(scope="module")
def model_dir(texture_model_dir: Path) -> Path:
    """The session's quick model on disk (conftest.py), served read-only here."""
    return texture_model_dir


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    app = create_app(settings_for(model_dir, tmp_path_factory.mktemp("log")))
    with TestClient(app) as test_client:
        wait_ready(test_client.get)
        yield test_client


def test_answer_equals_the_detector_on_the_same_bytes(client: TestClient, model_dir: Path) -> None:
    reference = Detector.load(model_dir)
    images = [texture_crops(1, seed=5)[0], with_defect(texture_crops(1, seed=6)[0])[0]]
    for image in images:
        data = png(image)
        expected = reference.predict(data)[0]
        body = client.post("/v1/predict", files={"file": ("x.png", data, "image/png")}).json()
        assert set(body) == FIELDS
        summary = expected.summary()
        for key in ("is_anomalous", "label", "threshold", "pixel_threshold", "height", "width"):
            assert body[key] == summary[key], key
        for key in ("score", "normalized_score", "defect_area_fraction"):
            assert body[key] == pytest.approx(summary[key], rel=1e-6, abs=1e-9), key
        assert body["defect_area_fraction"] == expected.mask.mean()
        assert len(body["model_fingerprint"]) == 16
        assert set(body["timing_ms"]) == {"decode_ms", "inference_ms", "model_ms", "total_ms"}
        assert body["heatmap_png"] is None and body["overlay_png"] is None
        assert body["mask_png"] is None

        asked = client.post(
            "/v1/predict",
            params={"heatmap": True, "overlay": True, "mask": True},
            files={"file": ("x.png", data, "image/png")},
        ).json()
        pictures = render_prediction(expected, image, reference.threshold)
        for name in ("heatmap", "overlay", "mask"):
            assert asked[f"{name}_png"] == png_base64(pictures[name]), name
