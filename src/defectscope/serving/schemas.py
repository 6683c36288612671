"""Response and request models of the REST API (they also document it in /docs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


class Base64Image(BaseModel):
    """JSON alternative to a multipart upload."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"image_base64": "iVBORw0KGgo..."}]})

    image_base64: str = Field(..., min_length=1, description="Encoded image file, base64.")


class Timing(BaseModel):
    decode_ms: float = Field(..., description="Reading and decoding the upload.")
    inference_ms: float = Field(..., description="Queueing plus the model call.")
    model_ms: float = Field(..., description="The model's own share of its batch.")
    total_ms: float


class PredictionSummary(BaseModel):
    """One image's decision (`Prediction.summary`): what every serving face returns."""

    score: float = Field(..., description="Raw anomaly score (memory-bank distance units).")
    normalized_score: float = Field(..., description="In (0, 1); the threshold maps to 0.5.")
    is_anomalous: bool
    label: str = Field(..., description="'anomalous' or 'good'.")
    threshold: float = Field(..., description="Image threshold used for the decision.")
    pixel_threshold: float = Field(..., description="Threshold of the defect mask.")
    defect_area_fraction: float = Field(..., description="Share of pixels in the mask.")
    width: int
    height: int


class PredictionResult(PredictionSummary):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "score": 1.93,
                    "normalized_score": 0.81,
                    "is_anomalous": True,
                    "label": "anomalous",
                    "threshold": 1.42,
                    "pixel_threshold": 1.71,
                    "defect_area_fraction": 0.024,
                    "width": 900,
                    "height": 900,
                    "model_version": "0.1.0",
                    "model_fingerprint": "5f0c2d8e41a7b9c3",
                    "timing_ms": {
                        "decode_ms": 4.1,
                        "inference_ms": 58.0,
                        "model_ms": 51.2,
                        "total_ms": 63.5,
                    },
                    "heatmap_png": None,
                    "overlay_png": None,
                    "mask_png": None,
                }
            ]
        }
    )

    model_version: str
    model_fingerprint: str
    served_version: str = Field(
        "", description="The model version that scored it ('' when the model is unversioned)."
    )
    prediction_id: int | None = Field(None, description="Its row in the log (None: no log).")
    timing_ms: Timing
    heatmap_png: str | None = Field(None, description="Base64 PNG, when ?heatmap=true.")
    overlay_png: str | None = Field(None, description="Base64 PNG, when ?overlay=true.")
    mask_png: str | None = Field(None, description="Base64 PNG, when ?mask=true.")


class ItemError(BaseModel):
    status: int = Field(..., description="The HTTP status this error has on /v1/predict.")
    detail: str


class BatchItem(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "index": 1,
                    "filename": "broken.png",
                    "result": None,
                    "error": {
                        "status": 415,
                        "detail": "not a readable image (unknown or corrupt format)",
                    },
                }
            ]
        }
    )

    index: int
    filename: str | None = None
    result: PredictionResult | None = None
    error: ItemError | None = None


class BatchResponse(BaseModel):
    items: list[BatchItem]
    n_ok: int
    n_failed: int


class ThresholdUpdate(BaseModel):
    """New thresholds for the served model; a field left out (or null) keeps the stored one."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"image": 1.35, "pixel": None}]}
    )

    # strict: JSON true/false and numeric strings are not thresholds (ints still are).
    image: float | None = Field(
        None, gt=0, allow_inf_nan=False, strict=True, description="Image threshold."
    )
    pixel: float | None = Field(
        None, gt=0, allow_inf_nan=False, strict=True, description="Mask threshold."
    )
    reset: bool = Field(
        False, strict=True, description="Restore the calibrated thresholds (image and pixel)."
    )
    reason: str | None = Field(None, max_length=500, description="Why (kept in the audit trail).")
    reviewer: str | None = Field(
        None, min_length=1, max_length=64, description="Who (else 'anonymous')."
    )


class ErrorResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "internal error", "request_id": "3f2a..."}]}
    )

    detail: Any
    request_id: str | None = None


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of error statuses, each with the `ErrorResponse` body."""
    return {
        code: {"model": ErrorResponse, "description": text} for code, text in descriptions.items()
    }


# Every /v1 route may answer these (limits and the API key are checked for all of them).
ERRORS = error_responses(
    {
        400: "The body is not valid JSON (or not parsable multipart).",
        401: "Missing or wrong API key (checked before the body is read).",
        408: "The request body did not arrive within the read timeouts.",
        413: "Body, upload, image or request pixels over a limit.",
        415: "Not an image (decoded by content).",
        422: "Bad request: missing field, bad base64, bad query value, corrupt image.",
        503: "The model is not loaded yet, or the worker stayed busy with other images.",
        504: "The model did not answer within the request timeout.",
    }
)

# FastAPI answers 400 itself when a multipart body cannot be parsed (routes with File()).
UNPARSABLE_MULTIPART = error_responses({400: "The multipart body cannot be parsed."})


class HealthResponse(BaseModel):
    status: str = Field(..., examples=["ok"])


class ReadyResponse(BaseModel):
    status: str = Field(..., examples=["ready"])
    model_fingerprint: str | None = None
    detail: str | None = None


class Review(BaseModel):
    verdict: str
    note: str | None = None
    reviewer: str | None = None
    reviewed_at: datetime


class PredictionLogEntry(BaseModel):
    id: int
    created_at: datetime
    route: str
    request_id: str
    model_fingerprint: str
    image_sha256: str
    width: int
    height: int
    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    latency_ms: float
    part_id: str | None = None
    line: str | None = None
    station: str | None = None
    tags: list[str] = Field(default_factory=list)
    model_version: str | None = Field(None, description="Version (or fingerprint) that scored.")
    taught_version: str | None = Field(None, description="Version this image was taught into.")
    model_name: str | None = Field(None, description="The named model that scored (if named).")
    has_pictures: bool = False
    review: Review | None = None


class PredictionDetail(PredictionLogEntry):
    thumbnail_url: str | None = None
    overlay_url: str | None = None
    image_url: str | None = None


class ReviewRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Literal["correct", "false_alarm", "missed_defect"]
    note: str | None = Field(None, max_length=1000)
    reviewer: str | None = Field(None, min_length=1, max_length=64)


class ReviewQueue(BaseModel):
    total: int
    items: list[PredictionLogEntry]


def utc(moment: datetime) -> datetime:
    """Naive means UTC; a moment outside years 1-9999 once in UTC is refused."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise ValueError("date out of range once converted to UTC (years 1 to 9999)") from None


UtcMoment = Annotated[datetime, AfterValidator(utc)]
RowId = Annotated[int, Field(ge=1, le=2**62)]


class TeachRequest(BaseModel):
    """Which reviewed false alarms to teach: the given ids, or all not taught yet (since)."""

    model_config = ConfigDict(extra="forbid")

    prediction_ids: list[RowId] | None = Field(None, min_length=1, max_length=10_000)
    since: UtcMoment | None = None
    reviewer: str | None = Field(None, min_length=1, max_length=64)
    flagged_since: UtcMoment | None = Field(
        None, description="Preview: the flagged predictions re-scored (default: today, UTC)."
    )


class PredictionLogPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[PredictionLogEntry]
