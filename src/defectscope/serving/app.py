"""The FastAPI app: ``create_app(settings)`` (tests, embedding) and ``app_from_env()`` (uvicorn).

Routes are thin: uploads are decoded with `load_image` (content-sniffed, pixel-limited), scored
through the micro-batcher that calls `Detector.predict`, and rendered with
`defectscope.visualize`. The detector, settings, API-key check and prediction log reach the
routes through ``Depends`` so tests and other deployments can swap them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import (
    APIRouter,
    BackgroundTasks,
    Depends,
    FastAPI,
    File,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from defectscope import __version__
from defectscope.data.io import load_image
from defectscope.detector.detector import Detector
from defectscope.detector.model_file import compact_metadata, read_header, resolve_model_path
from defectscope.detector.prediction import Prediction
from defectscope.errors import DefectscopeError, ImageLoadError
from defectscope.monitoring.drift import VERDICTS, DriftDetector, DriftError, MissingReferenceError
from defectscope.runtimes import load_detector
from defectscope.serving.batching import MicroBatcher
from defectscope.serving.predictions_log import LogQuery, PredictionLogRepository, utc_now
from defectscope.serving.schemas import (
    Base64Image,
    BatchItem,
    BatchResponse,
    ErrorResponse,
    HealthResponse,
    ItemError,
    PredictionLogPage,
    PredictionResult,
    ReadyResponse,
    ThresholdUpdate,
    Timing,
)
from defectscope.serving.settings import ServingSettings
from defectscope.visualize import colorize, mask_to_png_array, overlay

log = logging.getLogger(__name__)

# Calibration keeps every good image's score; useful in the model file, noise in an API answer.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestError(Exception):
    """A request we refuse or cannot serve: an HTTP error on /v1/predict, an item error in a
    batch."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Metrics:
    """Prometheus metrics in a registry of the app's own (several apps per process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "defectscope_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "defectscope_http_request_duration_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "defectscope_batch_size",
            "Images per model call formed by the micro-batcher.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.scores = Histogram(
            "defectscope_normalized_score",
            "Normalised anomaly score of each prediction (0.5 is the threshold).",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=self.registry,
        )
        self.predictions = Counter(
            "defectscope_predictions_total", "Images scored.", registry=self.registry
        )
        self.anomalies = Counter(
            "defectscope_anomalies_total", "Images judged anomalous.", registry=self.registry
        )
        self.model_info = Gauge(
            "defectscope_model_info",
            "1 for the loaded model, labelled with its identity.",
            ["fingerprint", "backbone", "defectscope_version"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        # Set when /v1/drift is computed (not on a schedule): the last answer a client asked for.
        self.drift_score_p = Gauge(
            "defectscope_drift_score_p_value",
            "p-value of the score KS drift test of the last /v1/drift window.",
            registry=self.registry,
            multiprocess_mode="min",
        )
        self.drift_verdict = Gauge(
            "defectscope_drift_verdict",
            "Verdict of the last /v1/drift window: 0 ok, 1 warning, 2 drift.",
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.model_ready = Gauge(
            "defectscope_model_ready",
            "1 once the model is loaded (in every worker, with several).",
            registry=self.registry,
            multiprocess_mode="min",
        )


@dataclass
class ServingState:
    settings: ServingSettings
    metrics: Metrics
    detector: Detector | None = None
    load_error: str | None = None
    model_fingerprint: str = ""
    model_version: str = ""
    repository: PredictionLogRepository | None = None
    batcher: MicroBatcher | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)
    # PUT /v1/model/thresholds: one writer at a time; other workers follow the file's mtime.
    threshold_lock: threading.Lock = field(default_factory=threading.Lock)
    model_mtime_ns: int | None = None
    model_checked_at: float = 0.0

    @property
    def ready(self) -> bool:
        return self.detector is not None and self.detector.is_fitted

    def ready_detector(self) -> Detector:
        """The served detector; HTTP 503 (with the load error, if any) until it is ready."""
        detector = self.detector
        if detector is None or not detector.is_fitted:
            raise HTTPException(503, self.load_error or "the model is still loading")
        return detector

    def require_batcher(self) -> MicroBatcher:
        """The micro-batcher, which `create_app` sets up."""
        if self.batcher is None:
            raise RuntimeError("no micro-batcher: build the app with create_app()")
        return self.batcher

    def predict(self, images: Sequence[np.ndarray], threshold: float | None) -> list[Prediction]:
        # Runs in the batcher's worker thread; looked up per call so a reload or test double
        # takes effect at once.
        detector = self.ready_detector()
        return detector.predict(images, threshold=threshold, batch_size=len(images))

    async def load_model(self) -> None:
        settings = self.settings
        if settings.model_path is None:
            self.load_error = "no model configured (set DEFECTSCOPE_MODEL_PATH)"
            return
        try:
            # Before loading: a threshold saved meanwhile by another worker is then picked up.
            self.model_mtime_ns = resolve_model_path(settings.model_path).stat().st_mtime_ns
            detector = await asyncio.to_thread(
                load_detector, settings.model_path, settings.runtime, settings.device
            )
            fingerprint = await asyncio.to_thread(file_fingerprint, settings.model_path)
        except DefectscopeError as exc:
            self.load_error = str(exc)
            log.error("model not loaded: %s", exc)
            return
        except Exception:
            self.load_error = "the model failed to load (see the server log)"
            log.exception("model not loaded")
            return
        self.use_detector(detector, fingerprint)

    def use_detector(self, detector: Detector, fingerprint: str | None = None) -> None:
        training = detector.info.get("training", {})
        self.model_fingerprint = fingerprint or str(training.get("fingerprint", ""))[:16]
        self.model_version = str(detector.info.get("defectscope_version", __version__))
        self.detector = detector
        self.load_error = None
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(
            self.model_fingerprint, detector.config.backbone.name, self.model_version
        ).set(1)
        self.metrics.model_ready.set(1)

    def follow_model_file(self) -> None:
        """Adopt thresholds that another worker saved to the model file since we loaded it.

        Each ``--workers`` process holds its own detector; a cheap stat (at most once a second)
        and a header read keep them in agreement without reloading the memory bank.
        """
        now = time.monotonic()
        path = self.settings.model_path
        if path is None or not self.ready or now - self.model_checked_at < 1.0:
            return
        self.model_checked_at = now
        detector = self.ready_detector()
        if getattr(detector, "runtime", "torch") != "torch":
            return
        try:
            file = resolve_model_path(path)
            mtime = file.stat().st_mtime_ns
            if self.model_mtime_ns is None or mtime == self.model_mtime_ns:
                self.model_mtime_ns = mtime
                return
            stored = read_header(file)["calibration"]
            detector.set_thresholds(
                stored["threshold"], stored["pixel_threshold"], stored["threshold_source"]
            )
            self.use_detector(detector, file_fingerprint(file))
            self.model_mtime_ns = mtime
        except (DefectscopeError, OSError, KeyError, TypeError) as exc:
            log.warning("could not re-read thresholds from the model file: %s", exc)

    def save_thresholds(self, update: ThresholdUpdate) -> None:
        """Apply new thresholds and persist them to the served model file, or change nothing."""
        detector, path = self.ready_detector(), self.settings.model_path
        runtime = getattr(detector, "runtime", "torch")
        if runtime != "torch":
            raise RequestError(
                409,
                f"this server runs an exported {runtime} model, whose thresholds are fixed in the "
                "exported file: set them on the PyTorch model and export it again",
            )
        if path is None:
            raise RequestError(409, "this server has no model file to save thresholds to")
        with self.threshold_lock:
            previous = detector.calibration
            detector.set_thresholds(update.image, update.pixel, source="ui")
            try:
                saved = detector.save(path)
            except Exception as exc:  # OSError, SafetensorError...: any failure to write
                detector.calibration = previous
                log.warning("thresholds not saved to %s: %s", path, exc)
                raise RequestError(409, f"cannot save the model file {path}: {exc}") from None
            # The local file (for a remote model, its cached copy), as in follow_model_file.
            file = resolve_model_path(saved)
            self.model_mtime_ns = file.stat().st_mtime_ns
            self.use_detector(detector, file_fingerprint(file))

    def record(self, records: list[dict]) -> None:
        """Background task: a logging failure is a warning, never a failed request."""
        if self.repository is None or not records:
            return
        try:
            self.repository.add_many(records)
        except Exception as exc:
            log.warning("could not write %d prediction log rows: %s", len(records), exc)


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with resolve_model_path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- dependencies
def get_state(request: Request) -> ServingState:
    return request.app.state.serving


def get_settings(state: Annotated[ServingState, Depends(get_state)]) -> ServingSettings:
    return state.settings


def get_detector(state: Annotated[ServingState, Depends(get_state)]) -> Detector:
    detector = state.ready_detector()  # HTTP 503 until the model is loaded
    state.follow_model_file()  # may update this detector's thresholds
    return detector


def get_log_repository(
    state: Annotated[ServingState, Depends(get_state)],
) -> PredictionLogRepository:
    if state.repository is None:
        raise HTTPException(404, "the prediction log is disabled on this server")
    return state.repository


_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


def require_api_key(
    settings: Annotated[ServingSettings, Depends(get_settings)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """X-API-Key header, or ``Authorization: Bearer`` (what Prometheus scrapers send)."""
    if settings.api_key is None:
        return
    given = api_key or (bearer.credentials if bearer else None)
    expected = settings.api_key.get_secret_value()
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            401, "missing or wrong API key", headers={"WWW-Authenticate": "ApiKey, Bearer"}
        )


@dataclass
class RenderFlags:
    threshold: float | None
    heatmap: bool
    overlay: bool
    mask: bool


def render_flags(
    threshold: Annotated[
        float | None, Query(description="Override the image threshold.", allow_inf_nan=False)
    ] = None,
    heatmap: Annotated[bool, Query(description="Include a base64 heatmap PNG.")] = False,
    overlay: Annotated[bool, Query(description="Include a base64 overlay PNG.")] = False,
    mask: Annotated[bool, Query(description="Include a base64 mask PNG.")] = False,
) -> RenderFlags:
    return RenderFlags(threshold, heatmap, overlay, mask)


# ------------------------------------------------------------------------------- helpers
def image_error_status(error: ImageLoadError) -> int:
    # ImageLoadError has no subclasses; its reasons are fixed phrases from data.io.
    if "over the limit" in error.reason:
        return 413
    if "not a readable image" in error.reason:
        return 415
    return 422


async def read_upload(upload: StarletteUploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise RequestError(413, f"upload is over the limit of {limit:,} bytes")
    if not data:
        raise RequestError(422, "the uploaded file is empty")
    return data


async def read_single_image(request: Request, limit: int) -> bytes:
    """The image of /v1/predict: multipart field ``file`` or JSON ``image_base64``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1)
        upload = form.get("file")
        if not isinstance(upload, StarletteUploadFile):
            raise RequestError(422, "missing multipart file field 'file'")
        return await read_upload(upload, limit)
    if content_type == "application/json":
        try:
            payload = Base64Image.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        try:
            data = base64.b64decode(payload.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, "image_base64 is not valid base64") from None
        if len(data) > limit:
            raise RequestError(413, f"image is over the limit of {limit:,} bytes")
        return data
    if not content_type:
        raise RequestError(
            422, "no image: send multipart/form-data with a 'file' field or JSON image_base64"
        )
    raise RequestError(
        415, f"unsupported content type {content_type!r}: use multipart/form-data or JSON"
    )


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render(
    image: np.ndarray, prediction: Prediction, flags: RenderFlags, stored_threshold: float
) -> dict[str, str]:
    # Same fixed colour scale as the CLI's files: 0 .. twice the model's stored threshold (not a
    # per-request override, which may be 0 or negative and would make the scale meaningless).
    vmax = 2.0 * stored_threshold
    out = {}
    if flags.heatmap:
        out["heatmap_png"] = png_base64(colorize(prediction.anomaly_map, vmin=0.0, vmax=vmax))
    if flags.overlay:
        out["overlay_png"] = png_base64(
            overlay(image, prediction.anomaly_map, vmin=0.0, vmax=vmax, mask=prediction.mask)
        )
    if flags.mask:
        out["mask_png"] = png_base64(mask_to_png_array(prediction.mask))
    return out


