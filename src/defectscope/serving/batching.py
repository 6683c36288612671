"""Micro-batching: requests that arrive together share one `Detector.predict` call.

One asyncio task collects queued images until ``max_size`` are waiting or ``max_wait_ms`` has
passed since the first, then runs the model in a single worker thread (so the event loop never
blocks and the detector is never used from two threads at once) and resolves each request's
future with its own prediction. While the model runs, new requests queue up and form the next
batch, so under load batches grow by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from defectscope.detector.prediction import Prediction

log = logging.getLogger(__name__)

PredictFn = Callable[..., list[Prediction]]
"""predict(images, threshold) -> one Prediction per image, in order; called as
predict(images, threshold, target) for images submitted with a ``target`` (a detector)."""


@dataclass
class _Item:
    image: np.ndarray
    threshold: float | None
    future: asyncio.Future[Prediction]
    target: Any = None
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Groups concurrent single-image requests into model batches."""

    def __init__(
        self,
        predict: PredictFn,
        max_size: int = 8,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        self._predict = predict
        self.max_size = max_size
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self._on_batch = on_batch
        self._last_batch_size = 0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._own_executor = True

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def executor(self) -> ThreadPoolExecutor | None:
        return self._executor

    async def start(self, executor: ThreadPoolExecutor | None = None) -> None:
        """Start collecting; ``executor`` (another batcher's) runs the model calls of both in
        one thread: models of one service then take turns instead of competing for the cores,
        and share one thread's working memory."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="defectscope-infer"
        )
        self._task = asyncio.create_task(self._run(), name="defectscope-microbatcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if not item.future.done():
                    item.future.set_exception(RuntimeError("server is shutting down"))
        if self._executor is not None:
            if self._own_executor:
                self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(
        self, image: np.ndarray, threshold: float | None = None, target: Any = None
    ) -> Prediction:
        """Queue one decoded RGB image and wait for its prediction (by ``target``, the
        detector the request took at its start, when given)."""
        if not self.running or self._queue is None:
            raise RuntimeError("the micro-batcher is not running")
        future: asyncio.Future[Prediction] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(image, threshold, future, target))
        return await future

    async def _collect(self) -> list[_Item]:
        assert self._queue is not None, "start() creates the queue before the loop runs"
        batch = [await self._queue.get()]
        # Wait for company only under load (the last model call was shared, or others are
        # already queued): a lone request on an idle server is answered at once.
        under_load = self._last_batch_size > 1 or not self._queue.empty()
        deadline = time.perf_counter() + (self.max_wait if under_load else 0.0)
        while len(batch) < self.max_size:
            # Whatever is already queued joins at once; then wait out the rest of the window.
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            # Requests whose client gave up are dropped before they cost model time.
            batch = [item for item in batch if not item.future.done()]
            if not batch:
                continue
            self._last_batch_size = len(batch)
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._predict_groups, batch)
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)

    def _predict_groups(self, batch: list[_Item]) -> list[Prediction]:
        # A threshold override changes the decision and the normalised score, and predict takes
        # one threshold per call: one call per distinct threshold (usually just one). Requests
        # taken by different detectors (a version swap in between) never share a call either.
        results: list[Prediction | None] = [None] * len(batch)
        groups: dict[tuple[int, float | None], list[int]] = {}
        for position, item in enumerate(batch):
            groups.setdefault((id(item.target), item.threshold), []).append(position)
        for (_, threshold), positions in groups.items():
            images = [batch[p].image for p in positions]
            target = batch[positions[0]].target
            if target is None:
                predictions = self._predict(images, threshold)
            else:
                predictions = self._predict(images, threshold, target)
            if len(predictions) != len(positions):
                raise RuntimeError("predict returned a different number of results than images")
            for position, prediction in zip(positions, predictions, strict=True):
                results[position] = prediction
        return [result for result in results if result is not None]  # every position is set
