"""The FastAPI app: ``create_app(settings)`` (tests, embedding) and ``app_from_env()`` (uvicorn).

Routes are thin: uploads are decoded with `load_image` (content-sniffed, pixel-limited), scored
through the micro-batcher that calls `Detector.predict`, and pictures are drawn by
`serving.pictures` at a bounded size. What a request may cost (key, bytes, read time, pixels) is
enforced by `serving.limits`. The detector, settings, API-key check and prediction log reach the
routes through ``Depends`` so tests and other deployments can swap them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
from datetime import UTC, datetime
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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from defectscope import __version__
from defectscope.data.io import load_image
from defectscope.detector.detector import Detector
from defectscope.detector.model_file import compact_metadata, resolve_model_path
from defectscope.detector.prediction import Prediction
from defectscope.errors import DefectscopeError, ImageLoadError
from defectscope.export.runtimes import load_detector
from defectscope.monitoring.drift import VERDICTS, DriftDetector, DriftError, MissingReferenceError
from defectscope.serving.batching import MicroBatcher
from defectscope.serving.limits import (
    PixelBudget,
    RequestError,
    RequestGuard,
    api_key_ok,
)
from defectscope.serving.metrics import Metrics
from defectscope.serving.pictures import RenderFlags, render
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
from defectscope.serving.thresholds import (
    bank_digest,
    file_fingerprint,
    follow_model_file,
    save_thresholds,
)
from defectscope.serving.uploads import (
    check_request_pixels,
    image_error_status,
    pixels_within,
    read_single_image,
    read_upload,
)

log = logging.getLogger(__name__)

# Calibration keeps every good image's score; useful in the model file, noise in an API answer.
REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


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
    bank_digest: str | None = None
    metrics_identity: tuple[str, str, str] | None = None
    pixels: PixelBudget = field(init=False)
    # Pictures cost tens of bytes a pixel while drawn: two at a time bounds that memory.
    render_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(2)
    )

    def __post_init__(self) -> None:
        self.pixels = PixelBudget(self.settings.inflight_pixel_budget)

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
            digest = await asyncio.to_thread(bank_digest, detector)
        except DefectscopeError as exc:
            self.load_error = str(exc)
            log.error("model not loaded: %s", exc)
            return
        except Exception:
            self.load_error = "the model failed to load (see the server log)"
            log.exception("model not loaded")
            return
        self.use_detector(detector, fingerprint, digest)

    def use_detector(
        self, detector: Detector, fingerprint: str | None = None, digest: str | None = None
    ) -> None:
        training = detector.info.get("training", {})
        if self.detector is not detector:
            self.bank_digest = digest or bank_digest(detector)
        self.model_fingerprint = fingerprint or str(training.get("fingerprint", ""))[:16]
        self.model_version = str(detector.info.get("defectscope_version", __version__))
        self.detector = detector
        self.load_error = None
        # Labelled by the memory bank, not the file: a threshold save must not add a series
        # (with several workers, a series once written stays in the shared metric files).
        identity = (
            (self.bank_digest or self.model_fingerprint)[:16],
            detector.config.backbone.name,
            self.model_version,
        )
        if identity != self.metrics_identity:
            self.metrics.model_info.clear()
            self.metrics.model_info.labels(*identity).set(1)
            self.metrics_identity = identity
        self.metrics.model_ready.set(1)

    def follow_model_file(self) -> None:
        follow_model_file(self)

    def save_thresholds(self, update: ThresholdUpdate) -> None:
        save_thresholds(self, update)

    def record(self, records: list[dict]) -> None:
        """Background task: a logging failure is a warning, never a failed request."""
        if self.repository is None or not records:
            return
        try:
            self.repository.add_many(records)
        except Exception as exc:
            log.warning("could not write %d prediction log rows: %s", len(records), exc)


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
def bounded_render(
    state: ServingState, image: np.ndarray, prediction: Prediction, flags: RenderFlags
) -> dict[str, str]:
    """Runs in a worker thread: at most two pictures are drawn at once per worker."""
    stored = state.ready_detector().threshold
    with state.render_slots:
        return render(image, prediction, flags, stored, state.settings.render_max_pixels)


@contextlib.asynccontextmanager
async def holding_pixels(state: ServingState, pixels: int) -> AsyncIterator[None]:
    """Wait until ``pixels`` fit in this worker's in-flight budget; 503 if they do not in time."""
    timeout = state.settings.request_timeout_s
    try:
        async with state.pixels.hold(pixels, timeout):
            yield
    except TimeoutError:
        raise RequestError(
            503, f"the server is busy with other images (waited {timeout:g} s); try again"
        ) from None


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
    if flags.any:
        images = await run_in_threadpool(bounded_render, state, image, prediction, flags)
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
        400: "The body is not valid JSON (or not parsable multipart).",
        401: "Missing or wrong API key (checked before the body is read).",
        408: "The request body did not arrive within the read timeouts.",
        413: "Body, upload, image or request pixels over a limit.",
        415: "Not an image (decoded by content).",
        422: "Bad request: missing field, bad base64, bad query value, corrupt image.",
        503: "The model is not loaded yet, or the worker stayed busy with other images.",
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
async def readyz(request: Request, state: State) -> JSONResponse:
    """The model is loaded and predictions can be served (readiness).

    With an API key set, the model's fingerprint and a load error are shown only to a client
    that sends the key: the status alone is public.
    """
    trusted = api_key_ok(state.settings, request.headers)
    if state.ready:
        fingerprint = state.model_fingerprint if trusted else None
        body = ReadyResponse(status="ready", model_fingerprint=fingerprint)
        return JSONResponse(body.model_dump())
    status = "failed" if state.load_error else "loading"
    body = ReadyResponse(status=status, detail=state.load_error if trusted else None)
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
        async with holding_pixels(state, pixels_within(state.settings, data)):
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
    uploads: list[bytes | RequestError] = []
    for upload in files:
        try:
            uploads.append(await read_upload(upload, settings.max_upload_bytes))
        except RequestError as exc:
            uploads.append(exc)
    sizes = [pixels_within(settings, data) for data in uploads if isinstance(data, bytes)]

    async def one(index: int, upload: UploadFile) -> tuple[BatchItem, dict | None]:
        try:
            data = uploads[index]
            if isinstance(data, RequestError):
                raise data
            result, record = await score_bytes(
                state, data, flags, started, "/v1/predict/batch", rid
            )
        except RequestError as exc:
            error = ItemError(status=exc.status, detail=exc.detail)
            return BatchItem(index=index, filename=upload.filename, error=error), None
        return BatchItem(index=index, filename=upload.filename, result=result), record

    try:
        check_request_pixels(settings, sizes)
        async with holding_pixels(state, sum(sizes)):
            # All items are queued at once, so the micro-batcher can put them in one model call.
            outcomes = await asyncio.gather(*(one(i, f) for i, f in enumerate(files)))
    except RequestError as exc:
        raise HTTPException(exc.status, exc.detail) from None
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
        await run_in_threadpool(save_thresholds, state, update)
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