async def score_bytes(
    state: ServingState, data: bytes, flags: RenderFlags, started: float, route: str, rid: str
) -> tuple[PredictionResult, dict]:
    """Decode, predict (micro-batched), render: the shared path of both predict routes."""
    t0 = time.perf_counter()
    try:
        image = await run_in_threadpool(load_image, data, state.settings.max_pixels)
    except ImageLoadError as exc:
        raise RequestError(image_error_status(exc), exc.reason) from None
    t1 = time.perf_counter()
    timeout = state.settings.request_timeout_s
    try:
        batcher = state.require_batcher()
        prediction = await asyncio.wait_for(batcher.submit(image, flags.threshold), timeout)
    except TimeoutError:
        raise RequestError(
            504, f"the model did not answer within {timeout:g} s (server overloaded?); try again"
        ) from None
    t2 = time.perf_counter()
    images = {}
    if flags.heatmap or flags.overlay or flags.mask:
        stored = state.ready_detector().threshold
        images = await run_in_threadpool(render, image, prediction, flags, stored)
    total_ms = (time.perf_counter() - started) * 1000.0
    summary = prediction.summary()
    result = PredictionResult(
        score=summary["score"],
        normalized_score=summary["normalized_score"],
        is_anomalous=summary["is_anomalous"],
        label=summary["label"],
        threshold=summary["threshold"],
        pixel_threshold=summary["pixel_threshold"],
        defect_area_fraction=summary["defect_area_fraction"],
        width=summary["width"],
        height=summary["height"],
        model_version=state.model_version,
        model_fingerprint=state.model_fingerprint,
        timing_ms=Timing(
            decode_ms=(t1 - t0) * 1000.0,
            inference_ms=(t2 - t1) * 1000.0,
            model_ms=float(prediction.timings.get("model_ms", 0.0)),
            total_ms=total_ms,
        ),
        **images,
    )
    metrics = state.metrics
    metrics.predictions.inc()
    metrics.scores.observe(result.normalized_score)
    if result.is_anomalous:
        metrics.anomalies.inc()
    record = {
        "created_at": utc_now(),
        "route": route,
        "request_id": rid,
        "model_fingerprint": state.model_fingerprint,
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "width": result.width,
        "height": result.height,
        "score": result.score,
        "normalized_score": result.normalized_score,
        "is_anomalous": result.is_anomalous,
        "threshold": result.threshold,
        "latency_ms": total_ms,
    }
    return result, record


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "")


