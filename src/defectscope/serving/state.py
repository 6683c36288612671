"""What one worker process serves: the loaded detector, its identity, batcher and prediction log.

`create_app` builds one `ServingState` per app; routes reach it through ``Depends(get_state)``.
The model loads in the background after start-up, so /healthz answers (and /readyz says 503)
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException

from defectscope import storage
from defectscope.detector.detector import Detector
from defectscope.detector.model_file import resolve_model_path
from defectscope.detector.prediction import Prediction
from defectscope.detector.teaching import model_extras
from defectscope.errors import DefectscopeError
from defectscope.export.runtimes import load_detector
from defectscope.features.backbones import BackboneCache
from defectscope.serving.batching import MicroBatcher
from defectscope.serving.limits import PixelBudget
from defectscope.serving.metrics import Metrics
from defectscope.serving.picture_store import PictureStore
from defectscope.serving.predictions_log import PredictionLogRepository
from defectscope.serving.schemas import ThresholdUpdate
from defectscope.serving.settings import ServingSettings
from defectscope.serving.thresholds import (
    bank_digest,
    file_fingerprint,
    follow_model_file,
    save_thresholds,
)
from defectscope.serving.versions import ModelVersions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What one request scores with, taken once at its start: a swap (reload, teach,
    activation) meanwhile changes neither the detector it uses nor the version it names."""

    detector: Detector
    model_version: str
    model_fingerprint: str
    served_version: str
    log_version: str


