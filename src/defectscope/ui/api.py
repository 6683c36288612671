"""The UI's one door to the REST API: settings from the environment, a client, friendly errors.

`defectscope ui` passes the API's address and key to the Streamlit process through
``DEFECTSCOPE_API_URL`` / ``DEFECTSCOPE_API_KEY`` (the same variable the server reads, so one
environment can run both), plus ``DEFECTSCOPE_UI_TIMEOUT`` and ``DEFECTSCOPE_UI_SAMPLES``.
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
# Images per batch request: well under the server's default limit of 32, and small enough
# that a progress bar moves.
CHUNK = 8


@dataclass(frozen=True)
class UiSettings:
    api_url: str
    api_key: str | None
    timeout_s: float
    samples: Path | None

    @classmethod
    def from_env(cls) -> UiSettings:
        samples = os.environ.get("DEFECTSCOPE_UI_SAMPLES") or None
        return cls(
            api_url=os.environ.get("DEFECTSCOPE_API_URL", DEFAULT_URL).rstrip("/"),
            api_key=os.environ.get("DEFECTSCOPE_API_KEY") or None,
            timeout_s=float(os.environ.get("DEFECTSCOPE_UI_TIMEOUT", "60")),
            samples=Path(samples) if samples else None,
        )

    def client(self) -> DefectscopeClient:
        return DefectscopeClient(self.api_url, api_key=self.api_key, timeout=self.timeout_s)


def friendly(error: ClientError, settings: UiSettings, subject: str | None = None) -> str:
    """One sentence a user can act on, for any failed request."""
    about = f"{subject}: " if subject else ""
    if error.status is None:
        if error.timed_out:
            return (
                f"{about}the defectscope API at {settings.api_url} did not answer within "
                f"{settings.timeout_s:g} s. It may be busy or the images very large; try fewer "
                "images, or start the UI with a longer --timeout."
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


def _detail_text(detail: Any) -> str:
    if isinstance(detail, list):
        return "; ".join(
            str(item.get("msg", item)) if isinstance(item, dict) else str(item) for item in detail
        )
    return str(detail)


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


def score_images(
    client: DefectscopeClient,
    images: Sequence[tuple[str, bytes]],
    on_progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Score (name, bytes) images through ``/v1/predict/batch`` with overlay and mask PNGs.

    Returns one item per image: ``name``, ``image`` (its bytes) and either the API's result
    fields (``score``, ``threshold``, ``overlay_png``...) or ``error`` (the API's refusal).
    A failure of the whole request (server down, key refused) raises `ClientError`.
    """
    items: list[dict[str, Any]] = []
    for start in range(0, len(images), CHUNK):
        chunk = images[start : start + CHUNK]
        answers = client.predict_batch(chunk, overlay=True, mask=True)
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