# --------------------------------------------------------------------------------- routes
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        401: "Missing or wrong API key.",
        413: "Upload or image over a limit.",
        415: "Not an image (decoded by content).",
        422: "Bad request: missing field, bad base64, bad query value, corrupt image.",
        503: "The model is not loaded yet.",
        504: "The model did not answer within the request timeout.",
    }.items()
}

# FastAPI answers 400 itself when a multipart body cannot be parsed (routes with File()).
UNPARSABLE_MULTIPART: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The multipart body cannot be parsed."}
}

SINGLE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/json": {"schema": Base64Image.model_json_schema()},
        },
    }
}

health = APIRouter(tags=["health"])
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)
State = Annotated[ServingState, Depends(get_state)]
Flags = Annotated[RenderFlags, Depends(render_flags)]
ReadyDetector = Annotated[Detector, Depends(get_detector)]


@health.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is up (liveness)."""
    return HealthResponse(status="ok")


@health.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(state: State) -> JSONResponse:
    """The model is loaded and predictions can be served (readiness)."""
    if state.ready:
        body = ReadyResponse(status="ready", model_fingerprint=state.model_fingerprint)
        return JSONResponse(body.model_dump())
    status = "failed" if state.load_error else "loading"
    body = ReadyResponse(status=status, detail=state.load_error)
    return JSONResponse(body.model_dump(), status_code=503)


@health.get("/metrics", dependencies=[Depends(require_api_key)], response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus text format (summed over all worker processes when there are several)."""
    registry = state.metrics.registry
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Each worker writes its values to files in that folder; any worker can add them up.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@v1.post("/predict", response_model=PredictionResult, openapi_extra=SINGLE_BODY)
async def predict(
    request: Request, background: BackgroundTasks, state: State, flags: Flags, _: ReadyDetector
) -> PredictionResult:
    """Score one image: multipart field ``file``, or JSON ``{"image_base64": ...}``."""
    started = time.perf_counter()
    try:
        data = await read_single_image(request, state.settings.max_upload_bytes)
        result, record = await score_bytes(
            state, data, flags, started, "/v1/predict", request_id(request)
        )
    except RequestError as exc:
        raise HTTPException(exc.status, exc.detail) from None
    background.add_task(state.record, [record])
    return result


