"""Several models in one service: named models, loaded on first use, unloaded least recently
used beyond a memory budget, sharing one copy of each backbone.

Each named model is a `ServingState` of its own (its detector, thresholds, versions and
micro-batcher), sharing the service's prediction log, pictures, pixel budget and metrics. The
model of ``model_path`` (the default, served by /v1/predict) is the app's own state: it loads
at start-up and is never unloaded. A reference such as ``bottle@production`` is resolved in the
registry each time the model loads, so a reload serves the version the stage holds then.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from fastapi import HTTPException

from defectscope.detector.detector import Detector
from defectscope.detector.knn_screen import screen_bytes
from defectscope.errors import DefectscopeError
from defectscope.features.backbones import BackboneCache, FeatureBackbone, module_bytes
from defectscope.registry import parse_ref, resolve_model_ref
from defectscope.registry.base import looks_like_ref
from defectscope.serving.settings import MB
from defectscope.serving.state import ServingState

log = logging.getLogger(__name__)


def backbone_of(detector: Detector) -> FeatureBackbone | None:
    """The backbone module a PyTorch detector runs (None for an exported model)."""
    if detector.runtime != "torch":
        return None
    return detector.feature_parts().features.backbone


class ModelPool:
    """The named models of one worker, by name; the default one is ``primary``."""

    def __init__(self, primary: ServingState) -> None:
        settings = primary.settings
        self.primary = primary
        self.cache = BackboneCache()
        self.default = settings.default_model
        self.states: dict[str, ServingState] = {}
        self.sources: dict[str, str] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.last_used: dict[str, float] = {}
        self.checked_at: dict[str, float] = {}
        self.tasks: set[asyncio.Task] = set()
        shared = self.cache if settings.share_backbones else None
        primary.backbone_cache = shared
        if settings.models:
            primary.model_name = self.default
        if settings.model_ref:
            self.sources[self.default] = settings.model_ref
            try:
                _, resolved = resolve_model_ref(settings.model_ref, settings.registry)
                primary.version_label = resolved.ref if resolved else ""
            except DefectscopeError as exc:
                log.warning("cannot resolve %s: %s", settings.model_ref, exc)
        elif settings.model_path is not None:
            self.sources[self.default] = str(settings.model_path)
        self.add(self.default, primary)
        for name, source in settings.models.items():
            child = ServingState(
                settings.model_copy(update={"model_path": None, "models": {}}),
                metrics=primary.metrics,
                model_name=name,
                primary=False,
                backbone_cache=shared,
                parent=primary,
            )
            self.sources[name] = source
            self.add(name, child)

    def add(self, name: str, state: ServingState) -> None:
        self.states[name] = state
        self.locks[name] = asyncio.Lock()
        self.last_used[name] = 0.0

    @property
    def budget_bytes(self) -> int | None:
        budget = self.primary.settings.memory_budget_mb
        return None if budget is None else int(budget * MB)

    # ------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Start the named models' batchers and share the service's log and pictures."""
        for state in self.states.values():
            if state is self.primary:
                continue
            state.repository = self.primary.repository
            state.pictures = self.primary.pictures
            state.pixels = self.primary.pixels
            state.render_slots = self.primary.render_slots
            await state.batcher.start(executor=self.primary.batcher.executor)

    async def stop(self) -> None:
        """Before the default model's state stops: its executor runs the others' calls too."""
        for task in list(self.tasks):
            task.cancel()
        for state in self.states.values():
            if state is not self.primary:
                await state.batcher.stop()

    # ------------------------------------------------------------------------ lookups
    def state(self, name: str) -> ServingState:
        """The named model's state; 404 naming the models served for an unknown name."""
        state = self.states.get(name)
        if state is None:
            names = ", ".join(sorted(self.states)) or "none"
            raise HTTPException(404, f"no model named {name!r} on this server (models: {names})")
        return state

    async def ready(self, name: str) -> ServingState:
        """The named model, loaded (once, even for concurrent first requests) and marked used."""
        state = self.state(name)
        self.last_used[name] = time.monotonic()
        if state.ready or state is self.primary:
            return state
        async with self.locks[name]:
            if not state.ready:
                await self.load(name)
        state.ready_detector()  # 503 with the load error if it failed
        return state

    def follow_stage(self, name: str) -> None:
        """For a model given as NAME@STAGE: at most every ``registry_poll_s``, ask the registry
        in the background and reload the model if the stage has moved to another version."""
        poll = self.primary.settings.registry_poll_s
        source, state = self.sources.get(name, ""), self.states[name]
        now = time.monotonic()
        # A stage or 'latest' can move; a version number never does.
        if poll <= 0 or not state.ready or not looks_like_ref(source):
            return
        if isinstance(parse_ref(source)[1], int):
            return
        if now - self.checked_at.get(name, 0.0) < poll:
            return
        self.checked_at[name] = now

        async def check() -> None:
            try:
                _, resolved = await asyncio.to_thread(
                    resolve_model_ref, source, state.settings.registry
                )
            except DefectscopeError as exc:
                log.warning("cannot follow %s: %s", source, exc)
                return
            if resolved is not None and resolved.ref != state.served_version:
                async with self.locks[name]:
                    await self.load(name)

        task = asyncio.get_running_loop().create_task(check())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def reload(self, name: str) -> ServingState:
        """Build the model again from its source (a registry reference: the version it names
        now) and swap it in; requests in flight finish on the detector they started with."""
        state = self.state(name)
        async with self.locks[name]:
            await self.load(name)
        if state.load_error is not None:
            raise HTTPException(409, f"model {name!r} not reloaded: {state.load_error}")
        self.last_used[name] = time.monotonic()
        return state

    async def load(self, name: str) -> None:
        state = self.states[name]
        source = self.sources.get(name)
        if source is None:
            state.load_error = "no model configured"
            return
        try:
            path, resolved = await asyncio.to_thread(
                resolve_model_ref, source, state.settings.registry
            )
        except DefectscopeError as exc:
            state.load_error = str(exc)
            return
        previous = (state.settings, state.version_label)
        state.settings = state.settings.model_copy(update={"model_path": Path(path)})
        state.version_label = resolved.ref if resolved else ""
        state.load_error = None
        started = time.perf_counter()
        await state.load_model()
        if state.load_error is not None:
            if state.ready:  # the version served before stays
                state.settings, state.version_label = previous
            return
        state.metrics.model_loads.labels(name).inc()
        log.info("model %s loaded in %.2f s", name, time.perf_counter() - started)
        self.evict_beyond_budget(keep=name)
        for other in self.loaded():
            state.metrics.model_memory.labels(other).set(self.estimate(other))

    # ------------------------------------------------------------------------ memory
    def loaded(self) -> list[str]:
        return [name for name, state in self.states.items() if state.ready]

    def sharing(self, name: str) -> list[str]:
        """The other loaded models running the very same backbone object."""
        detector = self.states[name].detector
        backbone = backbone_of(detector) if detector is not None else None
        if backbone is None:
            return []
        return [
            other
            for other in self.loaded()
            if other != name and backbone_of(self.states[other].ready_detector()) is backbone
        ]

    def estimate(self, name: str, count_shared: bool = True) -> int:
        """Bytes of a loaded model: its bank (and the search's bfloat16 copy of it), plus its
        backbone unless a model loaded before it already holds that backbone (``count_shared``
        counts it anyway)."""
        state = self.states[name]
        detector = state.detector
        if detector is None:
            return 0
        backbone = backbone_of(detector)
        if backbone is None:  # an exported model: its file is what it holds
            path = state.settings.model_path
            return path.stat().st_size if path is not None and path.is_file() else 0
        total = sum(
            bank.numel() * bank.element_size() + screen_bytes(bank)
            for bank in detector.memory_banks().values()
        )
        earlier = [n for n in self.loaded() if n != name and self.order(n) < self.order(name)]
        if count_shared or not (set(self.sharing(name)) & set(earlier)):
            total += module_bytes(backbone)
        return total

    def order(self, name: str) -> int:
        return list(self.states).index(name)

    def total_bytes(self) -> int:
        """Estimated memory of all loaded models, each shared backbone counted once."""
        return sum(self.estimate(name, count_shared=False) for name in self.loaded())

    def evict_beyond_budget(self, keep: str) -> None:
        """Unload least recently used models (never ``keep`` nor the default) until the loaded
        ones fit the budget. Requests in flight keep the detector they hold."""
        budget = self.budget_bytes
        if budget is None:
            return
        while self.total_bytes() > budget:
            candidates = [
                name
                for name in self.loaded()
                if name != keep and self.states[name] is not self.primary
            ]
            if not candidates:
                return
            victim = min(candidates, key=lambda name: self.last_used[name])
            self.unload(victim)

    def unload(self, name: str) -> None:
        state = self.states[name]
        state.detector = None
        metrics = state.metrics
        metrics.model_loaded.labels(name).set(0)
        metrics.model_memory.labels(name).set(0)
        metrics.model_evictions.labels(name).inc()
        log.info("model %s unloaded (memory budget)", name)

    # ------------------------------------------------------------------------ description
    def describe(self, name: str) -> dict[str, Any]:
        """What GET /v1/models says of one model."""
        state = self.states[name]
        detector = state.detector
        loaded = state.ready
        entry: dict[str, Any] = {
            "name": name,
            "default": state is self.primary,
            "source": self.sources.get(name),
            "loaded": loaded,
            "load_error": state.load_error,
            "backbone": None,
            "served_version": state.served_version if loaded else None,
            "model_fingerprint": state.model_fingerprint if loaded else None,
            "threshold": None,
            "pixel_threshold": None,
            "memory_bytes": None,
            "backbone_shared_with": [],
        }
        if loaded and detector is not None:
            entry.update(
                backbone=detector.config.backbone.name,
                threshold=detector.threshold,
                pixel_threshold=detector.pixel_threshold,
                memory_bytes=self.estimate(name, count_shared=False),
                backbone_shared_with=self.sharing(name),
            )
        return entry

    def summary(self) -> dict[str, Any]:
        budget = self.budget_bytes
        return {
            "default": self.default,
            "memory_budget_bytes": budget,
            "memory_bytes": self.total_bytes(),
            "shared_backbones": len(self.cache),
            "models": [self.describe(name) for name in self.states],
        }
