"""Serving test helpers: in-process app settings and error checks, an in-process uvicorn server,
real `defectscope serve` processes and raw-socket clients (the abuse and hardening tests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from _images import free_port

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector
    from defectscope.serving.settings import ServingSettings

KEY = "s3cret-key"
AUTH = {"X-API-Key": KEY}

# Limits of the in-process apps of `settings_for`: small, so the tests reach them cheaply.
MAX_UPLOAD = 200_000
MAX_PIXELS = 300 * 300


def assert_json_error(response: Any, status: int) -> dict:
    """A JSON error answer with ``status`` and a detail, and no traceback in it."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert body["detail"]
    return body


def settings_for(model_dir: Path | None, tmp: Path, **overrides: Any) -> ServingSettings:
    """Settings of an in-process app serving ``model_dir``, logging to a SQLite file in ``tmp``."""
    from defectscope.serving.settings import ServingSettings

    values = {
        "model_path": model_dir,
        "max_upload_bytes": MAX_UPLOAD,
        "max_pixels": MAX_PIXELS,
        "max_batch_images": 4,
        "prediction_log_url": f"sqlite:///{tmp / 'predictions.db'}",
        **overrides,
    }
    return ServingSettings(**values)


def wait_ready(get: Any, timeout: float = 60.0) -> None:
    """Poll ``get("/readyz")`` (a test client's ``get``) until the model is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get("/readyz").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the model did not load in time")


@contextmanager
def running_server(settings: ServingSettings, detector: Detector) -> Iterator[tuple[str, Any]]:
    """A real uvicorn server on a free localhost port, in a background thread: (url, app)."""
    import threading

    import uvicorn

    from defectscope.serving.app import create_app

    app = create_app(settings, detector=detector)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Server:
    url: str
    port: int
    process: subprocess.Popen

    def rss(self) -> int:
        """Resident memory of the server process (the worker, with --workers 1)."""
        import psutil

        return int(psutil.Process(self.process.pid).memory_info().rss)


@contextmanager
def served(
    model: Path | list[str], env: dict[str, str], workers: int = 1, expect: str = "ready"
) -> Iterator[Server]:
    """``defectscope serve MODEL`` (or ``serve ARGS...`` for a list) in its own process group,
    once /readyz says ``expect`` ("ready": every worker loaded; "failed": the model was
    refused)."""
    port = free_port()
    full_env = {
        **os.environ,
        "DEFECTSCOPE_API_KEY": KEY,
        "DEFECTSCOPE_BATCH_MAX_WAIT_MS": "0",
        **env,
    }
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    args = model if isinstance(model, list) else [str(model)]
    command = [sys.executable, "-m", "defectscope.cli", "serve", *args, "--port", str(port),
               "--workers", str(workers)]  # fmt: skip
    process = subprocess.Popen(
        command,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        streak = 0
        # Several answers in a row: with several workers, each must have loaded the model.
        while streak < 4 * workers and time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the server exited with {process.returncode}")
            try:
                answer = httpx.get(f"{url}/readyz", headers=AUTH, timeout=5).json()
                ready = answer["status"] == expect
            except (httpx.TransportError, ValueError):
                ready = False
            streak = streak + 1 if ready else 0
            time.sleep(0.1)
        if streak < 4 * workers:
            raise AssertionError(f"the server did not become {expect}")
        yield Server(url, port, process)
    finally:
        with_group = process.poll() is None
        if with_group:
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@dataclass
class RawResponse:
    status: int | None
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after answering (or without answering)

    def json(self) -> dict:
        return json.loads(self.body)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_response(sock: socket.socket, timeout: float = 5.0, received: bytes = b"") -> RawResponse:
    """Everything the server sends until it closes the connection or ``timeout`` passes
    (after ``received``, what already arrived)."""
    sock.settimeout(timeout)
    data, closed = received, False
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except TimeoutError:
        pass
    except ConnectionResetError:
        closed = True
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status, headers, body, closed)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def send_chunked_until_answered(
    sock: socket.socket, first: bytes, filler: bytes, max_bytes: int
) -> tuple[int, bytes]:
    """Send a chunked body (``first``, then ``filler`` repeated) until the server answers or
    closes; returns (body bytes sent, what the server sent meanwhile)."""
    sent = 0
    answer = b""
    try:
        for piece in (first, *(filler for _ in range(max_bytes // len(filler)))):
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
            sent += len(piece)
            sock.setblocking(False)
            try:
                answer = sock.recv(65536)
            except BlockingIOError:
                answer = b""
            finally:
                sock.setblocking(True)
            if answer:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent, answer
