"""What a model records about its fit: the training set, the bank, the timings, the drift
reference and how the configuration was chosen. Stored in the model file's metadata."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from defectscope.version import __version__


@dataclass
class TrainingInfo:
    """The training set as the fit saw it."""

    n_images: int = 0
    n_in_bank: int = 0
    n_patches: int = 0
    # Order-independent digest of the decoded images: the same set gives the same value.
    fingerprint: str = ""
    skipped: list[dict[str, Any]] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)
    n_chunks: int = 1
    n_candidates: int = 0
    n_calibration: int = 0
    # Training images whose out-of-sample score is a gross outlier (`detector.suspects`).
    suspects: list[dict[str, Any]] = field(default_factory=list)
    # Suspects of a first fit that `fit.drop_suspects` left out of this one.
    dropped: list[dict[str, Any]] = field(default_factory=list)
    engine: dict[str, Any] | None = None


@dataclass
class FitInfo:
    """The fit's record; ``reference`` (drift statistics), ``selection`` (auto mode's table
    and choice) and ``scales`` (the half-size bank) are None where the fit made none."""

    created_at: str | None = None
    defectscope_version: str = __version__
    training: TrainingInfo = field(default_factory=TrainingInfo)
    bank_size: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    reference: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    # The half-size bank (`defectscope.detector.scales`): its weights, size and own thresholds.
    scales: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, without the parts that are None."""
        data = asdict(self)
        if data["training"]["engine"] is None:
            del data["training"]["engine"]
        return {k: v for k, v in data.items() if v is not None}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> FitInfo:
        """The record in a model's metadata; keys it does not know are ignored, missing ones
        keep their defaults (older files and exported models record less)."""
        known = {f.name for f in fields(cls)} - {"training"}
        values = {k: meta[k] for k in known if k in meta}
        training = meta.get("training")
        if isinstance(training, dict):
            names = {f.name for f in fields(TrainingInfo)}
            values["training"] = TrainingInfo(**{k: v for k, v in training.items() if k in names})
        return cls(**values)
