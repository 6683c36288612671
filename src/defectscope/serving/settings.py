"""Serving settings, read from arguments or ``DEFECTSCOPE_*`` environment variables.

Environment variables are what make ``uvicorn --workers N`` work: every worker process builds
its own app from the same environment (see ``app.app_from_env``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from defectscope.data.io import MAX_PIXELS

MB = 1024 * 1024


class ServingSettings(BaseSettings):
    """Everything the REST app needs; every field can be set as ``DEFECTSCOPE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="DEFECTSCOPE_", extra="ignore")

    model_path: Path | None = Field(None, description="Model folder or .safetensors file.")
    device: str | None = Field(None, description="auto, cpu, cuda; None keeps the model's.")
    runtime: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="auto picks from the model file: .onnx, .xml (OpenVINO), else torch."
    )
    max_upload_bytes: int = Field(20 * MB, gt=0, description="Largest accepted image file.")
    max_pixels: int = Field(MAX_PIXELS, gt=0, description="Largest accepted image (w * h).")
    max_batch_images: int = Field(32, gt=0, description="Most files in one batch request.")
    batch_max_size: int = Field(8, gt=0, description="Micro-batch: most images per model call.")
    batch_max_wait_ms: float = Field(
        10.0,
        ge=0,
        description="Micro-batch: how long a request waits for company, only while the server "
        "is under load (an idle server answers a lone request at once).",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="Longest wait for the model; then 504 (the request is dropped)."
    )
    api_key: SecretStr | None = Field(None, description="If set, required on /v1/* and /metrics.")
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    prediction_log_url: str | None = Field(
        "sqlite:///predictions.db",
        description="SQLAlchemy URL of the prediction log; None (or 'none') disables it.",
    )

    report_dir: Path | None = Field(
        None,
        description="Evaluation report folder (with metrics.json) shown by /v1/model/report; "
        "None looks for report/metrics.json next to the model file.",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        # A comma list reads better in an environment variable than JSON.
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("prediction_log_url", "api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none", "off"):
            return None
        return value

    @property
    def max_request_bytes(self) -> int:
        """Coarse cap on a whole request body, checked before it is read."""
        # base64 inflates by 4/3; multipart adds headers per part.
        per_image = self.max_upload_bytes * 4 // 3 + 64 * 1024
        return per_image * self.max_batch_images
