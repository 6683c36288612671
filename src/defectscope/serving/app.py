"""The FastAPI app: ``create_app(settings)`` (tests, embedding) and ``app_from_env()`` (uvicorn).

This module only assembles: settings, then the worker's `ServingState`, then the routers of
`serving.routes`, then middleware and error handlers. Routes are thin: uploads are decoded with
`load_image` (content-sniffed, pixel-limited), scored through the micro-batcher that calls
`Detector.predict`, and pictures are drawn by `visualize.render_prediction` at a bounded size.
What a request may cost (key, bytes, read time, pixels) is enforced by `serving.limits`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from defectscope import __version__
from defectscope.detector.detector import Detector
from defectscope.serving import handlers
from defectscope.serving.limits import RequestGuard
from defectscope.serving.model_pool import ModelPool
from defectscope.serving.routes import (
    drift,
    health,
    model,
    models,
    predict,
    predictions,
    reviews,
    versions,
)
from defectscope.serving.settings import ServingSettings
from defectscope.serving.state import ServingState

# Re-exported for callers that imported it from here; its home is `serving.thresholds`.
from defectscope.serving.thresholds import file_fingerprint

__all__ = ["app_from_env", "create_app", "file_fingerprint"]

# In this order in the OpenAPI document.
V1_ROUTERS = (
    predict.router,
    model.router,
    models.router,
    versions.router,
    predictions.router,
    reviews.router,
    drift.router,
)


def create_app(
    settings: ServingSettings | None = None, *, detector: Detector | None = None
) -> FastAPI:
    """Build the app. ``detector`` skips loading ``settings.model_path`` (tests, embedding)."""
    settings = settings or ServingSettings()
    state = ServingState(settings)
    if detector is not None:
        state.use_detector(detector)
    pool = ModelPool(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        await pool.start()
        try:
            yield
        finally:
            await pool.stop()
            await state.stop()

    app = FastAPI(
        title="defectscope",
        version=__version__,
        description="Visual anomaly detection: score images, localise defects.",
        lifespan=lifespan,
    )
    app.state.serving = state
    app.state.models = pool
    app.include_router(health.router)
    for router in V1_ROUTERS:
        app.include_router(router)
    # Added first, so it runs innermost: inside CORS (preflights never carry a key) and inside
    # `observe`, which gives its answers a request id and counts them.
    app.add_middleware(RequestGuard, settings=settings)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PUT"],
            allow_headers=["*"],
        )
    handlers.install(app)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory (``--factory``): every worker reads the same DEFECTSCOPE_* settings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return create_app(ServingSettings())
