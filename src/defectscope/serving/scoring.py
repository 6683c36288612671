"""The shared path of the predict routes: decode, predict (micro-batched), render, and the
worker's in-flight pixel budget that bounds what decoded images may cost in memory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator

import numpy as np
from starlette.concurrency import run_in_threadpool

from defectscope.data.io import load_image
from defectscope.detector.prediction import Prediction
from defectscope.errors import ImageLoadError
from defectscope.serving.limits import RequestError
from defectscope.serving.pictures import RenderFlags, render
from defectscope.serving.predictions_log import utc_now
from defectscope.serving.schemas import PredictionResult, Timing
from defectscope.serving.state import ServingState
from defectscope.serving.uploads import image_error_status


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


async def decode(state: ServingState, data: bytes) -> np.ndarray:
    """`load_image` in a worker thread; an unreadable image is a 413, 415 or 422."""
    try:
        return await run_in_threadpool(load_image, data, state.settings.max_pixels)
    except ImageLoadError as exc:
        raise RequestError(image_error_status(exc), exc.reason) from None


def bounded_render(
    state: ServingState, image: np.ndarray, prediction: Prediction, flags: RenderFlags
) -> dict[str, str]:
    """Runs in a worker thread: at most two pictures are drawn at once per worker."""
    stored = state.ready_detector().threshold
    with state.render_slots:
        return render(image, prediction, flags, stored, state.settings.render_max_pixels)


async def score_bytes(
    state: ServingState, data: bytes, flags: RenderFlags, started: float, route: str, rid: str
) -> tuple[PredictionResult, dict]:
    """One image's answer and its prediction log row (written later, in the background)."""
    t0 = time.perf_counter()
    image = await decode(state, data)
    t1 = time.perf_counter()
    timeout = state.settings.request_timeout_s
    try:
        prediction = await asyncio.wait_for(state.batcher.submit(image, flags.threshold), timeout)
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
    summary.pop("source")
    result = PredictionResult(
        **summary,
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
    state.metrics.observe_prediction(result.normalized_score, result.is_anomalous)
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