@v1.post("/predict/batch", response_model=BatchResponse, responses=UNPARSABLE_MULTIPART)
async def predict_batch(
    request: Request,
    background: BackgroundTasks,
    state: State,
    flags: Flags,
    _: ReadyDetector,
    files: Annotated[list[UploadFile], File(description="Images, field 'files' repeated.")],
) -> BatchResponse:
    """Score several images; an unreadable one gets an error entry, the others still succeed."""
    started = time.perf_counter()
    settings = state.settings
    if len(files) > settings.max_batch_images:
        raise HTTPException(
            413, f"{len(files)} images sent; at most {settings.max_batch_images} per request"
        )
    rid = request_id(request)

    async def one(index: int, upload: UploadFile) -> tuple[BatchItem, dict | None]:
        try:
            data = await read_upload(upload, settings.max_upload_bytes)
            result, record = await score_bytes(
                state, data, flags, started, "/v1/predict/batch", rid
            )
        except RequestError as exc:
            error = ItemError(status=exc.status, detail=exc.detail)
            return BatchItem(index=index, filename=upload.filename, error=error), None
        return BatchItem(index=index, filename=upload.filename, result=result), record

    # All items are queued at once, so the micro-batcher can put them in one model call.
    outcomes = await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))
    items = [item for item, _ in outcomes]
    background.add_task(state.record, [record for _, record in outcomes if record])
    n_ok = sum(item.error is None for item in items)
    return BatchResponse(items=items, n_ok=n_ok, n_failed=len(items) - n_ok)


