"""Abuse of a real `defectscope serve` process: bodies, sockets, pixels, dates, the API contract.

Every test talks to the server over TCP, as a hostile client or a careless script would; raw
sockets where an HTTP library would hide the point (a body announced but never sent, a chunked
body without end, a request that stops half way).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("psutil")
httpx = pytest.importorskip("httpx")

from _images import png, texture_crops  # noqa: E402
from _models import copy_model, rewritten_model  # noqa: E402
from _server import (  # noqa: E402
    AUTH,
    Server,
    connect,
    read_response,
    request_head,
    send_chunked_until_answered,
    served,
)
from PIL import Image  # noqa: E402

MAX_UPLOAD = 1_000_000
SINGLE_LIMIT = MAX_UPLOAD * 4 // 3 + 64 * 1024  # base64 and multipart framing allowed for
BATCH_LIMIT = 3_000_000
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(texture_model_dir, tmp_path_factory) -> Iterator[Server]:
    """One worker, small byte limits and a 1 s read timeout; default pixel limits."""
    log = tmp_path_factory.mktemp("abuse-log") / "predictions.db"
    env = {
        "DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{log}",
        "DEFECTSCOPE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "DEFECTSCOPE_MAX_REQUEST_BYTES": str(BATCH_LIMIT),
        "DEFECTSCOPE_READ_TIMEOUT_S": "1",
        "DEFECTSCOPE_BODY_TIMEOUT_S": "5",
    }
    # A copy: a regression that saved a threshold must not change the session's shared model.
    model = copy_model(texture_model_dir, tmp_path_factory.mktemp("abuse-model"))
    with served(model, env) as running:
        yield running


class PeakMemory:
    """The server's peak resident memory above where it started, sampled every few ms."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = self.server.rss()
        self._stop = False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.server.rss())
            time.sleep(0.003)

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def pattern_png(side: int, seed: int = 0) -> bytes:
    """A large image that compresses to a small file (the cheap upload that costs the most)."""
    image = np.zeros((side, side, 3), np.uint8)
    image[seed::7, ::5] = (200, 120, 40)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def assert_refused(response, status: int) -> dict:
    assert response.status == status, response
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["detail"] and "Traceback" not in body["detail"]
    return body


# ----------------------------------------------------------------- bodies before the key
@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("PUT", "/v1/model/thresholds", {"Content-Type": "application/json",
                                         "Content-Length": "200000000"}),
        ("POST", "/v1/predict/batch", {"Content-Type": "multipart/form-data; boundary=b",
                                       "Transfer-Encoding": "chunked"}),
        ("POST", "/v1/drift/images", {"Content-Type": "multipart/form-data; boundary=b",
                                      "Content-Length": "1000000000", "Expect": "100-continue"}),
        ("POST", "/v1/predict", {"Content-Type": "application/json",
                                 "Transfer-Encoding": "chunked"}),
    ],
)  # fmt: skip
def test_unauthenticated_bodies_are_refused_before_a_byte_is_read(
    server, method, path, headers
) -> None:
    # Only the headers are sent: the 401 must come without the server waiting for the body.
    with connect(server.port) as sock:
        sock.sendall(request_head(method, path, headers))
        response = read_response(sock, timeout=5)
    body = assert_refused(response, 401)
    assert body["request_id"] and response.headers["x-request-id"] == body["request_id"]
    assert response.headers["connection"] == "close" and response.closed
    assert b"100 Continue" not in response.body  # the client was never invited to send it


def test_declared_oversize_bodies_are_413_before_reading(server) -> None:
    cases = [
        ("POST", "/v1/predict", "application/json", 10**9),
        ("POST", "/v1/predict/batch", "multipart/form-data; boundary=b", BATCH_LIMIT + 1),
        ("PUT", "/v1/model/thresholds", "application/json", 10**6),
    ]
    for method, path, content_type, size in cases:
        with connect(server.port) as sock:
            head = {**AUTH, "Content-Type": content_type, "Content-Length": str(size)}
            sock.sendall(request_head(method, path, head))
            response = read_response(sock, timeout=5)
        assert "over the limit" in assert_refused(response, 413)["detail"], path
        assert response.closed