@dataclass
class ServingState:
    settings: ServingSettings
    metrics: Metrics = field(default_factory=Metrics)
    detector: Detector | None = None
    load_error: str | None = None
    model_fingerprint: str = ""
    model_version: str = ""
    repository: PredictionLogRepository | None = None
    tasks: set[asyncio.Task] = field(default_factory=set)
    # PUT /v1/model/thresholds: one writer at a time; other workers follow the file's mtime.
    threshold_lock: threading.Lock = field(default_factory=threading.Lock)
    model_mtime_ns: int | None = None
    model_checked_at: float = 0.0
    bank_digest: str | None = None
    # The model version served ("" when unversioned) and its file's extra metadata.
    served_version: str = ""
    model_extras: dict[str, Any] = field(default_factory=dict)
    pictures: PictureStore | None = None
    # Decoded images kept for their pictures after the answer: bounded like in-flight ones.
    picture_pixels: int = 0
    picture_lock: threading.Lock = field(default_factory=threading.Lock)
    # Teach and activate: one at a time per worker (others get 409, not a queue).
    teach_lock: threading.Lock = field(default_factory=threading.Lock)
    reloading: bool = False
    batcher: MicroBatcher = field(init=False)
    pixels: PixelBudget = field(init=False)
    # Pictures cost tens of bytes a pixel while drawn: two at a time bounds that memory.
    render_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(2)
    )
    # Several models in one service: this model's name, and whether it is the one /v1/predict
    # serves (which alone sets the model_info metric and readiness).
    model_name: str = ""
    primary: bool = True
    # The version an unversioned file is served as (a registry model's NAME@N).
    version_label: str = ""
    backbone_cache: BackboneCache | None = None
    # A named model's state shares the service's picture accounting through its parent.
    parent: ServingState | None = None
    # serve --watch: the folder watch of the default model (a FolderWatch), if any.
    folder_watch: Any = None

    def __post_init__(self) -> None:
        settings = self.settings
        self.pixels = PixelBudget(settings.inflight_pixel_budget)
        self.batcher = MicroBatcher(
            self.predict,
            max_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            on_batch=self.metrics.batch_size.observe,
        )

    def versions(self) -> ModelVersions | None:
        """The served model's versions folder; None for a remote or missing model."""
        path = self.settings.model_path
        if path is None or storage.is_remote(path):
            return None
        try:
            return ModelVersions(path)
        except DefectscopeError:
            return None

    @property
    def save_path(self) -> str | Path | None:
        """Where the served model is saved (thresholds): the active version's file, if any."""
        versions = self.versions()
        # A registry model's version (NAME@N) is a label, not a versions-folder number.
        if versions is not None and versions.exists(self.served_version):
            return versions.file(self.served_version)
        return self.settings.model_path

    @property
    def log_version(self) -> str:
        """What a logged prediction names as its model: the version, else the fingerprint."""
        return self.served_version or self.model_fingerprint

    @property
    def ready(self) -> bool:
        return self.detector is not None and self.detector.is_fitted

    def ready_detector(self) -> Detector:
        """The served detector; HTTP 503 (with the load error, if any) until it is ready."""
        detector = self.detector
        if detector is None or not detector.is_fitted:
            raise HTTPException(503, self.load_error or "the model is still loading")
        return detector

    def served(self) -> Served:
        """The detector and identity a request uses from its start to its answer (HTTP 503
        until ready)."""
        return Served(
            self.ready_detector(),
            self.model_version,
            self.model_fingerprint,
            self.served_version,
            self.log_version,
        )

    def predict(
        self,
        images: Sequence[np.ndarray],
        threshold: float | None,
        detector: Detector | None = None,
    ) -> list[Prediction]:
        # Runs in the batcher's worker thread, with the detector each request took at its start
        # (the batcher never mixes detectors in one call); else the one served now.
        detector = detector or self.ready_detector()
        return detector.predict(images, threshold=threshold, batch_size=len(images))

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start batching, open the prediction log, and load the model in the background."""
        await self.batcher.start()
        if self.settings.prediction_log_url:
            try:
                self.repository = await asyncio.to_thread(
                    PredictionLogRepository, self.settings.prediction_log_url
                )
            except Exception as exc:
                log.warning("prediction log disabled: cannot open it: %s", exc)
        root = self.settings.pictures_root
        if self.repository is not None and root is not None:
            try:
                self.pictures = await asyncio.to_thread(self.open_pictures, root)
            except OSError as exc:
                log.warning("prediction pictures disabled: %s", exc)
        if not self.ready:
            task = asyncio.create_task(self.load_model())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        if self.settings.watch_dir is not None and self.primary and self.parent is None:
            from defectscope.serving.folder_watch import FolderWatch

            self.folder_watch = FolderWatch(self)
            self.folder_watch.start()

    def open_pictures(self, root: Path) -> PictureStore:
        settings = self.settings
        store = PictureStore(
            root,
            settings.pictures_max_count,
            settings.pictures_max_age_days,
            settings.pictures_max_bytes,
        )
        store.prune()
        return store

    async def stop(self) -> None:
        if self.folder_watch is not None:
            await asyncio.to_thread(self.folder_watch.stop)
        for task in list(self.tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.batcher.stop()
        if self.repository is not None:
            self.repository.close()

    async def load_model(self) -> None:
        settings = self.settings
        if settings.model_path is None:
            self.load_error = "no model configured (set DEFECTSCOPE_MODEL_PATH)"
            return
        versions = self.versions()
        version = versions.active() if versions is not None else None
        path = versions.file(version) if versions is not None and version else settings.model_path
        try:
            # Before loading: a threshold saved meanwhile by another worker is then picked up.
            self.model_mtime_ns = resolve_model_path(path).stat().st_mtime_ns
            detector = await asyncio.to_thread(
                load_detector, path, settings.runtime, settings.device, self.backbone_cache
            )
            fingerprint = await asyncio.to_thread(file_fingerprint, path)
            digest = await asyncio.to_thread(bank_digest, detector)
            extras = await asyncio.to_thread(self.read_extras, path, detector)
        except DefectscopeError as exc:
            self.load_error = str(exc)
            log.error("model not loaded: %s", exc)
            return
        except Exception:
            self.load_error = "the model failed to load (see the server log)"
            log.exception("model not loaded")
            return
        self.served_version = version or self.version_label
        self.model_extras = extras
        self.use_detector(detector, fingerprint, digest)

    @staticmethod
    def read_extras(path: str | Path, detector: Detector) -> dict[str, Any]:
        if detector.runtime != "torch":
            return {}
        return model_extras(path)

    def reload_soon(self) -> None:
        """Load the model again in the background (another worker activated a version)."""
        if self.reloading:
            return
        self.reloading = True

        async def reload() -> None:
            try:
                await self.load_model()
            finally:
                self.reloading = False

        task = asyncio.get_running_loop().create_task(reload())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def swap(self, detector: Detector, version: str, file: Path) -> None:
        """Serve a fully built ``detector`` from now on: requests in flight keep the old one."""
        fingerprint = file_fingerprint(file)
        digest = bank_digest(detector)
        extras = model_extras(file)
        self.model_mtime_ns = file.stat().st_mtime_ns
        self.served_version = version
        self.model_extras = extras
        self.use_detector(detector, fingerprint, digest)

    def use_detector(
        self, detector: Detector, fingerprint: str | None = None, digest: str | None = None
    ) -> None:
        """Serve ``detector``; ``fingerprint`` is the model file's (default: the training's)."""
        if self.detector is not detector:
            self.bank_digest = digest or bank_digest(detector)
        self.model_fingerprint = fingerprint or detector.info.training.fingerprint[:16]
        self.model_version = detector.info.defectscope_version
        self.detector = detector
        self.load_error = None
        # Labelled by the memory bank, not the file: a threshold save must not add a series
        # (with several workers, a series once written stays in the shared metric files).
        identity = (
            (self.bank_digest or self.model_fingerprint)[:16],
            detector.config.backbone.name,
            self.model_version,
        )
        if self.model_name:
            self.metrics.model_loaded.labels(self.model_name).set(1)
        if self.primary:
            self.metrics.set_model(identity)

    # ----------------------------------------------------------------------- thresholds
    def follow_model_file(self) -> None:
        follow_model_file(self)

    def save_thresholds(self, update: ThresholdUpdate) -> None:
        save_thresholds(self, update)
