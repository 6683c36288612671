"""Thresholds saved through the API, with several worker processes on one model file.

Each worker holds its own detector. A save is a read-modify-write of the file under an
exclusive lock: it starts from the thresholds in the file (another worker may have saved one a
moment ago), changes only the fields the request gives and writes the file back. The other
workers adopt the file's thresholds when its modification time changes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defectscope.detector.calibration import FIT_SOURCE
from defectscope.detector.detector import Detector
from defectscope.detector.model_file import (
    model_file_lock,
    read_header,
    resolve_model_path,
    tensor_digest,
)
from defectscope.detector.teaching import EXTRA_KEYS, calibrated_thresholds, save_model
from defectscope.errors import DefectscopeError
from defectscope.serving.limits import RequestError
from defectscope.serving.schemas import ThresholdUpdate

if TYPE_CHECKING:
    from defectscope.serving.state import ServingState

log = logging.getLogger(__name__)

# The audit trail in the model file keeps this many newest entries.
MAX_AUDIT = 1000


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with resolve_model_path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def bank_digest(detector: Detector) -> str | None:
    """The memory bank's checksum as the model file records it; None for exported runtimes."""
    if detector.runtime != "torch":
        return None
    return tensor_digest(detector.memory_bank)


def same_model(stored: dict[str, Any], digest: str | None) -> bool:
    """Whether a header describes the bank this worker serves (not a model refitted since)."""
    checksums = stored.get("tensor_sha256")
    return isinstance(checksums, dict) and checksums.get("memory_bank") == digest


def calibrated(stored: dict[str, Any]) -> tuple[float, float]:
    """The thresholds the fit's rule gives (kept in the metadata once known, else computed)."""
    from defectscope.detector.calibration import Calibration

    rule = calibrated_thresholds(Calibration.from_dict(stored["calibration"]))
    return (
        float(stored.get("calibrated_threshold", rule[0])),
        float(stored.get("calibrated_pixel_threshold", rule[1])),
    )


def audited(
    stored: dict[str, Any], update: ThresholdUpdate, image: float | None, pixel: float | None
) -> dict[str, Any]:
    """The file's extra metadata with this save appended to its audit trail."""
    extras = {key: stored[key] for key in EXTRA_KEYS if key in stored}
    extras["calibrated_threshold"], extras["calibrated_pixel_threshold"] = calibrated(stored)
    old = stored["calibration"]
    when = datetime.now(UTC).isoformat()
    trail = list(extras.get("threshold_audit") or [])
    for name, key, new in (("image", "threshold", image), ("pixel", "pixel_threshold", pixel)):
        if new is None:
            continue
        trail.append(
            {
                "who": update.reviewer or "anonymous",
                "when": when,
                "field": name,
                "old": old[key],
                "new": float(new),
                "reason": update.reason or ("reset to calibrated" if update.reset else None),
            }
        )
    extras["threshold_audit"] = trail[-MAX_AUDIT:]
    return extras


def save_thresholds(state: ServingState, update: ThresholdUpdate) -> None:
    """Apply new thresholds and persist them to the served model file, or change nothing."""
    detector, path = state.ready_detector(), state.save_path
    runtime = detector.runtime
    if runtime != "torch":
        raise RequestError(
            409,
            f"this server runs an exported {runtime} model, whose thresholds are fixed in the "
            "exported file: set them on the PyTorch model and export it again",
        )
    if path is None:
        raise RequestError(409, "this server has no model file to save thresholds to")
    try:
        file = resolve_model_path(path)
    except DefectscopeError as exc:
        raise RequestError(409, f"cannot save the model file {path}: {exc}") from None
    # The thread lock orders this worker's own requests; the file lock orders the workers.
    with state.threshold_lock, model_file_lock(file):
        try:
            stored = read_header(file)
        except DefectscopeError as exc:
            raise RequestError(409, f"cannot read the model file {path}: {exc}") from None
        if not same_model(stored, state.bank_digest):
            raise RequestError(
                409,
                f"the model file {path} now holds another model (refitted?): restart the server "
                "to serve it, then save the thresholds again",
            )
        previous = detector.calibration
        current = stored["calibration"]  # validated when the header was read
        image, pixel = update.image, update.pixel
        source = "ui"
        if update.reset:
            image, pixel = calibrated(stored)
            source = FIT_SOURCE
        try:
            extras = audited(stored, update, image, pixel)
            detector.set_thresholds(
                current["threshold"], current["pixel_threshold"], current["threshold_source"]
            )
            detector.set_thresholds(image, pixel, source=source)
            saved = save_model(detector, path, extras)
        except Exception as exc:  # OSError, SafetensorError...: any failure to write
            detector.calibration = previous
            log.warning("thresholds not saved to %s: %s", path, exc)
            raise RequestError(409, f"cannot save the model file {path}: {exc}") from None
        # The local file (for a remote model, its cached copy), as in follow_model_file.
        file = resolve_model_path(saved)
        state.model_mtime_ns = file.stat().st_mtime_ns
        state.model_extras = extras
        state.use_detector(detector, file_fingerprint(file))


def follow_model_file(state: ServingState) -> None:
    """Adopt thresholds that another worker saved to the model file since we loaded it.

    A cheap stat (at most once a second) and a header read keep the workers in agreement
    without reloading the memory bank.
    """
    now = time.monotonic()
    path = state.save_path
    if path is None or not state.ready or now - state.model_checked_at < 1.0:
        return
    state.model_checked_at = now
    detector = state.ready_detector()
    if detector.runtime != "torch":
        return
    versions = state.versions()
    if versions is not None and (versions.active() or "") != state.served_version:
        state.reload_soon()  # another worker activated a version: load it in the background
        return
    try:
        file = resolve_model_path(path)
        mtime = file.stat().st_mtime_ns
        if state.model_mtime_ns is None or mtime == state.model_mtime_ns:
            state.model_mtime_ns = mtime
            return
        stored = read_header(file)
        state.model_mtime_ns = mtime
        if not same_model(stored, state.bank_digest):
            log.warning("%s now holds another model; restart the server to serve it", file)
            return
        calibration = stored["calibration"]
        detector.set_thresholds(
            calibration["threshold"],
            calibration["pixel_threshold"],
            calibration["threshold_source"],
        )
        state.model_extras = {key: stored[key] for key in EXTRA_KEYS if key in stored}
        state.use_detector(detector, file_fingerprint(file))
    except (DefectscopeError, OSError, KeyError, TypeError) as exc:
        log.warning("could not re-read thresholds from the model file: %s", exc)
