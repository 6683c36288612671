"""Pictures of logged predictions on disk: a thumbnail, the overlay and the original image.

One folder per prediction, ``<root>/<key>/{thumbnail,overlay,image}.png``, named by a random key
kept in the prediction's log row. Sizes are bounded (thumbnail 256 px, overlay 1024 px on the
longer side; the original only under a byte limit), and the store is pruned by age, count and
total bytes, oldest first, so the disk it takes never grows without bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.detector.prediction import Prediction
from defectscope.visualize import render_prediction

log = logging.getLogger(__name__)

KINDS = ("thumbnail", "overlay", "image")
THUMBNAIL_SIDE = 256
OVERLAY_SIDE = 1024
# A full scan of the store costs a stat per file: done on start and every this many saves.
PRUNE_EVERY = 50


def bounded(array: np.ndarray, side: int) -> Image.Image:
    picture = Image.fromarray(array)
    if max(picture.size) > side:
        picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    return picture


@dataclass
class PictureStore:
    root: Path
    max_count: int = 10_000
    max_age_days: float = 30.0
    max_bytes: int = 5 * 1024**3

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._saves = 0
        self._lock = threading.Lock()

    @staticmethod
    def new_key() -> str:
        return uuid.uuid4().hex

    def folder(self, key: str) -> Path:
        if not key.isalnum():  # keys are ours (hex); never a path from outside
            raise ValueError(f"bad picture key {key!r}")
        return self.root / key

    def path(self, key: str | None, kind: str) -> Path | None:
        """The stored picture's file, or None when it was never kept or was pruned."""
        if not key or kind not in KINDS:
            return None
        file = self.folder(key) / f"{kind}.png"
        return file if file.is_file() else None

    def has(self, key: str | None) -> bool:
        return bool(key) and self.path(key, "thumbnail") is not None

    def save(
        self,
        key: str,
        image: np.ndarray,
        prediction: Prediction,
        stored_threshold: float,
        *,
        keep_original: bool,
        render_max_pixels: int,
    ) -> None:
        """Write the pictures to a temporary folder, then move it in place (never half seen)."""
        target = self.folder(key)
        staging = self.root / f".{key}.tmp"
        staging.mkdir(parents=True, exist_ok=True)
        try:
            bounded(image, THUMBNAIL_SIDE).save(staging / "thumbnail.png", compress_level=6)
            pictures = render_prediction(
                prediction,
                image,
                stored_threshold,
                pictures=("overlay",),
                max_pixels=render_max_pixels,
            )
            bounded(pictures["overlay"], OVERLAY_SIDE).save(
                staging / "overlay.png", compress_level=6
            )
            if keep_original:
                Image.fromarray(image).save(staging / "image.png", compress_level=1)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        with self._lock:
            self._saves += 1
            due = self._saves % PRUNE_EVERY == 0
        if due:
            self.prune()

    def prune(self, now: float | None = None) -> int:
        """Delete the oldest folders beyond the age, count and bytes limits; how many went."""
        now = time.time() if now is None else now
        entries: list[tuple[float, int, Path]] = []
        with contextlib.suppress(FileNotFoundError):
            for folder in self.root.iterdir():
                if folder.name.startswith(".") or not folder.is_dir():
                    continue
                try:
                    files = [f.stat() for f in folder.iterdir()]
                    mtime = folder.stat().st_mtime
                except FileNotFoundError:
                    continue  # pruned meanwhile by another worker
                entries.append((mtime, sum(f.st_size for f in files), folder))
        entries.sort(key=lambda entry: entry[0])  # oldest first
        total = sum(size for _, size, _ in entries)
        max_age = self.max_age_days * 86400.0
        removed = 0
        for index, (mtime, size, folder) in enumerate(entries):
            left = len(entries) - index
            too_old = self.max_age_days > 0 and now - mtime > max_age
            if not too_old and left <= self.max_count and total <= self.max_bytes:
                break
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            removed += 1
        if removed:
            log.info("pruned the pictures of %d predictions from %s", removed, self.root)
        return removed
