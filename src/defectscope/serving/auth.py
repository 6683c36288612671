"""The API-key dependency of the /v1 routes and /metrics.

`RequestGuard` already refuses a request without the key before its body is read; this
dependency states the same rule to FastAPI, so the OpenAPI document shows both schemes.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from defectscope.serving.dependencies import get_settings
from defectscope.serving.settings import ServingSettings

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


def require_api_key(
    settings: Annotated[ServingSettings, Depends(get_settings)],
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """X-API-Key header, or ``Authorization: Bearer`` (what Prometheus scrapers send)."""
    if settings.api_key is None:
        return
    given = api_key or (bearer.credentials if bearer else None)
    expected = settings.api_key.get_secret_value()
    if given is None or not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            401, "missing or wrong API key", headers={"WWW-Authenticate": "ApiKey, Bearer"}
        )
