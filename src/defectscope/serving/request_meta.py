"""What a predict request says about the part: its id, line, station and free tags.

Sent as multipart form fields beside the file(s), or as fields of the JSON base64 body; all
optional, all bounded. The part id defaults to the uploaded file's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile as StarletteUploadFile

from defectscope.serving.limits import RequestError

MAX_PART_ID = 256
MAX_NAME = 64
MAX_TAG = 64
MAX_TAGS = 16
FIELDS = ("part_id", "line", "station", "tags")


@dataclass
class PartInfo:
    part_id: str | None = None
    line: str | None = None
    station: str | None = None
    tags: list[str] = field(default_factory=list)

    def with_default_id(self, filename: str | None) -> PartInfo:
        if self.part_id or not filename:
            return self
        return PartInfo(filename[-MAX_PART_ID:], self.line, self.station, list(self.tags))


def _text(name: str, value: Any, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(422, f"{name} must be text")
    value = value.strip()
    if len(value) > limit:
        raise RequestError(422, f"{name} is {len(value)} characters long; at most {limit}")
    if not value.isprintable():
        raise RequestError(422, f"{name} holds control characters")
    return value or None


def parse_tags(value: Any) -> list[str]:
    """Comma-separated text (or a JSON list of text): each tag at most 64 characters, 16 tags."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[Any] = value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        raise RequestError(422, "tags must be comma-separated text or a list of text")
    tags: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise RequestError(422, "every tag must be text")
        if "," in item:
            raise RequestError(422, f"a tag cannot hold a comma: {item[:MAX_TAG]!r}")
        tag = _text("a tag", item, MAX_TAG)
        if tag and tag not in tags:
            tags.append(tag)
    if len(tags) > MAX_TAGS:
        raise RequestError(422, f"{len(tags)} tags given; at most {MAX_TAGS}")
    return tags


def parse_part_info(values: Mapping[str, Any]) -> PartInfo:
    """The part fields of a form or JSON body; a bad value is a 422 naming it."""
    return PartInfo(
        _text("part_id", values.get("part_id"), MAX_PART_ID),
        _text("line", values.get("line"), MAX_NAME),
        _text("station", values.get("station"), MAX_NAME),
        parse_tags(values.get("tags")),
    )


async def single_part_info(request: Request) -> PartInfo:
    """The part fields of /v1/predict, once its image was read (the body is cached by then)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1)
        values = {name: form.get(name) for name in FIELDS}
        for name, value in values.items():
            if isinstance(value, StarletteUploadFile):
                raise RequestError(422, f"{name} must be a form field, not a file")
        upload = form.get("file")
        filename = upload.filename if isinstance(upload, StarletteUploadFile) else None
        return parse_part_info(values).with_default_id(filename)
    try:
        body = await request.json()
    except ValueError:
        return PartInfo()  # already refused by the image reader if it mattered
    if not isinstance(body, dict):
        return PartInfo()
    return parse_part_info(body)
