"""POST /v1/drift/images: a window of uploaded images gets the score tests and
the feature test (MMD) that the prediction log cannot give, for the UI's Drift page."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

from _images import png, texture_crops
from _server import assert_json_error, settings_for, wait_ready
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


def upload(client: TestClient, images: list[np.ndarray | bytes]):
    files = [
        ("files", (f"{i}.png", image if isinstance(image, bytes) else png(image), "image/png"))
        for i, image in enumerate(images)
    ]
    return client.post("/v1/drift/images", files=files)


def test_feature_test_on_uploaded_windows(client) -> None:
    good = upload(client, texture_crops(12, seed=21))
    assert good.status_code == 200, good.text
    body = good.json()
    assert body["n_window"] == 12 and body["window"] == {"images": 12}
    assert set(body["tests"]) >= {"score_ks", "feature_mmd"}
    assert body["verdict"] != "drift", body

    darker = [A.brightness(image, 0.3) for image in texture_crops(12, seed=22)]
    body = upload(client, darker).json()
    assert body["verdict"] == "drift", body
    assert body["tests"]["feature_mmd"]["p_value"] < 0.01
    # Not logged: a drift check is no prediction.
    assert client.get("/v1/predictions").json()["total"] == 0


def test_bad_windows_are_clear_4xx(client) -> None:
    assert "too small" in assert_json_error(upload(client, texture_crops(4)), 422)["detail"]
    images = [*texture_crops(11), b"not an image"]
    assert "11.png" in assert_json_error(upload(client, images), 415)["detail"]
    assert_json_error(upload(client, texture_crops(17)), 413)
    assert_json_error(client.post("/v1/drift/images"), 422)
    # A multipart body that cannot be parsed (schemathesis found it): a documented JSON 400.
    broken = client.post(
        "/v1/drift/images",
        content=b"--b\r\n[{}, {'x': None}]--b--\r\n",
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert "multipart" in assert_json_error(broken, 400)["detail"].lower()
    documented = client.get("/openapi.json").json()["paths"]["/v1/drift/images"]["post"]
    assert "400" in documented["responses"]


def test_model_without_reference_is_409(texture_model_dir, tmp_path) -> None:
    detector = Detector.load(texture_model_dir)
    detector.info.reference = None
    app = create_app(
        settings_for(texture_model_dir, tmp_path, max_batch_images=16), detector=detector
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c.get)
        detail = assert_json_error(upload(c, texture_crops(10)), 409)["detail"]
    assert "refit" in detail
