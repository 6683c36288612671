"""The REST routes, one `APIRouter` per group; `serving.app.create_app` includes them.

`health` is public (its /metrics asks for the key itself); the other groups are `v1_router`s.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from defectscope.serving.auth import require_api_key
from defectscope.serving.schemas import ERRORS


def v1_router() -> APIRouter:
    """A router of /v1 routes: behind the API key, with the common error responses.

    Prefix, key and responses are the router's own, so each route's ``path`` (the metrics'
    route label) is its full template, however the app includes it.
    """
    return APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)
