"""BentoML service over the same `Detector` core, with BentoML's adaptive batching.

Run it with ``defectscope bento MODEL [--runtime torch|onnx|openvino]`` or directly::

    DEFECTSCOPE_MODEL_PATH=models/bottle bentoml serve \
        defectscope.serving.bento_service:DefectscopeService

Routes (BentoML APIs are POST):

- ``/v1/predict``: multipart field ``images`` (repeat it for several images) -> a JSON list with
  one result per image. Concurrent requests are merged by BentoML's dispatcher into one
  `Detector.predict` call (up to ``DEFECTSCOPE_BENTO_MAX_BATCH`` images, waiting at most
  ``DEFECTSCOPE_BENTO_MAX_LATENCY_MS``).
- ``/v1/model``: the model's description (``Detector.describe``), without bulky lists.
- ``/v1/health``: status and model identity; BentoML's own ``/livez`` and ``/readyz`` also work.

Images are decoded with `load_image` while the request is validated, so an unreadable upload is a
400 for that request alone and never fails the batch it would have joined.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import AfterValidator

from defectscope.data.io import MAX_PIXELS, load_image
from defectscope.detector.model_file import compact_metadata
from defectscope.errors import ImageLoadError
from defectscope.export.runtimes import load_detector
from defectscope.serving.schemas import PredictionSummary
from defectscope.version import __version__

MAX_BATCH = int(os.environ.get("DEFECTSCOPE_BENTO_MAX_BATCH", "16"))
MAX_LATENCY_MS = int(os.environ.get("DEFECTSCOPE_BENTO_MAX_LATENCY_MS", "200"))


def decode_upload(path: Path) -> np.ndarray:
    """Pydantic validator: the uploaded temp file -> RGB array, or a ValueError BentoML turns
    into a 400 naming the reason (decoded from bytes so the temp path stays out of it)."""
    max_pixels = int(os.environ.get("DEFECTSCOPE_MAX_PIXELS", MAX_PIXELS))
    try:
        return load_image(Path(path).read_bytes(), max_pixels)
    except ImageLoadError as exc:
        raise ValueError(exc.reason) from None


ImageUpload = Annotated[Path, AfterValidator(decode_upload)]


class BentoPrediction(PredictionSummary):
    """The same fields as the REST API's prediction, without its per-request extras."""


@bentoml.service(name="defectscope", workers=1, traffic={"timeout": 120})
class DefectscopeService:
    """One detector per worker, loaded from ``DEFECTSCOPE_MODEL_PATH`` through `load_detector`."""

    def __init__(self) -> None:
        model_path = os.environ.get("DEFECTSCOPE_MODEL_PATH")
        if not model_path:
            raise RuntimeError("set DEFECTSCOPE_MODEL_PATH to a model folder or exported file")
        self.model_path = model_path
        self.runtime = os.environ.get("DEFECTSCOPE_RUNTIME", "auto")
        self.detector = load_detector(
            model_path, self.runtime, os.environ.get("DEFECTSCOPE_DEVICE")
        )

    def __is_ready__(self) -> bool:
        return self.detector.is_fitted

    @bentoml.api(
        route="/v1/predict",
        batchable=True,
        max_batch_size=MAX_BATCH,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def predict(self, images: list[ImageUpload]) -> list[BentoPrediction]:
        # ``images`` is the adaptive batch: the uploads of every request BentoML grouped.
        predictions = self.detector.predict(list(images), batch_size=len(images))
        return [
            BentoPrediction(**{k: v for k, v in p.summary().items() if k != "source"})
            for p in predictions
        ]

    @bentoml.api(route="/v1/model")
    def model(self) -> dict[str, Any]:
        return compact_metadata(self.detector.describe())

    @bentoml.api(route="/v1/health")
    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.detector.is_fitted else "not ready",
            "runtime": self.runtime,
            "model_path": self.model_path,
            "model_fingerprint": self.detector.info.training.fingerprint[:16],
            "defectscope_version": __version__,
        }