@pytest.mark.parametrize(
    ("path", "content_type", "first", "limit"),
    [
        ("/v1/predict", "application/json", b'{"image_base64": "', SINGLE_LIMIT),
        ("/v1/predict/batch", "multipart/form-data; boundary=b",
         b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n',
         BATCH_LIMIT),
    ],
)  # fmt: skip
def test_chunked_bodies_are_cut_off_at_the_limit(server, path, content_type, first, limit) -> None:
    filler = b"A" * 65536
    with PeakMemory(server) as memory, connect(server.port) as sock:
        head = {**AUTH, "Content-Type": content_type, "Transfer-Encoding": "chunked"}
        sock.sendall(request_head("POST", path, head))
        sent, early = send_chunked_until_answered(sock, first, filler, max_bytes=300 * MIB)
        response = read_response(sock, timeout=5, received=early)
    assert f"{limit:,} bytes" in assert_refused(response, 413)["detail"]
    # Stopped at the limit, not after the 300 MB the client was ready to send (socket buffers
    # let a few MB more leave the client before it sees the answer).
    assert sent < limit + 16 * MIB, sent
    assert memory.growth < 64 * MIB, memory.growth


# ---------------------------------------------------------------------------- timeouts
def test_half_sent_requests_are_closed_after_the_read_timeout(server) -> None:
    silent = [connect(server.port) for _ in range(10)]
    half_headers = [connect(server.port) for _ in range(10)]
    half_bodies = [connect(server.port) for _ in range(10)]
    for sock in half_headers:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Ke")
    for sock in half_bodies:
        head = {**AUTH, "Content-Type": "application/json", "Content-Length": "100000"}
        sock.sendall(request_head("POST", "/v1/predict", head) + b'{"image_base64": "iVBO')
    started = time.monotonic()
    try:
        for sock in silent + half_headers:
            response = read_response(sock, timeout=4)
            assert response.closed and response.status is None
        for sock in half_bodies:
            response = read_response(sock, timeout=4)
            assert "did not arrive in time" in assert_refused(response, 408)["detail"]
            assert response.closed
        # A 1 s read timeout: all closed within a few seconds, not held open.
        assert time.monotonic() - started < 6
    finally:
        for sock in silent + half_headers + half_bodies:
            sock.close()
    with httpx.Client(base_url=server.url, headers=AUTH) as http:  # and it still serves
        assert http.get("/v1/model").status_code == 200


# ------------------------------------------------------------------------------ pixels
def test_pixel_heavy_images_cost_bounded_memory(server) -> None:
    huge = pattern_png(7900)  # ~0.2 MB upload, 62 Mpx: over the default 16 Mpx per image
    largest = pattern_png(4096)  # 16.8 Mpx: the largest image the defaults accept
    flags = {"heatmap": "true", "overlay": "true", "mask": "true"}
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as http:
        with PeakMemory(server) as memory:
            response = http.post("/v1/predict", params=flags, files={"file": ("h.png", huge)})
        assert response.status_code == 413, response.text
        assert "7900x7900 pixels, over the limit of 16,777,216" in response.json()["detail"]
        assert memory.growth < 64 * MIB, memory.growth

        with PeakMemory(server) as memory:
            response = http.post("/v1/predict", params=flags, files={"file": ("l.png", largest)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["width"], body["height"]) == (4096, 4096)
        for key in ("heatmap_png", "overlay_png", "mask_png"):
            # Drawn at 1/2 scale: within the 4 Mpx picture limit.
            assert Image.open(io.BytesIO(base64.b64decode(body[key]))).size == (2048, 2048)
        # About 380 MiB measured (2.9 GiB for the 7900 px image before pictures were bounded).
        assert memory.growth < 800 * MIB, memory.growth

        files = [("files", (f"{i}.png", largest)) for i in range(5)]  # 84 Mpx together
        with PeakMemory(server) as memory:
            response = http.post("/v1/predict/batch", params=flags, files=files)
        assert response.status_code == 413, response.text
        assert "83,886,080 pixels in all" in response.json()["detail"]
        assert memory.growth < 64 * MIB, memory.growth


def test_concurrent_images_wait_for_the_pixel_budget(server) -> None:
    # Five 16.8 Mpx images at once exceed the 64 Mpx a worker holds: the fifth waits its turn
    # and still gets its answer.
    import asyncio

    image = pattern_png(4096, seed=3)

    async def main() -> list:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as http:
            calls = [http.post("/v1/predict", files={"file": ("a.png", image)}) for _ in range(5)]
            return await asyncio.gather(*calls)

    with PeakMemory(server) as memory:
        responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 5
    # The same answer for each; images scored in one batch may differ in the last float bit.
    scores = [r.json()["score"] for r in responses]
    assert scores == pytest.approx([scores[0]] * 5, rel=1e-5)
    assert memory.growth < 1600 * MIB, memory.growth


# ------------------------------------------------------------------------------- dates
@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/predictions", {"since": "0001-01-01T00:00:00+14:00"}),
        ("/v1/drift", {"since": "0001-01-01T00:00:00+14:00"}),
        ("/v1/predictions.csv", {"until": "9999-12-31T23:59:59-01:00"}),
        ("/v1/drift", {"until": "9999-12-31T23:59:59-01:00"}),
    ],
)
def test_dates_outside_the_utc_range_are_422(server, path, params) -> None:
    response = httpx.get(f"{server.url}{path}", params=params, headers=AUTH)
    assert response.status_code == 422, response.text
    assert "out of range" in response.text
    # The extremes that do convert are fine.
    edge = {key: value[:19] + "Z" for key, value in params.items()}
    assert httpx.get(f"{server.url}{path}", params=edge, headers=AUTH).status_code != 500