@v1.get("/model")
async def model_info(state: State, detector: ReadyDetector) -> dict[str, Any]:
    """The model's description (``Detector.describe``) without per-image calibration lists."""
    described = compact_metadata(detector.describe())
    described["model_fingerprint"] = state.model_fingerprint
    return described


@v1.put(
    "/model/thresholds",
    responses={
        400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
        409: {"model": ErrorResponse, "description": "The thresholds cannot be saved."},
    },
)
async def update_thresholds(
    state: State, _: ReadyDetector, update: ThresholdUpdate
) -> dict[str, Any]:
    """Set the stored thresholds and save them to the served model file (atomic replace).

    Other worker processes pick the new thresholds up from the file within about a second.
    """
    if update.image is None and update.pixel is None:
        raise HTTPException(422, "give at least one of 'image' and 'pixel'")
    try:
        await run_in_threadpool(state.save_thresholds, update)
    except RequestError as exc:
        raise HTTPException(exc.status, exc.detail) from None
    return await model_info(state, state.ready_detector())


def report_folder(settings: ServingSettings) -> Path | None:
    """``--report DIR``, else ``report/`` beside the model file, if it holds metrics.json."""
    folder = settings.report_dir
    if folder is None and settings.model_path is not None:
        model = Path(settings.model_path)
        folder = (model if model.is_dir() else model.parent) / "report"
    if folder is None or not (folder / "metrics.json").is_file():
        return None
    return folder


