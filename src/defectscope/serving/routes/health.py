"""Liveness, readiness and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from defectscope.serving.auth import require_api_key
from defectscope.serving.dependencies import State
from defectscope.serving.limits import api_key_ok
from defectscope.serving.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse)
async def healthz() -> HealthResponse:
    """The process is up (liveness)."""
    return HealthResponse(status="ok")


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(request: Request, state: State) -> JSONResponse:
    """The model is loaded and predictions can be served (readiness).

    With an API key set, the model's fingerprint and a load error are shown only to a client
    that sends the key: the status alone is public.
    """
    trusted = api_key_ok(state.settings, request.headers)
    if state.ready:
        fingerprint = state.model_fingerprint if trusted else None
        body = ReadyResponse(status="ready", model_fingerprint=fingerprint)
        return JSONResponse(body.model_dump())
    status = "failed" if state.load_error else "loading"
    body = ReadyResponse(status=status, detail=state.load_error if trusted else None)
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", dependencies=[Depends(require_api_key)], response_class=Response)
async def metrics(state: State) -> Response:
    """Prometheus text format (summed over all worker processes when there are several)."""
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
