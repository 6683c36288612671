"""The registry's one interface, its record of a version, and model references (``NAME@REF``).

A reference names a model in a registry: ``bottle@3`` is version 3, ``bottle@production`` the
version holding the stage ``production``, ``bottle@latest`` and a bare ``bottle`` the highest
version. A bare name means the latest on purpose: a stage is a decision someone made, so a
line that should follow it says so (``@production``).
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
STAGE_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
LATEST = "latest"
# How many earlier holders of a stage rollback can go back through.
MAX_STAGE_HISTORY = 100


class RegistryError(DefectscopeError):
    """A registry, model name, version or stage that cannot be used as asked."""


@dataclass
class ModelVersion:
    """One registered version: where its model file is, which stages it holds, where it
    came from (lineage: training fingerprint, data, parent) and its evaluation report."""

    name: str
    version: int
    created_at: str
    source: str  # the registered model's location when it was registered
    stages: list[str] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    has_report: bool = False

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.ref, **asdict(self)}


@dataclass(frozen=True)
class ResolvedModel:
    """A reference resolved to a local model file, and the version it came from."""

    path: Path
    name: str
    version: int

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise RegistryError(
            f"bad model name {name!r}: use letters, digits, '_', '.', '-' (at most 100)"
        )
    return name


def check_stage(stage: str) -> str:
    if not STAGE_PATTERN.match(stage or "") or stage == LATEST:
        raise RegistryError(
            f"bad stage {stage!r}: a lower-case word such as production or staging "
            "(not 'latest', which always means the highest version)"
        )
    return stage


def parse_ref(ref: str) -> tuple[str, int | str]:
    """``'bottle@3'`` -> ('bottle', 3); ``'bottle@production'`` -> ('bottle', 'production');
    ``'bottle'`` and ``'bottle@latest'`` -> ('bottle', 'latest')."""
    name, _, selector = str(ref).partition("@")
    check_name(name)
    if not selector or selector == LATEST:
        return name, LATEST
    if selector.isdigit():
        return name, int(selector)
    return name, check_stage(selector)


def looks_like_ref(value: str) -> bool:
    """True for ``NAME@SELECTOR`` (no path separator): what a model argument treats as a
    registry reference when no file of that name exists."""
    name, sep, selector = value.partition("@")
    return bool(sep and NAME_PATTERN.match(name) and re.match(r"^[A-Za-z0-9_-]+$", selector))


def model_lineage(model_file: Path) -> dict[str, Any]:
    """What the model file says about where it came from: the training set's fingerprint and
    size, the fit's time and version, and ``lineage`` (e.g. the parent of a model taught from
    reviews) when the metadata carries it."""
    from defectscope.detector.model_file import read_header

    meta = read_header(model_file)
    training = meta.get("training") or {}
    calibration = meta.get("calibration") or {}
    found: dict[str, Any] = {
        "training_fingerprint": training.get("fingerprint", ""),
        "n_training_images": training.get("n_images"),
        "fitted_at": meta.get("created_at"),
        "defectscope_version": meta.get("defectscope_version"),
        "backbone": (meta.get("backbone") or {}).get("name"),
        "threshold": calibration.get("threshold"),
    }
    recorded = meta.get("lineage")
    if isinstance(recorded, dict):
        found.update({f"model_{k}" if k in found else k: v for k, v in recorded.items()})
    return {k: v for k, v in found.items() if v is not None}


def read_report(report: str | Path | dict[str, Any] | None) -> dict[str, Any] | None:
    """An evaluation report as a JSON object: a dict, a ``metrics.json`` file, or a report
    folder holding one."""
    if report is None or isinstance(report, dict):
        return report
    path = Path(report)
    if path.is_dir():
        path = path / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"report not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: not a JSON report ({exc})") from None
    if not isinstance(data, dict):
        raise RegistryError(f"{path}: a report must be a JSON object")
    return data


@dataclass
class Registration:
    """What both backends store for a new version, checked before anything is written."""

    source: Path
    lineage: dict[str, Any]
    report: dict[str, Any] | None


def prepare_registration(
    name: str,
    model_path: str | Path,
    *,
    parent: str | None,
    stage: str | None,
    report: str | Path | dict[str, Any] | None,
    lineage: dict[str, Any] | None,
) -> Registration:
    """Check the name and stage, read the model's lineage and the report to attach (given, or
    evaluate's ``report/`` beside the model)."""
    from defectscope.detector.model_file import resolve_model_path

    check_name(name)
    if stage is not None:
        check_stage(stage)
    source = resolve_model_path(model_path)  # a folder -> its model.safetensors
    found = model_lineage(source)  # also refuses a file that is not a model
    found.update(lineage or {})
    if parent is not None:
        found["parent"] = parent
    attached = read_report(report)
    if attached is None and (source.parent / "report" / "metrics.json").is_file():
        attached = read_report(source.parent / "report")
    return Registration(source, found, attached)


class Registry(ABC):
    """Named, numbered model versions with movable stage labels and a stage history."""

    uri: str

    @abstractmethod
    def register(
        self,
        name: str,
        model_path: str | Path,
        *,
        parent: str | None = None,
        stage: str | None = None,
        report: str | Path | dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> int:
        """Store a copy of the model at ``model_path`` as the next version of ``name``."""

    @abstractmethod
    def names(self) -> list[str]:
        """The registered model names, sorted."""

    @abstractmethod
    def versions(self, name: str) -> list[ModelVersion]:
        """The versions of ``name``, oldest first (RegistryError for an unknown name)."""

    @abstractmethod
    def report(self, name: str, version: int) -> dict[str, Any] | None:
        """The evaluation report attached to a version, or None."""

    @abstractmethod
    def stage_history(self, name: str) -> list[dict[str, Any]]:
        """Every stage change of ``name``, oldest first."""

    @abstractmethod
    def set_stage(self, name: str, version: int, stage: str) -> None:
        """Give ``stage`` to ``version`` (taking it from the version that held it)."""

    @abstractmethod
    def rollback(self, name: str, stage: str) -> int:
        """Give ``stage`` back to the version that held it before; returns that version."""

    @abstractmethod
    def local_model(self, name: str, version: int) -> Path:
        """A local path of the version's model file."""

    def promote(self, name: str, version: int, stage: str = "production") -> None:
        """Same as `set_stage`; the name the CLI uses."""
        self.set_stage(name, version, stage)

    def get(self, name: str, version: int) -> ModelVersion:
        for found in self.versions(name):
            if found.version == version:
                return found
        raise RegistryError(f"{name}@{version}: no such version in {self.uri}")

    def find(self, ref: str) -> ModelVersion:
        """The version a reference names (``NAME``, ``NAME@N``, ``NAME@latest``, ``NAME@STAGE``)."""
        name, selector = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            raise RegistryError(f"{name}: no versions in {self.uri}")
        if selector == LATEST:
            return versions[-1]
        if isinstance(selector, int):
            return self.get(name, selector)
        for found in versions:
            if selector in found.stages:
                return found
        raise RegistryError(f"{name}@{selector}: no version holds the stage {selector!r}")

    def resolve(self, ref: str) -> ResolvedModel:
        """A reference -> the local model file of the version it names."""
        found = self.find(ref)
        return ResolvedModel(self.local_model(found.name, found.version), found.name, found.version)
