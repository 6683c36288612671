"""Teaching the served model from reviewed false alarms, and switching model versions.

The detector work is `detector.teaching.extend_bank`'s; this module finds the images (the
originals the picture store kept), previews the effect on today's flagged predictions, saves
the taught model as a new version, and swaps the served detector once it is fully built.
Runs in a worker thread, one teach or activation at a time per worker (`teach_lock`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np

from defectscope.data.io import load_image
from defectscope.detector.calibration import false_alarm_rate
from defectscope.detector.detector import Detector
from defectscope.detector.teaching import (
    TeachResult,
    calibrated_thresholds,
    extend_bank,
    lineage,
)
from defectscope.errors import DefectscopeError, ImageLoadError
from defectscope.export.runtimes import load_detector
from defectscope.serving.limits import RequestError
from defectscope.serving.predictions_log import PredictionRecord
from defectscope.serving.reviews_log import flagged, mark_taught, teachable
from defectscope.serving.schemas import TeachRequest
from defectscope.serving.state import ServingState
from defectscope.serving.versions import ModelVersions

# Preview re-scores at most this many flagged predictions (the newest).
PREVIEW_MAX = 500


@contextlib.contextmanager
def exclusive(state: ServingState) -> Iterator[None]:
    """One teach or activation at a time: a second one is refused (409), not queued."""
    if not state.teach_lock.acquire(blocking=False):
        raise RequestError(409, "a teach or version change is already running; try again later")
    try:
        yield
    finally:
        state.teach_lock.release()


def torch_detector(state: ServingState) -> Detector:
    detector = state.ready_detector()
    if detector.runtime != "torch":
        raise RequestError(
            409,
            f"this server runs an exported {detector.runtime} model: teaching needs the "
            "PyTorch model",
        )
    return detector


def model_versions(state: ServingState) -> ModelVersions:
    versions = state.versions()
    if versions is None:
        raise RequestError(409, "model versions need a local model file (DEFECTSCOPE_MODEL_PATH)")
    return versions


def original(state: ServingState, record: PredictionRecord) -> np.ndarray | None:
    """The stored original of a prediction, decoded; None when it was not kept or pruned."""
    store = state.pictures
    file = store.path(record.picture_key, "image") if store is not None else None
    if file is None:
        return None
    try:
        return load_image(file.read_bytes(), state.settings.max_pixels)
    except (OSError, ImageLoadError):
        return None


def gather(
    state: ServingState, request: TeachRequest, allow_empty: bool = False
) -> tuple[list[int], list, list[int]]:
    """(ids taught, their images, ids skipped for want of a stored original)."""
    repository = state.repository
    if repository is None:
        raise RequestError(409, "teaching needs the prediction log, which is off on this server")
    limit = state.settings.teach_max_images
    records = teachable(repository, request.prediction_ids, request.since, limit + 1)
    if request.prediction_ids is not None:
        missing = sorted(set(request.prediction_ids) - {r.id for r in records})
        if missing:
            raise RequestError(
                422,
                f"not reviewed false alarms waiting to be taught: {missing[:20]} (unknown ids, "
                "another verdict, or taught already)",
            )
    if len(records) > limit:
        raise RequestError(
            413, f"more than {limit} false alarms to teach at once: give prediction_ids or since"
        )
    ids, images, skipped = [], [], []
    for record in records:
        image = original(state, record)
        if image is None:
            skipped.append(record.id)
        else:
            ids.append(record.id)
            images.append(image)
    if not images and not allow_empty:
        raise RequestError(
            422,
            "nothing to teach: no reviewed false alarm with a stored original image"
            + (f" (without one: {skipped[:20]})" if skipped else ""),
        )
    return ids, images, skipped


def taught(state: ServingState, request: TeachRequest) -> tuple[TeachResult, list[int], list[int]]:
    detector = torch_detector(state)
    ids, images, skipped = gather(state, request)
    try:
        result = extend_bank(detector, images)
    except DefectscopeError as exc:
        raise RequestError(409, str(exc)) from None
    return result, ids, skipped


def preview(state: ServingState, request: TeachRequest) -> dict[str, Any]:
    """What teaching would do, without saving anything: how many of the flagged predictions
    (since ``flagged_since``, default today UTC) would pass with the taught bank."""
    with exclusive(state):
        current = torch_detector(state)
        ids, images, skipped = gather(state, request, allow_empty=True)
        since = request.flagged_since or datetime.now(UTC).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        assert state.repository is not None  # gather refused otherwise
        total, records = flagged(state.repository, since, PREVIEW_MAX)
        if not images:  # nothing to teach: nothing would change
            return nothing_to_teach(current, total, skipped, since)
        try:
            result = extend_bank(current, images)
        except DefectscopeError as exc:
            raise RequestError(409, str(exc)) from None
        new = result.detector
        would_clear = rescored = 0
        for record in records:
            image = original(state, record)
            if image is None:
                continue
            rescored += 1
            if not new.predict(image)[0].is_anomalous:
                would_clear += 1
        calibration = new.calibration
        assert calibration is not None
        return {
            "images": result.images,
            "prediction_ids": ids,
            "skipped": skipped,
            "bank_rows_added": result.bank_rows_added,
            "bank_rows": result.bank_rows,
            "flagged_total": total,
            "rescored": rescored,
            "would_clear": would_clear,
            "flagged_since": since.isoformat(),
            "current_threshold": current.threshold,
            "new_threshold": new.threshold,
            "calibrated_threshold": result.calibrated_threshold,
            "expected_false_alarm_rate": false_alarm_rate(calibration.good_scores, new.threshold),
        }


def nothing_to_teach(
    current: Detector, total: int, skipped: list[int], since: datetime
) -> dict[str, Any]:
    calibration = current.calibration
    assert calibration is not None
    return {
        "images": 0,
        "prediction_ids": [],
        "skipped": skipped,
        "bank_rows_added": 0,
        "bank_rows": int(current.memory_bank.shape[0]),
        "flagged_total": total,
        "rescored": 0,
        "would_clear": 0,
        "flagged_since": since.isoformat(),
        "current_threshold": current.threshold,
        "new_threshold": current.threshold,
        "calibrated_threshold": calibrated_thresholds(calibration)[0],
        "expected_false_alarm_rate": false_alarm_rate(calibration.good_scores, current.threshold),
    }


def teach(state: ServingState, request: TeachRequest, who: str) -> dict[str, Any]:
    """Teach, save as a new version, serve it at once, and mark the predictions taught."""
    # The threshold lock too: a threshold saved meanwhile would be lost in the new version.
    with exclusive(state), state.threshold_lock:
        versions = model_versions(state)
        parent_detector = torch_detector(state)
        result, ids, skipped = taught(state, request)
        versions.ensure_first()
        parent = state.served_version or "1"
        extras = {
            "lineage": lineage(
                parent_detector,
                result,
                parent_version=parent,
                prediction_ids=ids,
                created_by=who,
            ),
            "threshold_audit": list(state.model_extras.get("threshold_audit") or []),
            "calibrated_threshold": result.calibrated_threshold,
            "calibrated_pixel_threshold": result.calibrated_pixel_threshold,
        }
        try:
            version = versions.add(result.detector, extras)
            versions.activate(version)
        except (OSError, DefectscopeError) as exc:
            raise RequestError(409, f"cannot save the taught model: {exc}") from None
        state.swap(result.detector, version, versions.file(version))
        assert state.repository is not None
        mark_taught(state.repository, ids, version)
        return {
            "version": version,
            "parent": parent,
            "images": result.images,
            "prediction_ids": ids,
            "skipped": skipped,
            "bank_rows_added": result.bank_rows_added,
            "bank_rows": result.bank_rows,
            "threshold": result.detector.threshold,
        }


def activate(state: ServingState, version: str) -> dict[str, Any]:
    """Serve another version (undo: the parent's): loaded in full, then swapped in."""
    with exclusive(state), state.threshold_lock:
        versions = model_versions(state)
        if not versions.exists(version):
            raise RequestError(404, f"no model version {version}")
        file = versions.file(version)
        settings = state.settings
        try:
            detector = load_detector(file, settings.runtime, settings.device)
        except DefectscopeError as exc:
            raise RequestError(409, f"cannot load version {version}: {exc}") from None
        versions.activate(version)
        state.swap(detector, str(int(version)), file)
        return versions.describe()
