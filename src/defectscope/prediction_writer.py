"""Writes predictions to disk: one JSONL and one CSV row per image, plus heatmap/overlay/mask PNGs.

File names come from each image's path relative to the inputs' common folder, so
``broken_large/000.png`` and ``contamination/000.png`` never overwrite each other. The
pictures are `visualize.render_prediction`'s, the same as the REST API answers with.

Pictures are drawn and PNG-encoded in a small background thread pool (zlib and most of the
drawing release the GIL), so they overlap the model's next batch. At most ``max_pending``
pictures sets wait or run at once: ``write`` blocks beyond that, which bounds the memory of
queued images and maps however many images are scored.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from defectscope.data.io import load_image
from defectscope.detector.prediction import Prediction
from defectscope.errors import ImageLoadError

# Pictures of a larger image are shrunk by a whole factor first (bounded time and memory each).
PICTURE_MAX_PIXELS = 4_000_000
# zlib level 1: a few times faster than the default 6 for files about a third larger.
PNG_COMPRESS_LEVEL = 1

CSV_FIELDS = [
    "source",
    "output_name",
    "score",
    "normalized_score",
    "is_anomalous",
    "label",
    "threshold",
    "pixel_threshold",
    "defect_area_fraction",
    "height",
    "width",
    "error",
]


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would evaluate, quoted with a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def json_safe(value: Any) -> Any:
    """NaN and infinities as null: ``json.dumps`` would write them as invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def unique_output_names(paths: list[Path]) -> list[str]:
    """Readable, collision-free names derived from the paths below their common folder."""
    resolved = [p.resolve() for p in paths]
    try:
        common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if resolved else Path()
    except ValueError:  # different drives
        common = Path()
    names: list[str] = []
    seen: dict[str, int] = {}
    for path in resolved:
        try:
            relative = path.relative_to(common)
        except ValueError:
            relative = Path(path.name)
        stem = "__".join((*relative.parent.parts, relative.stem)) or "image"
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}_{count}")
    return names


class PredictionWriter:
    def __init__(
        self,
        out_dir: Path,
        paths: list[Path],
        detector: Any,
        write_images: bool = True,
        *,
        workers: int = 2,
        max_pending: int = 8,
        max_pixels: int | None = PICTURE_MAX_PIXELS,
    ) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError("workers and max_pending must be at least 1")
        self.out_dir = Path(out_dir)
        self.paths = paths
        self.names = unique_output_names(paths)
        self.write_images = write_images
        self.detector = detector
        self.jsonl_path = self.out_dir / "results.jsonl"
        self.csv_path = self.out_dir / "results.csv"
        self.n_anomalous = 0
        self.workers = workers
        self.max_pending = max_pending
        self.max_pixels = max_pixels
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future[None]] = []

    def __enter__(self) -> PredictionWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.write_images:
            (self.out_dir / "images").mkdir(exist_ok=True)
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="defectscope-png")
        self._jsonl = self.jsonl_path.open("w")
        self._csv_file = self.csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")
        self._csv.writeheader()
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._pool is not None:
                # Every queued picture is written before the results count as done.
                self._pool.shutdown(wait=True, cancel_futures=exc is not None)
                self._pool = None
                if exc is None:
                    self._raise_failures(wait=True)
        finally:
            self._jsonl.close()
            self._csv_file.close()

    def write(
        self, index: int, result: Prediction | Exception, image: np.ndarray | None = None
    ) -> None:
        """One result row; ``image`` is the decoded image the prediction was made from, for its
        overlay (without it, the image is decoded again from ``result.source``)."""
        name = self.names[index]
        if isinstance(result, Exception):
            reason = result.reason if isinstance(result, ImageLoadError) else str(result)
            row: dict[str, Any] = {
                "source": str(self.paths[index]),
                "output_name": name,
                "error": reason,
            }
        else:
            row = {**result.summary(), "output_name": name, "error": None}
            self.n_anomalous += int(result.is_anomalous)
            if self.write_images:
                row["files"] = self._queue_images(name, result, image)
        row = json_safe(row)
        self._jsonl.write(json.dumps(row, allow_nan=False) + "\n")
        self._csv.writerow({key: csv_safe(value) for key, value in row.items()})

    def _queue_images(
        self, name: str, prediction: Prediction, image: np.ndarray | None
    ) -> dict[str, str]:
        """The pictures' file names now; the files themselves from the pool."""
        if self._pool is None:
            raise RuntimeError("PredictionWriter is used outside its 'with' block")
        self._raise_failures(wait=False)
        has_image = image is not None or bool(prediction.source)
        files = {
            picture: f"images/{name}_{picture}.png"
            for picture in ("heatmap", "mask", "overlay")  # the results' key order
            if picture != "overlay" or has_image
        }
        self._slots.acquire()
        try:
            future = self._pool.submit(self._write_images, files, prediction, image)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)
        return files

    def _raise_failures(self, wait: bool) -> None:
        """Re-raise the first failure of a finished picture job; forget the finished ones."""
        pending = []
        for future in self._futures:
            if wait or future.done():
                error = future.exception()
                if error is not None:
                    raise error
            else:
                pending.append(future)
        self._futures = pending

    def _write_images(
        self, files: dict[str, str], prediction: Prediction, image: np.ndarray | None
    ) -> None:
        from defectscope.visualize import render_prediction, save_png

        if image is None and prediction.source:
            image = load_image(prediction.source)
        # The stored threshold, not a --threshold override: one colour scale for every run.
        pictures = render_prediction(
            prediction,
            image,
            self.detector.threshold,
            pictures=tuple(files),
            max_pixels=self.max_pixels,
        )
        for picture, relative in files.items():
            save_png(pictures[picture], self.out_dir / relative, PNG_COMPRESS_LEVEL)
