"""Batch prediction over large image sets with Ray Data.

The driver lists the images; each Ray actor loads the model once
(`defectscope.export.runtimes.load_detector`) and runs `Detector.iter_predict` on its batches; the
driver writes the results with the same `PredictionWriter` as ``defectscope predict``, so the
output folder is the same, file for file.

Where the image bytes come from (``data_access``):

- ``"ship"`` (default): the driver reads each file and ships its bytes through the object store,
  so worker nodes need no access to the driver's disk. The object store holds the whole image
  set (spilled to disk when it is too small).
  The model file(s) travel the same way.
- ``"shared"``: workers open the image and model paths themselves; every node must see the same
  paths (NFS, a mounted bucket).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectscope.detector.prediction import Prediction
from defectscope.errors import ConfigError, ImageLoadError, ModelFileError

logger = logging.getLogger(__name__)

DATA_ACCESS = ("ship", "shared")


@dataclass
class ModelPayload:
    """A model's files as bytes, so that workers need no access to the driver's disk."""

    runtime: str
    main: str
    files: dict[str, bytes]

    @classmethod
    def read(cls, model: str | Path, runtime: str = "auto") -> ModelPayload:
        from defectscope.detector.model_file import resolve_model_path
        from defectscope.export.runtimes import localize_model, resolve_runtime

        kind = resolve_runtime(model, runtime)
        local = localize_model(model, kind)
        if kind == "torch":
            main = resolve_model_path(local)
        elif local.is_dir():
            main = local / ("model.onnx" if kind == "onnx" else "model.xml")
        else:
            main = local
        files = [main]
        if main.suffix.lower() == ".xml":
            files.append(main.with_suffix(".bin"))  # OpenVINO weights
        for file in files:
            if not file.is_file():
                raise ModelFileError(f"{file}: model file not found")
        return cls(kind, main.name, {file.name: file.read_bytes() for file in files})

    def load(self, device: str | None = None) -> Any:
        from defectscope.export.runtimes import load_detector

        # Every runtime reads the files while loading; the copies can go right after.
        with tempfile.TemporaryDirectory(prefix="defectscope-model-") as folder:
            for name, data in self.files.items():
                (Path(folder) / name).write_bytes(data)
            return load_detector(Path(folder) / self.main, self.runtime, device)


class RayBatchPredictor:
    """Ray Data callable class: one model per actor, reused for every batch it is given."""

    def __init__(
        self,
        model: str | ModelPayload,
        runtime: str = "auto",
        device: str | None = None,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        threads: int = 1,
    ) -> None:
        import torch

        from defectscope.export.runtimes import load_detector

        # One actor per CPU it reserved: more threads would only fight the other actors.
        torch.set_num_threads(max(1, threads))
        if isinstance(model, ModelPayload):
            self.detector = model.load(device)
        else:
            self.detector = load_detector(model, runtime, device)
        self.threshold = threshold
        self.pixel_threshold = pixel_threshold

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "bytes" in batch:
            images: list[Any] = [bytes(data) for data in batch["bytes"]]
        else:
            images = [read_source(path) for path in batch["path"]]
        payloads = []
        for _, _, result in self.detector.iter_predict(
            [image for image in images if not isinstance(image, ImageLoadError)],
            threshold=self.threshold,
            pixel_threshold=self.pixel_threshold,
            batch_size=len(images),
        ):
            payloads.append(encode_result(result))
        # Images the worker could not even read are errors in their own place.
        results = iter(payloads)
        merged = [
            encode_result(image) if isinstance(image, ImageLoadError) else next(results)
            for image in images
        ]
        return {"index": batch["index"], "result": np.array(merged, dtype=object)}


def check_data_access(value: str) -> None:
    if value not in DATA_ACCESS:
        raise ConfigError(f"--data-access must be one of {', '.join(DATA_ACCESS)}, not {value!r}")


def read_source(path: str) -> bytes | ImageLoadError:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        return ImageLoadError(path, f"cannot read the file: {exc.strerror or exc}")


def encode_result(result: Any) -> bytes:
    """Pickle a Prediction; an error travels as its reason (ImageLoadError does not unpickle)."""
    if isinstance(result, ImageLoadError):
        return pickle.dumps({"error": result.reason})
    if isinstance(result, Exception):
        return pickle.dumps({"error": str(result)})
    return pickle.dumps(result)


def decode_result(payload: bytes, path: Path) -> Any:
    result = pickle.loads(payload)
    if isinstance(result, dict):
        return ImageLoadError(path, result["error"])
    # The worker saw bytes, not the path: restore the source as the local command records it.
    return dataclasses.replace(result, source=str(path))


def predict_with_ray(
    model: str | Path,
    paths: Sequence[Path],
    *,
    runtime: str = "auto",
    device: str | None = None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    batch_size: int = 8,
    data_access: str = "ship",
) -> Iterator[tuple[int, Any]]:
    """Yield (index into ``paths``, Prediction or ImageLoadError) in input order.

    Needs a connected Ray (see `cluster.ray_cluster`). ``workers`` actors (default: as many as
    the cluster's CPUs allow) each reserve ``cpus_per_worker`` CPUs and load the model once.
    """
    from defectscope.distributed.cluster import cluster_cpus, join_threads, require_ray

    check_data_access(data_access)
    require_ray()
    import ray.data

    paths = [Path(p) for p in paths]
    if workers is None:
        workers = max(1, int(cluster_cpus(ray) // cpus_per_worker))
    # Shared access: every node opens the same model path; else the model travels as bytes.
    model_source: str | ModelPayload = (
        str(Path(model).resolve()) if data_access == "shared" else ModelPayload.read(model, runtime)
    )
    rows: list[dict[str, Any]] = []
    unreadable: dict[int, ImageLoadError] = {}
    for index, path in enumerate(paths):
        if data_access == "shared":
            rows.append({"index": index, "path": str(path.resolve())})
            continue
        data = read_source(str(path))
        if isinstance(data, ImageLoadError):
            unreadable[index] = data
        else:
            rows.append({"index": index, "bytes": data})
    context = ray.data.DataContext.get_current()
    # Results come back in input order, like the local command's.
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    results: dict[int, Any] = dict(unreadable)
    next_index = 0
    if rows:
        # At least a block per worker (else some sit idle), at most a block per image.
        blocks = min(len(rows), max(workers, math.ceil(len(rows) / batch_size)))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)
        predictions = dataset.map_batches(
            RayBatchPredictor,
            fn_constructor_kwargs={
                "model": model_source,
                "runtime": runtime,
                "device": device,
                "threshold": threshold,
                "pixel_threshold": pixel_threshold,
                "threads": max(1, int(cpus_per_worker)),
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(workers, len(rows))),
            num_cpus=cpus_per_worker,
        )
        threads_before = threading.enumerate()
        for batch in predictions.iter_batches(batch_size=None, batch_format="numpy"):
            for index, payload in zip(batch["index"], batch["result"], strict=True):
                index = int(index)
                results[index] = decode_result(payload, paths[index])
            while next_index in results:
                yield next_index, results.pop(next_index)
                next_index += 1
        # The caller may shut Ray down as soon as the last result is out.
        still_running = join_threads(threads_before)
        if still_running:
            logger.debug("Ray Data threads still running: %s", ", ".join(still_running))
    while next_index < len(paths):
        yield next_index, results.pop(next_index)
        next_index += 1


def predict_on_cluster(
    model: str | Path,
    paths: Sequence[Path],
    *,
    address: str | None = None,
    workers: int | None = None,
    batch_size: int | None = None,
    **options: Any,
) -> Iterator[tuple[int, str | None, Prediction | ImageLoadError]]:
    """(index, source, Prediction or ImageLoadError) like `Detector.iter_predict`, computed on
    the cluster at ``address`` (None: a local one, stopped when the iteration ends)."""
    from defectscope.distributed.cluster import ray_cluster

    with ray_cluster(address, num_cpus=workers):
        import ray.data  # noqa: F401  (configures its loggers on import: quiet them after)

        # Ray Data logs every execution plan at INFO: the command has its own progress bar.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        for index, result in predict_with_ray(
            model, paths, workers=workers, batch_size=batch_size or 8, **options
        ):
            yield index, str(paths[index]), result
