"""Schema fuzzing of the REST API with schemathesis.

Every operation of the app's own OpenAPI schema gets generated requests, valid and invalid, in
process over ASGI against a small fitted model. Whatever arrives, the server must never answer
5xx, and every answer must be one the schema documents (status, content type, body). Fuzzed
uploads are almost never images, so ``/v1/predict`` is also called with a real image and the
fuzzed query (thresholds, render flags) to reach the model and the renderers.

Abuse that a schema cannot describe (unauthenticated or oversize bodies, chunked bodies without
end, half-sent requests, pixel-heavy images, concurrent threshold writes on several workers) is
tested against real server processes in test_hardening_server.py and test_hardening_workers.py.
"""

from __future__ import annotations

import copy
import io

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
schemathesis = pytest.importorskip("schemathesis")

from _images import texture_crops  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from defectscope.serving.app import create_app  # noqa: E402
from defectscope.serving.settings import ServingSettings  # noqa: E402

# Per operation (about 30 of them, some 450 requests in all, about 50 s on two busy cores).
MAX_EXAMPLES = 15
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def image_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(texture_crops(1, seed=11)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def app(fitted, tmp_path_factory):
    detector = copy.deepcopy(fitted)  # fuzzed writes must not reach the session's model
    log_dir = tmp_path_factory.mktemp("fuzz-log")
    app_settings = ServingSettings(
        model_path=None,
        prediction_log_url=f"sqlite:///{log_dir / 'predictions.db'}",
        max_upload_bytes=200_000,
        max_pixels=300 * 300,
        max_batch_images=4,
        batch_max_wait_ms=0,
    )
    return create_app(app_settings, detector=detector)


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
)
def test_no_server_error_and_responses_match_the_schema(case, image_png):
    case.call_and_validate(checks=CHECKS)
    if case.method == "POST" and case.path == "/v1/predict":
        # Same fuzzed query, real image: the model, thresholds and renderers run.
        response = case.call(
            headers={"content-type": None},
            files={"file": ("a.png", image_png, "image/png")},
            data=None,
            json=None,
        )
        assert response.status_code < 500, response.text
        case.validate_response(response, checks=CHECKS)


@pytest.mark.parametrize("threshold", [0.0, -1.0, 1e-300, -1e308, 1e308])
def test_extreme_thresholds_with_every_render_are_not_server_errors(app, image_png, threshold):
    # A zero or negative threshold gives the heatmap's colour scale (0 .. 2 x threshold) no
    # width; the answer may be odd pictures, never a 500.
    from fastapi.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(
            "/v1/predict",
            params={"threshold": threshold, "heatmap": True, "overlay": True, "mask": True},
            files={"file": ("a.png", image_png, "image/png")},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["threshold"] == threshold and 0.0 <= body["normalized_score"] <= 1.0
    assert body["heatmap_png"] and body["overlay_png"] and body["mask_png"]
