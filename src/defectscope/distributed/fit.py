"""Distributed fit on Ray: the local fit's stages, with the shards extracted by Ray actors.

The driver makes the `FitPlan`, Ray actors run `Detector.extract_shard` on the plan's chunks,
and the driver finishes with `Detector.fit_from_shards`. Same plan, same stages, so the model
equals the local fit's up to float rounding (bank rows and thresholds; see
``tests/test_distributed.py`` for the tolerance).

Parallelism comes from chunks: a plan of one chunk (at most ``fit.chunk_images`` images) runs on
one actor. Set ``fit.chunk_images`` to about ``n_images / workers`` to use every worker; the
local fit with the same config then gives the same model.

Images reach the workers as bytes read by the driver (``data_access="ship"``, the default: no
shared disk needed), or as paths the workers open themselves (``"shared"``: every node must see
the same paths). Each actor builds the backbone once and sets torch's thread count to the CPUs
it reserved, so N actors on N cores do not oversubscribe them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from defectscope.config import DetectorConfig
from defectscope.detector.detector import Detector
from defectscope.detector.plan import FitPlan
from defectscope.detector.progress import ProgressFn, with_stage_prefix
from defectscope.detector.shards import FitShard, ShardStore
from defectscope.detector.suspects import fit_without_suspects
from defectscope.distributed.predict import check_data_access, read_source
from defectscope.errors import DefectscopeError, ImageLoadError

log = logging.getLogger(__name__)


class ShardWorker:
    """Ray actor body: one detector (one backbone) per actor, many shards."""

    def __init__(self, config: dict[str, Any], threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.detector = Detector(DetectorConfig.from_dict(config))
        # Built now, once, rather than on the first shard: actors start while the driver plans.
        self.detector.feature_parts()

    def extract(self, images: list[Any], plan: FitPlan, offset: int) -> FitShard | dict[str, str]:
        """The chunk's shard; unreadable images are skipped and listed (the driver decides
        whether that is an error). Other user errors come back as text: some defectscope
        exceptions cannot be rebuilt from their pickled form on the driver."""
        try:
            return self.detector.extract_shard(images, plan, offset, on_error="skip")
        except DefectscopeError as exc:
            return {"error": str(exc)}


def fit_with_ray(
    config: DetectorConfig | dict | None,
    images: Sequence[str | Path],
    *,
    workers: int | None = None,
    cpus_per_worker: float = 1.0,
    on_error: str = "raise",
    data_access: str = "ship",
    progress: ProgressFn | None = None,
) -> Detector:
    """Fit a `Detector` on image paths with Ray actors; needs a connected Ray.

    ``workers`` actors (default: as many as the cluster's CPUs allow, at most one per chunk)
    each reserve ``cpus_per_worker`` CPUs.
    """
    from defectscope.distributed.cluster import require_ray

    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    check_data_access(data_access)
    ray = require_ray()
    start = time.perf_counter()
    detector = Detector(config)
    paths = [Path(p) for p in images]
    workers = _fit_on_actors(
        ray, detector, paths, workers, cpus_per_worker, on_error, data_access, progress
    )
    # The half-size bank (defectscope.detector.scales): the same stages on its own actors.
    half = detector.half_scale_detector(len(paths))
    if half is not None:
        half_progress = with_stage_prefix(progress, "half-size ")
        _fit_on_actors(
            ray, half, paths, workers, cpus_per_worker, on_error, data_access, half_progress
        )
        detector.join_half_scale(half)
    if detector.config.fit.drop_suspects:
        again = detector.config.model_copy(deep=True)
        again.fit.drop_suspects = False  # once, as `Detector.fit` does
        refit = fit_without_suspects(
            paths,
            detector.info.training.suspects,
            lambda kept: fit_with_ray(
                again, list(kept), workers=workers, cpus_per_worker=cpus_per_worker,
                on_error=on_error, data_access=data_access, progress=progress,
            ),
        )  # fmt: skip
        if refit is not None:
            detector = refit
            detector.config.fit.drop_suspects = True
    detector.info.timings["total_s"] = round(time.perf_counter() - start, 4)
    detector.info.training.engine = {"name": "ray", "workers": workers}
    return detector


def _fit_on_actors(
    ray: Any,
    detector: Detector,
    paths: list[Path],
    workers: int | None,
    cpus_per_worker: float,
    on_error: str,
    data_access: str,
    progress: ProgressFn | None,
) -> int:
    """Prepare, plan, extract the shards on Ray actors and finish ``detector``'s fit on the
    driver; returns the number of actors that worked."""
    from ray.util import ActorPool

    from defectscope.distributed.cluster import cluster_cpus, first_line

    plan = FitPlan.create(len(paths), detector.config)
    # Geometry and auto mode are settled here, so that every worker gets the same config.
    detector.prepare(paths, progress, keep_maps=False)
    # A few-shot fit's views and calibration come from prepare.
    plan = FitPlan.create(len(paths), detector.config, detector.selection)
    chunks = plan.chunks()
    if workers is None:
        workers = max(1, int(cluster_cpus(ray) // cpus_per_worker))
    if len(chunks) < workers and detector.config.features.input_pooling == 1:
        log.warning(
            "the plan has %d chunk(s) of up to %d images for %d workers: only %d will work; set "
            "detector.fit.chunk_images=%d to use them all (the same value gives the same model "
            "locally)",
            len(chunks),
            plan.chunk_images,
            workers,
            len(chunks),
            math.ceil(len(paths) / workers),
        )
    workers = max(1, min(workers, len(chunks)))
    remote_worker = ray.remote(ShardWorker).options(num_cpus=cpus_per_worker)
    threads = max(1, math.floor(cpus_per_worker))
    config_dict = detector.config.to_dict()
    actors = [remote_worker.remote(config_dict, threads) for _ in range(workers)]
    pool = ActorPool(actors)

    def submit(actor: Any, chunk: tuple[int, int]) -> Any:
        offset, stop = chunk
        chosen = paths[offset:stop]
        if data_access == "shared":
            payload: list[Any] = [str(p.resolve()) for p in chosen]
        else:
            # Read lazily, one chunk per free actor: the driver never holds every image.
            # A file the driver cannot read goes as its path: the worker reports it unreadable.
            payload = [read_source(str(p)) for p in chosen]
            payload = [
                str(p) if isinstance(data, ImageLoadError) else data
                for p, data in zip(chosen, payload, strict=True)
            ]
        return actor.extract.remote(payload, plan, offset)

    shards: list[FitShard] = []
    with ShardStore.from_config(detector.config.fit) as store:
        try:
            results = pool.map(submit, chunks)
            # The driver needs the backbone too (model description, save): build it meanwhile.
            detector.feature_parts()
            done = 0
            for (offset, stop), shard in zip(chunks, results, strict=True):
                if isinstance(shard, dict):
                    raise DefectscopeError(shard["error"])
                restore_sources(shard, paths)
                if shard.skipped and on_error == "raise":
                    first = shard.skipped[0]
                    raise ImageLoadError(first["source"], first["error"])
                shards.append(store.keep(shard))
                done += stop - offset
                if progress:
                    progress("features", done, len(paths))
        except ray.exceptions.RayError as exc:
            # A worker that died (out of memory, node lost) after Ray's retries.
            raise DefectscopeError(f"the Ray fit failed: {first_line(exc)}") from None
        finally:
            # Free their CPUs now: on a shared cluster, do not wait for garbage collection.
            for actor in actors:
                ray.kill(actor)
        detector.fit_from_shards(shards, plan, progress=progress)
    return workers


def restore_sources(shard: FitShard, paths: Sequence[Path]) -> None:
    """Workers that got bytes saw no file names: put the driver's paths back, as a local fit
    records them (model metadata lists example and skipped images by path)."""
    shard.names = [str(paths[i]) for i in shard.image_ids]
    readable = set(shard.image_ids)
    unreadable = [i for i in range(shard.offset, shard.stop) if i not in readable]
    for entry, index in zip(shard.skipped, unreadable, strict=True):
        entry["source"] = str(paths[index])


def fit_on_cluster(
    config: DetectorConfig | dict | None,
    images: Sequence[str | Path],
    *,
    address: str | None = None,
    workers: int | None = None,
    on_error: str = "raise",
    data_access: str = "ship",
    progress: ProgressFn | None = None,
) -> Detector:
    """`fit_with_ray` on the cluster at ``address`` (None: a local one, stopped afterwards)."""
    from defectscope.distributed.cluster import ray_cluster

    with ray_cluster(address, num_cpus=workers):
        return fit_with_ray(
            config,
            images,
            workers=workers,
            on_error=on_error,
            data_access=data_access,
            progress=progress,
        )
