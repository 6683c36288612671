"""The UI's one door to the REST API: settings from the environment, a client, friendly errors.

`defectscope ui` passes the API's address and key to the Streamlit process through
``DEFECTSCOPE_API_URL`` / ``DEFECTSCOPE_API_KEY`` (the same variable the server reads, so one
environment can run both), plus ``DEFECTSCOPE_UI_TIMEOUT`` (scoring),
``DEFECTSCOPE_UI_QUICK_TIMEOUT`` (health and metadata: a hung API must not blank the page for
a minute) and ``DEFECTSCOPE_UI_SAMPLES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectscope.client import ClientError, DefectscopeClient

DEFAULT_URL = "http://127.0.0.1:8000"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MB = 1024 * 1024
# Images per batch request: well under the server's default limit of 32, and small enough
# that a progress bar moves.
CHUNK = 8


@dataclass(frozen=True)
class UiSettings:
    api_url: str
    api_key: str | None
    timeout_s: float
    samples: Path | None
    quick_timeout_s: float = 3.0

    @classmethod
    def from_env(cls) -> UiSettings:
        samples = os.environ.get("DEFECTSCOPE_UI_SAMPLES") or None
        return cls(
            api_url=os.environ.get("DEFECTSCOPE_API_URL", DEFAULT_URL).rstrip("/"),
            api_key=os.environ.get("DEFECTSCOPE_API_KEY") or None,
            timeout_s=float(os.environ.get("DEFECTSCOPE_UI_TIMEOUT", "60")),
            samples=Path(samples) if samples else None,
            quick_timeout_s=float(os.environ.get("DEFECTSCOPE_UI_QUICK_TIMEOUT", "3")),
        )

    def client(self, quick: bool = False) -> DefectscopeClient:
        """The scoring client (long timeout), or with ``quick`` the one for everything else."""
        timeout = min(self.quick_timeout_s, self.timeout_s) if quick else self.timeout_s
        return DefectscopeClient(self.api_url, api_key=self.api_key, timeout=timeout)


def friendly(
    error: ClientError, settings: UiSettings, subject: str | None = None, scoring: bool = False
) -> str:
    """One sentence a user can act on, for any failed request (``scoring``: one that sent
    images and waited the long timeout)."""
    about = f"{subject}: " if subject else ""
    if error.status is None:
        if error.timed_out and scoring:
            return (
                f"{about}the defectscope API at {settings.api_url} did not answer within "
                f"{settings.timeout_s:g} s. It may be busy or the images very large; try fewer "
                "images, or start the UI with a longer --timeout."
            )
        if error.timed_out:
            return (
                f"{about}the defectscope API at {settings.api_url} did not answer within "
                f"{min(settings.quick_timeout_s, settings.timeout_s):g} s: it is running but "
                "hung or overloaded. Check the server's log, then reload this page."
            )
        return (
            f"Cannot reach the defectscope API at {settings.api_url}. Is `defectscope serve "
            "MODEL` running there? Start it, then reload this page."
        )
    detail = _detail_text(error.detail)
    if error.status == 401:
        return (
            "The API refused the API key. Start the UI with --api-key KEY (or set "
            "DEFECTSCOPE_API_KEY) to the key the server was started with."
        )
    if error.status == 503:
        return f"The model is not ready yet: {detail}. Wait a moment and try again."
    if error.status in (413, 415, 422):
        return f"{about}rejected by the API ({error.status}): {detail}"
    return f"{about}the API answered {error.status}: {detail}"


def connection_state(client: DefectscopeClient, settings: UiSettings) -> tuple[str, str]:
    """``(level, text)`` for the sidebar: ``ok``, ``loading`` or ``error``.

    Asks an authenticated route (``GET /v1/model``): ``/readyz`` answers without the key, so
    alone it would say "ready" to a UI whose every page is then refused.
    """
    try:
        client.model_info()
    except ClientError as exc:
        if exc.status == 401:
            return "error", "API key refused: " + friendly(exc, settings)
        if exc.status == 503:
            return "loading", "Connected; the model is still loading (or failed to load)."
        return "error", friendly(exc, settings)
    return "ok", "Connected, model ready"


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
        )
    return str(detail)


def upload_limit_mb() -> int:
    """The uploaders' per-file limit: the server's own (the variable `defectscope serve` reads,
    20 MB by default), not Streamlit's 200 MB that the API would refuse after the upload."""
    limit = int(os.environ.get("DEFECTSCOPE_MAX_UPLOAD_BYTES", 20 * MB))
    return max(1, limit // MB)


def sample_sets(root: Path | None) -> dict[str, list[Path]]:
    """Sample image sets under ``root``: its own images and those of each sub-folder (sorted).

    An MVTec category gives sets like ``test/broken_large``; a plain folder gives one set.
    """
    if root is None or not root.is_dir():
        return {}
    sets: dict[str, list[Path]] = {}
    for folder in sorted([root, *(p for p in root.rglob("*") if p.is_dir())]):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if images:
            sets[str(folder.relative_to(root)) if folder != root else "."] = images
    return sets


def model_choices(client: DefectscopeClient) -> tuple[list[str], str | None]:
    """``(names, default)`` of the models the API serves (``GET /v1/models``).

    No names when it serves one model, or when it cannot say (an older server answers 404):
    the UI then shows no picker and scores with the server's one model, as before.
    """
    try:
        listing = client.models()
    except ClientError:
        return [], None
    names = [str(entry["name"]) for entry in listing.get("models", [])]
    default = listing.get("default")
    if len(names) < 2:
        return [], default
    return names, default if default in names else names[0]


def score_images(
    client: DefectscopeClient,
    images: Sequence[tuple[str, bytes]],
    on_progress: Callable[[int, int], None] | None = None,
    model: str | None = None,
) -> list[dict[str, Any]]:
    """Score (name, bytes) images through ``/v1/predict/batch`` with overlay and mask PNGs
    (``model``: through the named model's ``/v1/models/NAME/predict/batch``).

    Returns one item per image: ``name``, ``image`` (its bytes) and either the API's result
    fields (``score``, ``threshold``, ``overlay_png``...) or ``error`` (the API's refusal).
    A failure of the whole request (server down, key refused) raises `ClientError`.
    """
    items: list[dict[str, Any]] = []
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        answers = client.predict_batch(chunk, overlay=True, mask=True, model=model)
        for (name, data), answer in zip(chunk, answers, strict=True):
            error = answer.get("error")
            item = {"name": name, "image": data, "error": None}
            if error:
                item["error"] = f"{error['detail']} ({error['status']})"
            else:
                item.update(answer["result"])
            items.append(item)
        if on_progress is not None:
            on_progress(len(items), len(images))
    return items


def drift_skipping_bad(
    client: DefectscopeClient, images: Sequence[tuple[str, bytes]]
) -> tuple[dict[str, Any], list[str]]:
    """``POST /v1/drift/images`` without the files it refuses: one unreadable or oversized file
    would fail the whole window, so it is dropped and named in the returned errors.

    Raises `ClientError` for any other failure (or when the refusal names no file of ours).
    """
    window = list(images)
    errors: list[str] = []
    while True:
        try:
            return client.drift_images(window), errors
        except ClientError as exc:
            detail = str(exc.detail)
            bad = next((n for n, _ in window if detail.startswith(f"{n}: ")), None)
            if exc.status not in (413, 415, 422) or bad is None:
                raise
            errors.append(detail)
            window = [(n, data) for n, data in window if n != bad]
