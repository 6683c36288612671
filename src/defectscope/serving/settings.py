"""Serving settings, read from arguments or ``DEFECTSCOPE_*`` environment variables.

Environment variables are what make ``uvicorn --workers N`` work: every worker process builds
its own app from the same environment (see ``app.app_from_env``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 1024 * 1024
MPX = 1024 * 1024


class ServingSettings(BaseSettings):
    """Everything the REST app needs; every field can be set as ``DEFECTSCOPE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="DEFECTSCOPE_", extra="ignore")

    model_path: Path | None = Field(None, description="Model folder or .safetensors file.")
    device: str | None = Field(None, description="auto, cpu, cuda; None keeps the model's.")
    runtime: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto", description="auto picks from the model file: .onnx, .xml (OpenVINO), else torch."
    )
    max_upload_bytes: int = Field(20 * MB, gt=0, description="Largest accepted image file.")
    max_request_bytes: int = Field(
        100 * MB,
        gt=0,
        description="Largest body of a batch or drift-window request (a single-image request "
        "may carry one image of max_upload_bytes, base64 included).",
    )
    max_pixels: int = Field(16 * MPX, gt=0, description="Largest accepted image (w * h).")
    max_request_pixels: int = Field(
        64 * MPX, gt=0, description="Most pixels of all the images of one request together."
    )
    max_inflight_pixels: int = Field(
        64 * MPX,
        gt=0,
        description="Most pixels a worker holds decoded at once, over all requests; the others "
        "wait their turn (503 after request_timeout_s). Bounds a worker's memory.",
    )
    render_max_pixels: int = Field(
        4 * MPX,
        gt=0,
        description="Heatmap, overlay and mask PNGs of a larger image are shrunk by a whole "
        "factor to at most this many pixels.",
    )
    read_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A request's headers must arrive within this, and its body may pause no "
        "longer; otherwise the connection is closed (408 for a body).",
    )
    body_timeout_s: float = Field(
        120.0, gt=0, description="A request body must arrive in full within this (else 408)."
    )
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
    pictures_dir: Path | None = Field(
        None,
        description="Where logged predictions keep their pictures (thumbnail, overlay, "
        "original); None puts them in 'pictures/' next to a SQLite log file (none without one).",
    )
    pictures_enabled: bool = Field(True, description="False keeps no pictures at all.")
    pictures_max_count: int = Field(
        10_000, ge=0, description="Most predictions whose pictures are kept (oldest pruned)."
    )
    pictures_max_age_days: float = Field(
        30.0, ge=0, description="Pictures older than this are pruned (0 keeps them forever)."
    )
    pictures_max_bytes: int = Field(
        5 * 1024 * MB, ge=0, description="Most bytes all kept pictures may take together."
    )
    pictures_original_max_bytes: int = Field(
        20 * MB,
        ge=0,
        description="An upload is kept in full (for teaching the model) only up to this size; "
        "0 keeps no originals.",
    )
    export_max_items: int = Field(
        5000, gt=0, description="Most reviewed predictions one ZIP export may hold (else 413)."
    )
    teach_max_images: int = Field(
        256, gt=0, description="Most images one teach request may add to the memory bank."
    )

    models: dict[str, str] = Field(
        default_factory=dict,
        description="More models served by name (JSON object NAME -> model path or registry "
        "reference NAME@REF), under /v1/models/NAME/...; loaded on first use.",
    )
    default_model: str = Field(
        "default", description="The name of the model_path model (the one /v1/predict serves)."
    )
    registry: str | None = Field(
        None, description="Registry that references in ``models`` are resolved in."
    )
    memory_budget_mb: float | None = Field(
        None,
        gt=0,
        description="Most estimated memory of the named models loaded at once; the least "
        "recently used are unloaded beyond it (the default model stays). None: no limit.",
    )
    registry_poll_s: float = Field(
        0.0,
        ge=0,
        description="A named model given as NAME@STAGE follows its stage: at most this often "
        "(on a request) the registry is asked and a moved stage is loaded; 0 only on reload.",
    )
    share_backbones: bool = Field(
        True, description="Models of the same backbone share one copy of its weights."
    )
    model_ref: str | None = Field(
        None, description="The registry reference model_path was resolved from, if any."
    )
    watch_dir: Path | None = Field(
        None,
        description="A folder whose new images the server scores as they arrive (recursively, "
        "once settled; journal, results and sorting as `defectscope watch`). None: no watch.",
    )
    watch_results: Path | None = Field(
        None, description="JSONL or CSV results of the watched folder [default: in its state]."
    )
    watch_sort_to: Path | None = Field(
        None, description="Move each watched file to ok/, ng/ or error/ under this folder."
    )
    watch_settle_s: float = Field(
        1.0, ge=0, description="A watched file is read once unchanged for this long."
    )
    watch_poll_s: float = Field(0.5, gt=0, description="Seconds between scans of the folder.")

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
    def pictures_root(self) -> Path | None:
        """The pictures folder: the setting, else ``pictures/`` beside a SQLite log file."""
        if not self.pictures_enabled or self.prediction_log_url is None:
            return None
        if self.pictures_dir is not None:
            return self.pictures_dir
        url = self.prediction_log_url
        if url is None or not url.startswith("sqlite:///") or url.endswith(":memory:"):
            return None
        return Path(url.removeprefix("sqlite:///")).parent / "pictures"

    @property
    def max_single_request_bytes(self) -> int:
        """Largest body of /v1/predict: one image, base64 (4/3) and multipart framing included."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024

    @property
    def request_pixel_budget(self) -> int:
        """Pixels one request may bring: never below one image of max_pixels."""
        return max(self.max_request_pixels, self.max_pixels)

    @property
    def inflight_pixel_budget(self) -> int:
        """Never below what one accepted request may hold, so every request can run."""
        return max(self.max_inflight_pixels, self.request_pixel_budget)
