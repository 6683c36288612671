"""What a request may cost the server, enforced before the routes run.

`RequestGuard` (ASGI middleware) checks the API key and the declared body size from the headers
alone, then counts body bytes as they arrive and times them, so no route ever reads a body that
is unauthenticated, too large (with or without Content-Length) or trickling in. `PixelBudget`
bounds the decoded pixels a worker holds at once, which is what an image costs in memory.
"""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from PIL import Image
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from defectscope.serving.settings import ServingSettings

# Routes other than the upload routes take small JSON bodies at most (PUT thresholds).
SMALL_BODY_BYTES = 64 * 1024
MULTI_IMAGE_ROUTES = frozenset({"/v1/predict/batch", "/v1/drift/images"})


def needs_api_key(path: str) -> bool:
    """Everything but the health routes and the API docs."""
    return path.startswith("/v1") or path.rstrip("/") == "/metrics"


def api_key_ok(settings: ServingSettings, headers: Headers) -> bool:
    """X-API-Key, or ``Authorization: Bearer`` (what Prometheus scrapers send)."""
    if settings.api_key is None:
        return True
    given = headers.get("x-api-key")
    if given is None:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        given = credentials.strip() if scheme.lower() == "bearer" else None
    expected = settings.api_key.get_secret_value()
    return given is not None and secrets.compare_digest(given.encode(), expected.encode())


def named_model_route(path: str) -> str:
    """``/v1/models/NAME/predict...`` -> ``/v1/predict...`` (the same bodies); else ``path``."""
    parts = path.split("/")
    if len(parts) >= 5 and parts[:3] == ["", "v1", "models"] and parts[4] == "predict":
        return "/v1/" + "/".join(parts[4:])
    return path


def body_limit(settings: ServingSettings, method: str, path: str) -> int:
    path = named_model_route(path.rstrip("/"))
    if method == "POST" and path == "/v1/predict":
        return settings.max_single_request_bytes
    if method == "POST" and path in MULTI_IMAGE_ROUTES:
        return max(settings.max_request_bytes, settings.max_single_request_bytes)
    return SMALL_BODY_BYTES


class RequestError(Exception):
    """A request we refuse or cannot serve: an HTTP error on /v1/predict, an item error in a
    batch."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@contextmanager
def as_http_error() -> Iterator[None]:
    """A `RequestError` raised inside becomes an HTTP error answer of its status and detail."""
    try:
        yield
    except RequestError as exc:
        raise HTTPException(exc.status, exc.detail) from None


class BodyRefused(Exception):
    """Raised into the app by the guarded ``receive``; the guard answers the client itself."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class BodyReader:
    """``receive`` with a byte count and read timeouts, until the body is complete."""

    def __init__(self, receive: Receive, limit: int, pause_s: float, total_s: float) -> None:
        self.inner = receive
        self.limit = limit
        self.pause_s = pause_s
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + total_s
        self.received = 0
        self.complete = False
        self.refused: BodyRefused | None = None

    def refuse(self, status: int, detail: str) -> BodyRefused:
        self.refused = BodyRefused(status, detail)
        return self.refused

    async def receive(self) -> Message:
        if self.refused is not None:
            raise self.refused
        if self.complete:
            return await self.inner()  # later calls wait for a disconnect: no timeout there
        left = self.deadline - asyncio.get_running_loop().time()
        try:
            message = await asyncio.wait_for(self.inner(), max(0.0, min(self.pause_s, left)))
        except TimeoutError:
            raise self.refuse(
                408,
                "the request body did not arrive in time (it paused too long or took over "
                "the limit in all); send it again",
            ) from None
        if message["type"] != "http.request":
            self.complete = True  # a disconnect
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            raise self.refuse(413, f"request body is over the limit of {self.limit:,} bytes")
        if not message.get("more_body", False):
            self.complete = True
        return message


def json_error(status: int, detail: str, request_id: str, headers: dict[str, str]) -> list[Message]:
    body = json.dumps({"detail": detail, "request_id": request_id}).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in headers.items()),
    ]
    return [
        {"type": "http.response.start", "status": status, "headers": raw},
        {"type": "http.response.body", "body": body},
    ]


class RequestGuard:
    """ASGI middleware: API key, then body size and read timeouts, before any route runs.

    A refused body is answered here (401, 413, 408) with ``Connection: close``, so the server
    neither reads nor drains the rest of it. Whatever the app made of the cut-off body (a 400 from
    the form parser, say) is replaced by that answer.
    """

    def __init__(self, app: ASGIApp, settings: ServingSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings
        headers = Headers(scope=scope)
        rid = str(scope.get("state", {}).get("request_id", ""))
        has_body = "transfer-encoding" in headers or headers.get("content-length", "0") != "0"

        async def answer(status: int, detail: str, extra: dict[str, str], close: bool) -> None:
            # Closing stops the server from reading (and discarding) the rest of the body.
            extra = {**extra, "connection": "close"} if close else extra
            for message in json_error(status, detail, rid, extra):
                await send(message)

        if needs_api_key(scope["path"]) and not api_key_ok(settings, headers):
            challenge = {"www-authenticate": "ApiKey, Bearer"}
            await answer(401, "missing or wrong API key", challenge, has_body)
            return
        limit = body_limit(settings, scope["method"], scope["path"])
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await answer(413, f"request body is over the limit of {limit:,} bytes", {}, True)
            return

        reader = BodyReader(receive, limit, settings.read_timeout_s, settings.body_timeout_s)
        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if reader.refused is not None and not started:
                return  # the app's answer to a body we cut off; ours goes out below
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, reader.receive, guarded_send)
        except Exception:
            if reader.refused is None:
                raise
            # Anything the app raised once its body was refused follows from that refusal.
        refused = reader.refused
        if refused is not None and not started:
            await answer(refused.status, refused.detail, {}, True)


def image_pixels(data: bytes) -> int:
    """Width x height from the image header (nothing decoded); 0 when it cannot be read, in
    which case decoding fails too and costs nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:  # PIL raises many types for foreign bytes; load_image words the error
        return 0
    return int(width) * int(height)


class PixelBudget:
    """Decoded pixels a worker holds at once (decode, model, maps, pictures), first come first
    served: a request waits until its pixels fit, so memory stays bounded however many arrive."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    def _grant(self) -> None:
        while self._waiting:
            pixels, future = self._waiting[0]
            if future.done():  # gave up waiting
                self._waiting.popleft()
                continue
            if self.used + pixels > self.capacity:
                return
            self._waiting.popleft()
            self.used += pixels
            future.set_result(None)

    def _release(self, pixels: int) -> None:
        self.used -= pixels
        self._grant()

    @asynccontextmanager
    async def hold(self, pixels: int, timeout: float) -> AsyncIterator[None]:
        """Hold ``pixels`` (at most ``capacity``) for the block; TimeoutError if they do not fit
        within ``timeout`` seconds."""
        pixels = min(pixels, self.capacity)
        if not self._waiting and self.used + pixels <= self.capacity:
            self.used += pixels
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append((pixels, future))
            try:
                await asyncio.wait_for(asyncio.shield(future), timeout)
            except BaseException:
                if future.done() and not future.cancelled():
                    self._release(pixels)  # granted just as we gave up
                else:
                    future.cancel()
                    self._grant()  # our place in the queue may have held others back
                raise
        try:
            yield
        finally:
            self._release(pixels)