# ------------------------------------------------------------------------- the contract
def test_threshold_and_json_contract(server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        before = http.get("/v1/model").json()["calibration"]
        for body in ({"image": True}, {"pixel": False}, {"image": "1.5"}):
            response = http.put("/v1/model/thresholds", json=body)
            assert response.status_code == 422, (body, response.text)
        malformed = {"Content-Type": "application/json"}
        response = http.put("/v1/model/thresholds", content=b'{"image": 1.0', headers=malformed)
        assert response.status_code == 400, response.text
        response = http.post("/v1/predict", content=b'{"image_base64": ', headers=malformed)
        assert response.status_code == 400, response.text
        assert http.get("/v1/model").json()["calibration"] == before


def test_line_wrapped_base64_is_accepted(server) -> None:
    data = png(texture_crops(1, seed=4)[0])
    flat = base64.b64encode(data).decode()
    wrapped = base64.encodebytes(data).decode()  # MIME style: a newline every 76 characters
    assert "\n" in wrapped
    with httpx.Client(base_url=server.url, headers=AUTH) as http:
        scores = [
            http.post("/v1/predict", json={"image_base64": text}).json()["score"]
            for text in (flat, wrapped, wrapped.replace("\n", "\r\n"))
        ]
        assert scores[0] == scores[1] == scores[2]
        response = http.post("/v1/predict", json={"image_base64": "data:image/png;base64," + flat})
        assert response.status_code == 422 and "data: URL" in response.json()["detail"]


def test_readyz_shows_the_fingerprint_only_with_the_key(server) -> None:
    public = httpx.get(f"{server.url}/readyz")
    assert public.status_code == 200
    assert public.json()["status"] == "ready" and public.json()["model_fingerprint"] is None
    trusted = httpx.get(f"{server.url}/readyz", headers=AUTH).json()
    assert (
        trusted["model_fingerprint"]
        == httpx.get(f"{server.url}/v1/model", headers=AUTH).json()["model_fingerprint"]
    )


def test_a_model_with_a_nan_threshold_is_not_served(texture_model_dir, tmp_path) -> None:
    def nan_threshold(meta: dict, tensors: dict) -> None:
        meta["calibration"]["threshold"] = float("nan")

    model = rewritten_model(texture_model_dir, tmp_path / "nan", nan_threshold)
    env = {"DEFECTSCOPE_PREDICTION_LOG_URL": "none"}
    with served(model, env, expect="failed") as running:
        ready = httpx.get(f"{running.url}/readyz", headers=AUTH)
        assert ready.status_code == 503
        assert "threshold is nan, not a finite number" in ready.json()["detail"]
        image = {"file": ("a.png", png(texture_crops(1)[0]))}
        response = httpx.post(f"{running.url}/v1/predict", files=image, headers=AUTH)
        assert response.status_code == 503 and "not a finite number" in response.text
