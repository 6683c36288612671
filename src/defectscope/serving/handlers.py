"""Error answers and request observation: every answer is JSON with a request id, and counted.

A client never sees a traceback: HTTP errors keep their status and detail, validation errors
leave out the input (it would echo uploads back), and anything unexpected is a 500 whose
details go to the server log under the same request id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from defectscope.serving.dependencies import request_id

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(
        {"detail": exc.detail, "request_id": request_id(request)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Without "input" (it would echo uploads back) and with ctx values as plain text.
    errors = [
        {
            **{k: v for k, v in error.items() if k not in ("input", "ctx", "url")},
            **({"ctx": {k: str(v) for k, v in error["ctx"].items()}} if "ctx" in error else {}),
        }
        for error in exc.errors()
    ]
    # A body that is not JSON at all is a 400; JSON with wrong values stays a 422.
    malformed = any(error.get("type") == "json_invalid" for error in errors)
    return JSONResponse(
        {"detail": jsonable_encoder(errors), "request_id": request_id(request)},
        status_code=400 if malformed else 422,
    )


async def observe(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Give the request an id (the client's ``X-Request-ID`` when sane), count and time it."""
    rid = request.headers.get("x-request-id", "")
    rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
    request.state.request_id = rid
    started = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:
        log.exception(
            "unhandled error on %s %s (request_id=%s)", request.method, request.url.path, rid
        )
        response = JSONResponse({"detail": "internal error", "request_id": rid}, status_code=500)
    # Route templates, not raw paths, as labels: bounded cardinality. The router records
    # the matched route in the (shared) scope.
    route = getattr(request.scope.get("route"), "path", None) or "unmatched"
    request.app.state.serving.metrics.observe_request(
        route, request.method, response.status_code, time.perf_counter() - started
    )
    response.headers["X-Request-ID"] = rid
    return response


def install(app: FastAPI) -> None:
    """The exception handlers and the ``observe`` middleware (outermost of the app's own)."""
    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(RequestValidationError)(validation_error)
    app.middleware("http")(observe)