@v1.get(
    "/model/report",
    responses={404: {"model": ErrorResponse, "description": "No evaluation report."}},
)
def model_report(state: State) -> dict[str, Any]:
    """The model's evaluation report (``defectscope evaluate --report``'s metrics.json)."""
    folder = report_folder(state.settings)
    if folder is None:
        raise HTTPException(
            404,
            "no evaluation report for this model: write one with `defectscope evaluate MODEL "
            "DATA --report MODEL/report`, or start the server with --report DIR",
        )
    try:
        report = json.loads((folder / "metrics.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        detail = f"the evaluation report in {folder} is unreadable: {exc}"
        raise HTTPException(404, detail) from None
    return {"source": str(folder), "report": report}


def log_query(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,  # SQL BIGINT range
    since: Annotated[datetime | None, Query(description="ISO 8601; naive means UTC.")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive.")] = None,
    is_anomalous: bool | None = None,
) -> LogQuery:
    return LogQuery(limit, offset, since, until, is_anomalous)


Repository = Annotated[PredictionLogRepository, Depends(get_log_repository)]


@v1.get("/predictions", response_model=PredictionLogPage)
def list_predictions(
    query: Annotated[LogQuery, Depends(log_query)], repository: Repository
) -> PredictionLogPage:
    """The prediction log, newest first, filtered and paged."""
    total, rows = repository.query(query)
    return PredictionLogPage(total=total, limit=query.limit, offset=query.offset, items=rows)


@v1.get("/predictions.csv", response_class=StreamingResponse)
def export_predictions(
    query: Annotated[LogQuery, Depends(log_query)], repository: Repository
) -> StreamingResponse:
    """The filtered prediction log as CSV, oldest first (limit and offset are ignored)."""
    return StreamingResponse(
        repository.iter_csv(query),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="predictions.csv"'},
    )


MAX_DRIFT_WINDOW = 5000


@v1.get(
    "/drift",
    responses={
        409: {"model": ErrorResponse, "description": "The model has no drift reference."},
        422: {"model": ErrorResponse, "description": "Window too small or bad query value."},
    },
)
def drift_check(
    state: State,
    detector: ReadyDetector,
    repository: Repository,
    since: Annotated[datetime | None, Query(description="ISO 8601; naive means UTC.")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601, exclusive.")] = None,
    limit: Annotated[
        int, Query(ge=2, le=MAX_DRIFT_WINDOW, description="Newest predictions tested.")
    ] = 500,
) -> dict[str, Any]:
    """Drift verdict over the window of recent predictions of this model in the log.

    Score tests only (KS, PSI, alarm rate): the log keeps scores, not embeddings, and pooling
    them in the request path would change every predict call for a check run now and then.
    Use ``defectscope drift MODEL --images`` for the feature test.
    """
    try:
        monitor = DriftDetector.from_detector(detector)
    except MissingReferenceError as exc:
        raise HTTPException(409, str(exc)) from None
    query = LogQuery(limit=limit, since=since, until=until)
    rows = repository.recent_scores(query, state.model_fingerprint or None)
    try:
        report = monitor.check_scores(np.array([score for _, score in rows]))
    except DriftError as exc:
        raise HTTPException(422, str(exc)) from None
    body = jsonable_encoder(report.to_dict())
    body.update(
        feature_test="not run: the prediction log holds scores only",
        model_fingerprint=state.model_fingerprint,
        window={
            "since": since,
            "until": until,
            "limit": limit,
            "first": rows[0][0].isoformat(),
            "last": rows[-1][0].isoformat(),
        },
    )
    p_value = report.test("score_ks").p_value
    if p_value is not None:  # always set for the KS test; only reported tests may lack one
        state.metrics.drift_score_p.set(p_value)
    state.metrics.drift_verdict.set(VERDICTS.index(report.verdict))
    return jsonable_encoder(body)


@v1.post(
    "/drift/images",
    responses={
        **UNPARSABLE_MULTIPART,
        409: {"model": ErrorResponse, "description": "No drift reference, or no embeddings."},
        422: {"model": ErrorResponse, "description": "Window too small or an unreadable image."},
    },
)
async def drift_images(
    state: State,
    detector: ReadyDetector,
    files: Annotated[list[UploadFile], File(description="The window: images, 'files' repeated.")],
) -> dict[str, Any]:
    """Drift verdict over a window of uploaded images: score tests and the feature test (MMD).

    The images are embedded and scored in one pass, as ``defectscope drift MODEL --images`` does;
    they are not logged as predictions.
    """
    settings = state.settings
    if len(files) > settings.max_batch_images:
        raise HTTPException(
            413, f"{len(files)} images sent; at most {settings.max_batch_images} per request"
        )
    try:
        monitor = DriftDetector.from_detector(detector)
    except MissingReferenceError as exc:
        raise HTTPException(409, str(exc)) from None
    images = []
    for upload in files:
        try:
            data = await read_upload(upload, settings.max_upload_bytes)
            images.append(await run_in_threadpool(load_image, data, settings.max_pixels))
        except RequestError as exc:
            raise HTTPException(exc.status, f"{upload.filename}: {exc.detail}") from None
        except ImageLoadError as exc:
            raise HTTPException(
                image_error_status(exc), f"{upload.filename}: {exc.reason}"
            ) from None
    try:
        report = await run_in_threadpool(monitor.check_images, detector, images)
    except DriftError as exc:
        raise HTTPException(422, str(exc)) from None
    except DefectscopeError as exc:  # an exported runtime has no embeddings
        raise HTTPException(409, f"the feature test needs the PyTorch model: {exc}") from None
    body = report.to_dict()
    body.update(model_fingerprint=state.model_fingerprint, window={"images": len(images)})
    return jsonable_encoder(body)


# ------------------------------------------------------------------------------ factory
def create_app(
    settings: ServingSettings | None = None, *, detector: Detector | None = None
) -> FastAPI:
    """Build the app. ``detector`` skips loading ``settings.model_path`` (tests, embedding)."""
    settings = settings or ServingSettings()
    state = ServingState(settings=settings, metrics=Metrics())
    state.batcher = batcher = MicroBatcher(
        state.predict,
        max_size=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        on_batch=state.metrics.batch_size.observe,
    )
    if detector is not None:
        state.use_detector(detector)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        if settings.prediction_log_url:
            try:
                state.repository = await asyncio.to_thread(
                    PredictionLogRepository, settings.prediction_log_url
                )
            except Exception as exc:
                log.warning("prediction log disabled: cannot open it: %s", exc)
        if not state.ready:
            # Loading in the background lets /healthz answer (and /readyz say 503) meanwhile.
            task = asyncio.create_task(state.load_model())
            state.tasks.add(task)
            task.add_done_callback(state.tasks.discard)
        try:
            yield
        finally:
            for task in list(state.tasks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await batcher.stop()
            if state.repository is not None:
                state.repository.close()

    app = FastAPI(
        title="defectscope",
        version=__version__,
        description="Visual anomaly detection: score images, localise defects.",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.include_router(health)
    app.include_router(v1)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT"],
            allow_headers=["*"],
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail, "request_id": request_id(request)},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Without "input" (it would echo uploads back) and with ctx values as plain text.
        errors = [
            {
                **{k: v for k, v in error.items() if k not in ("input", "ctx", "url")},
                **({"ctx": {k: str(v) for k, v in error["ctx"].items()}} if "ctx" in error else {}),
            }
            for error in exc.errors()
        ]
        return JSONResponse(
            {"detail": jsonable_encoder(errors), "request_id": request_id(request)},
            status_code=422,
        )

    @app.middleware("http")
    async def observe(request: Request, call_next) -> Response:
        rid = request.headers.get("x-request-id", "")
        rid = rid if REQUEST_ID.match(rid) else uuid.uuid4().hex
        request.state.request_id = rid
        started = time.perf_counter()
        response = body_too_large(request, settings, rid)
        if response is None:
            try:
                response = await call_next(request)
            except Exception:
                log.exception(
                    "unhandled error on %s %s (request_id=%s)",
                    request.method,
                    request.url.path,
                    rid,
                )
                response = JSONResponse(
                    {"detail": "internal error", "request_id": rid}, status_code=500
                )
        # Route templates, not raw paths, as labels: bounded cardinality. The router records
        # the matched route in the (shared) scope.
        route = getattr(request.scope.get("route"), "path", None) or "unmatched"
        status = str(response.status_code)
        state.metrics.requests.labels(route, request.method, status).inc()
        state.metrics.latency.labels(route, request.method, status).observe(
            time.perf_counter() - started
        )
        response.headers["X-Request-ID"] = rid
        return response

    return app


def body_too_large(request: Request, settings: ServingSettings, rid: str) -> JSONResponse | None:
    """Refuse a declared body over the limit before reading it (per-file limits come later)."""
    declared = request.headers.get("content-length")
    if request.method != "POST" or not declared or not declared.isdigit():
        return None
    single = settings.max_upload_bytes * 4 // 3 + 64 * 1024
    limit = settings.max_request_bytes if request.url.path.endswith("/batch") else single
    if int(declared) <= limit:
        return None
    return JSONResponse(
        {"detail": f"request body is over the limit of {limit:,} bytes", "request_id": rid},
        status_code=413,
    )


def app_from_env() -> FastAPI:
    """uvicorn factory (``--factory``): every worker reads the same DEFECTSCOPE_* settings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(ServingSettings())