def to_utc(moment: datetime) -> datetime:
    """Naive means UTC; a moment whose UTC time falls outside years 1-9999 is refused."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("date out of range once converted to UTC (years 1 to 9999)") from None


UtcDatetime = Annotated[datetime, AfterValidator(to_utc)]
Since = Annotated[UtcDatetime | None, Query(description="ISO 8601; naive means UTC.")]
Until = Annotated[UtcDatetime | None, Query(description="ISO 8601, exclusive.")]


def log_query(
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,  # SQL BIGINT range
    since: Since = None,
    until: Until = None,
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
    since: Since = None,
    until: Until = None,
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
    uploads = []
    for upload in files:
        try:
            uploads.append(await read_upload(upload, settings.max_upload_bytes))
        except RequestError as exc:
            raise HTTPException(exc.status, f"{upload.filename}: {exc.detail}") from None
    sizes = [pixels_within(settings, data) for data in uploads]
    try:
        check_request_pixels(settings, sizes)
        async with holding_pixels(state, sum(sizes)):
            images = []
            for upload, data in zip(files, uploads, strict=True):
                try:
                    images.append(await run_in_threadpool(load_image, data, settings.max_pixels))
                except ImageLoadError as exc:
                    status = image_error_status(exc)
                    raise HTTPException(status, f"{upload.filename}: {exc.reason}") from None
            report = await run_in_threadpool(monitor.check_images, detector, images)
    except RequestError as exc:
        raise HTTPException(exc.status, exc.detail) from None
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
    # Added first, so it runs innermost: inside CORS (preflights never carry a key) and inside
    # `observe`, which gives its answers a request id and counts them.
    app.add_middleware(RequestGuard, settings=settings)
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
        # A body that is not JSON at all is a 400; JSON with wrong values stays a 422.
        malformed = any(error.get("type") == "json_invalid" for error in errors)
        return JSONResponse(
            {"detail": jsonable_encoder(errors), "request_id": request_id(request)},
            status_code=400 if malformed else 422,
        )

    @app.middleware("http")
    async def observe(request: Request, call_next) -> Response:
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


def app_from_env() -> FastAPI:
    """uvicorn factory (``--factory``): every worker reads the same DEFECTSCOPE_* settings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(ServingSettings())
