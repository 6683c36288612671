"""Teaching the served model from reviewed false alarms, and its versions (list, activate)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from starlette.concurrency import run_in_threadpool

from defectscope.serving import teach as teaching
from defectscope.serving.dependencies import ReadyDetector, State
from defectscope.serving.limits import as_http_error
from defectscope.serving.routes import v1_router
from defectscope.serving.routes.reviews import actor
from defectscope.serving.schemas import TeachRequest, error_responses

router = v1_router()

TEACH_ERRORS = error_responses(
    {
        409: "Another teach is running, no log, an exported model, or no local model file.",
        413: "Too many false alarms for one teach.",
        422: "Nothing to teach (ids not reviewed false alarms, or no stored originals).",
    }
)


@router.post("/model/teach/preview", responses=TEACH_ERRORS)
async def teach_preview(
    state: State, _: ReadyDetector, request: TeachRequest | None = None
) -> dict[str, Any]:
    """What teaching these false alarms would do: bank rows added, the new threshold, and how
    many of the flagged predictions since ``flagged_since`` (default today) would pass."""
    with as_http_error():
        return await run_in_threadpool(teaching.preview, state, request or TeachRequest())


@router.post("/model/teach", responses=TEACH_ERRORS)
async def teach(
    state: State, _: ReadyDetector, request: TeachRequest | None = None
) -> dict[str, Any]:
    """Add the reviewed false alarms' patches to the memory bank (no refit), save the result
    as a new model version (its parent in ``lineage``) and serve it at once."""
    request = request or TeachRequest()
    with as_http_error():
        return await run_in_threadpool(teaching.teach, state, request, actor(request.reviewer))


@router.get("/model/versions")
def model_versions(state: State) -> dict[str, Any]:
    """The model's versions (newest last) and the one served; none before the first teach."""
    versions = state.versions()
    if versions is None:
        return {"active": None, "versions": []}
    described = versions.describe()
    described["active"] = state.served_version or described["active"]
    return described


@router.post(
    "/model/versions/{version}/activate",
    responses=error_responses({404: "No such version.", 409: "Another change is running."}),
)
async def activate_version(
    state: State, version: Annotated[str, Path(pattern=r"^[0-9]{1,9}$")]
) -> dict[str, Any]:
    """Serve this version from now on (undo a teach: activate its parent)."""
    with as_http_error():
        return await run_in_threadpool(teaching.activate, state, version)
