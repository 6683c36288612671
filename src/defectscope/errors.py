"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""

from __future__ import annotations

from pathlib import Path


class DefectscopeError(Exception):
    """Base class for every error defectscope reports to a user."""


class ConfigError(DefectscopeError):
    """A configuration value is missing, unknown or out of range."""


class ImageLoadError(DefectscopeError):
    """An image could not be read; the message names the file and the reason."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = str(path) if path is not None else None
        self.reason = reason
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{reason}")


class DatasetError(DefectscopeError):
    """A dataset folder does not have a layout defectscope understands."""


class ModelFileError(DefectscopeError):
    """A model file is missing, corrupt, truncated, foreign or incompatible."""


class BackboneError(DefectscopeError):
    """A backbone or its weights could not be created or loaded."""


class NotFittedError(DefectscopeError):
    """The detector was used before `fit` (or `load`)."""
