"""The shared path of the predict routes: decode, predict (micro-batched), render, and the
worker's in-flight pixel budget that bounds what decoded images may cost in memory."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from defectscope.data.io import load_image
from defectscope.detector.prediction import Prediction
from defectscope.errors import ImageLoadError
from defectscope.serving.limits import RequestError
from defectscope.serving.pictures import RenderFlags, render
from defectscope.serving.predictions_log import join_tags, utc_now
from defectscope.serving.request_meta import PartInfo
from defectscope.serving.schemas import PredictionResult, Timing
from defectscope.serving.state import Served, ServingState
from defectscope.serving.uploads import image_error_status

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """One scored image on its way to the log: the row, and what its pictures are drawn from."""

    record: dict
    image: np.ndarray
    prediction: Prediction
    keep_original: bool
    stored_threshold: float
    logged: bool = False


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
    state: ServingState,
    image: np.ndarray,
    prediction: Prediction,
    flags: RenderFlags,
    stored: float,
) -> dict[str, str]:
    """Runs in a worker thread: at most two pictures are drawn at once per worker."""
    with state.render_slots:
        return render(image, prediction, flags, stored, state.settings.render_max_pixels)


async def score_bytes(
    state: ServingState,
    data: bytes,
    flags: RenderFlags,
    started: float,
    route: str,
    rid: str,
    part: PartInfo | None = None,
    served: Served | None = None,
) -> tuple[PredictionResult, Scored]:
    """One image's answer and its prediction log row (see `log_scored`), scored by
    ``served`` (what the request took at its start; default: the detector served now)."""
    t0 = time.perf_counter()
    served = served or state.served()  # one detector and version from here to the answer
    image = await decode(state, data)
    t1 = time.perf_counter()
    timeout = state.settings.request_timeout_s
    try:
        prediction = await asyncio.wait_for(
            state.batcher.submit(image, flags.threshold, served.detector), timeout
        )
    except TimeoutError:
        raise RequestError(
            504, f"the model did not answer within {timeout:g} s (server overloaded?); try again"
        ) from None
    t2 = time.perf_counter()
    images = {}
    if flags.any:
        stored_threshold = served.detector.threshold
        images = await run_in_threadpool(
            bounded_render, state, image, prediction, flags, stored_threshold
        )
    total_ms = (time.perf_counter() - started) * 1000.0
    summary = prediction.summary()
    summary.pop("source")
    result = PredictionResult(
        **summary,
        model_version=served.model_version,
        model_fingerprint=served.model_fingerprint,
        served_version=served.served_version,
        timing_ms=Timing(
            decode_ms=(t1 - t0) * 1000.0,
            inference_ms=(t2 - t1) * 1000.0,
            model_ms=float(prediction.timings.get("model_ms", 0.0)),
            total_ms=total_ms,
        ),
        **images,
    )
    state.metrics.observe_prediction(result.normalized_score, result.is_anomalous, state.model_name)
    record = {
        "created_at": utc_now(),
        "route": route,
        "request_id": rid,
        "model_fingerprint": served.model_fingerprint,
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "width": result.width,
        "height": result.height,
        "score": result.score,
        "normalized_score": result.normalized_score,
        "is_anomalous": result.is_anomalous,
        "threshold": result.threshold,
        "latency_ms": total_ms,
        "model_version": served.log_version,
        "model_name": state.model_name or None,
    }
    if part is not None:
        record.update(
            part_id=part.part_id, line=part.line, station=part.station, tags=join_tags(part.tags)
        )
    pixels = int(image.shape[0]) * int(image.shape[1])
    if state.pictures is not None and reserve_picture_pixels(state, pixels):
        record["picture_key"] = state.pictures.new_key()
    keep = len(data) <= state.settings.pictures_original_max_bytes
    return result, Scored(record, image, prediction, keep, served.detector.threshold)


def reserve_picture_pixels(state: ServingState, pixels: int) -> bool:
    """Whether this image's pictures may wait for the background: decoded images waiting for
    their pictures hold at most one in-flight pixel budget; beyond it a prediction is logged
    without pictures rather than the worker's memory growing."""
    owner = state.parent or state  # one budget for all the models of a service
    with owner.picture_lock:
        if owner.picture_pixels + pixels > state.settings.inflight_pixel_budget:
            log.warning("pictures skipped for a prediction: too many waiting to be drawn")
            return False
        owner.picture_pixels += pixels
        return True


def release_picture_pixels(state: ServingState, item: Scored) -> None:
    if item.record.get("picture_key"):
        owner = state.parent or state
        with owner.picture_lock:
            owner.picture_pixels -= int(item.image.shape[0]) * int(item.image.shape[1])


async def log_scored(
    state: ServingState, results: Sequence[PredictionResult], scored: Sequence[Scored]
) -> None:
    """Write the rows now (their ids go into the answers); a failing log fails no request."""
    repository = state.repository
    if repository is None or not scored:
        return
    try:
        ids = await run_in_threadpool(repository.add_many, [s.record for s in scored])
    except Exception as exc:
        log.warning("could not write %d prediction log rows: %s", len(scored), exc)
        return
    for result, item, prediction_id in zip(results, scored, ids, strict=False):
        result.prediction_id = prediction_id
        item.logged = True


def save_pictures(state: ServingState, scored: Sequence[Scored]) -> None:
    """Background task: draw and store the pictures of logged predictions (bounded sizes)."""
    store = state.pictures
    if store is None:
        return
    for item in scored:
        key = item.record.get("picture_key")
        if not key:
            continue
        if not item.logged:
            release_picture_pixels(state, item)  # the row was not written: no pictures
            continue
        try:
            with state.render_slots:
                store.save(
                    key,
                    item.image,
                    item.prediction,
                    item.stored_threshold,
                    keep_original=item.keep_original,
                    render_max_pixels=state.settings.render_max_pixels,
                )
        except Exception as exc:  # a full disk must not fail later requests
            log.warning("could not store the pictures of a prediction: %s", exc)
        finally:
            release_picture_pixels(state, item)
