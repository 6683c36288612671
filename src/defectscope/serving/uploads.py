"""Reading uploaded images out of requests: multipart files or JSON base64, with their limits.

Only bytes and header sizes are handled here; decoding is `load_image`'s, in the routes.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile as StarletteUploadFile

from defectscope.errors import ImageLoadError
from defectscope.serving.limits import RequestError, image_pixels
from defectscope.serving.schemas import Base64Image
from defectscope.serving.settings import ServingSettings

BASE64_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")


def image_error_status(error: ImageLoadError) -> int:
    # ImageLoadError has no subclasses; its reasons are fixed phrases from data.io.
    if "over the limit" in error.reason:
        return 413
    if "not a readable image" in error.reason:
        return 415
    return 422


async def read_upload(upload: StarletteUploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise RequestError(413, f"upload is over the limit of {limit:,} bytes")
    if not data:
        raise RequestError(422, "the uploaded file is empty")
    return data


async def read_single_image(request: Request, limit: int) -> bytes:
    """The image of /v1/predict: multipart field ``file`` or JSON ``image_base64``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1)
        upload = form.get("file")
        if not isinstance(upload, StarletteUploadFile):
            raise RequestError(422, "missing multipart file field 'file'")
        return await read_upload(upload, limit)
    if content_type == "application/json":
        try:
            payload = Base64Image.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None
        try:
            # Line-wrapped base64 (MIME, `base64` without -w0) is common: whitespace is ignored.
            text = payload.image_base64.translate(BASE64_WHITESPACE)
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(
                422,
                "image_base64 is not valid base64 (standard alphabet with padding; line breaks "
                "and spaces are ignored, a data: URL prefix is not accepted)",
            ) from None
        if len(data) > limit:
            raise RequestError(413, f"image is over the limit of {limit:,} bytes")
        return data
    if not content_type:
        raise RequestError(
            422, "no image: send multipart/form-data with a 'file' field or JSON image_base64"
        )
    raise RequestError(
        415, f"unsupported content type {content_type!r}: use multipart/form-data or JSON"
    )


def pixels_within(settings: ServingSettings, data: bytes) -> int:
    """The pixels an upload will hold once decoded; 0 for one that decoding refuses anyway."""
    pixels = image_pixels(data)
    return pixels if pixels <= settings.max_pixels else 0


def check_request_pixels(settings: ServingSettings, sizes: Sequence[int]) -> None:
    budget = settings.request_pixel_budget
    if sum(sizes) > budget:
        raise RequestError(
            413,
            f"the {len(sizes)} images of this request have {sum(sizes):,} pixels in all, over "
            f"the limit of {budget:,} per request; send fewer or smaller images",
        )


def check_image_count(settings: ServingSettings, count: int) -> None:
    if count > settings.max_batch_images:
        raise RequestError(
            413, f"{count} images sent; at most {settings.max_batch_images} per request"
        )
