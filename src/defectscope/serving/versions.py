"""Model versions next to the served model: ``<model dir>/versions/<n>/model.safetensors``.

Version 1 is the original model file, copied on the first teach; each taught model is a new
version whose metadata records its parent (``lineage``). The file ``versions/active`` names the
version served; it is replaced atomically, and going back (undo) is activating the parent.
Without an ``active`` file the server serves the configured model file, unversioned.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from defectscope import storage
from defectscope.detector.detector import Detector
from defectscope.detector.model_file import MODEL_FILENAME, read_header, resolve_model_path
from defectscope.detector.teaching import save_model
from defectscope.errors import DefectscopeError

ACTIVE = "active"


class ModelVersions:
    """The versions folder of one local model (a folder or a .safetensors file)."""

    def __init__(self, model_path: str | Path) -> None:
        if storage.is_remote(model_path):
            raise DefectscopeError("model versions need a local model (not an s3:// or gs:// one)")
        path = Path(model_path)
        self.original = resolve_model_path(path)
        self.root = (path if path.is_dir() else path.parent) / "versions"

    def file(self, version: str) -> Path:
        if not version.isdigit():
            raise DefectscopeError(f"no model version {version!r}: versions are numbers")
        return self.root / str(int(version)) / MODEL_FILENAME

    def exists(self, version: str) -> bool:
        return version.isdigit() and self.file(version).is_file()

    def active(self) -> str | None:
        """The active version's number, or None when the original file is served."""
        try:
            value = (self.root / ACTIVE).read_text().strip()
        except OSError:
            return None
        return value if self.exists(value) else None

    def served_file(self) -> Path:
        active = self.active()
        return self.file(active) if active else self.original

    def numbers(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in self.root.iterdir()
            if p.name.isdigit() and (p / MODEL_FILENAME).is_file()
        )

    def ensure_first(self) -> None:
        """Version 1 = the original model file (a copy), made once."""
        first = self.file("1")
        if first.is_file():
            return
        first.parent.mkdir(parents=True, exist_ok=True)
        staging = first.with_name(f"{MODEL_FILENAME}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            shutil.copy2(self.original, staging)
            os.replace(staging, first)
        finally:
            staging.unlink(missing_ok=True)

    def add(self, detector: Detector, extras: dict[str, Any]) -> str:
        """Save ``detector`` as the next version (not activated); its number."""
        self.ensure_first()
        while True:
            number = (max(self.numbers(), default=0) or 1) + 1
            try:
                (self.root / str(number)).mkdir()  # claims the number, whoever races us
                break
            except FileExistsError:
                if (self.root / str(number) / MODEL_FILENAME).is_file():
                    continue
                # A claimed, never written folder (a crash): take it over.
                break
        save_model(detector, self.root / str(number), extras)
        return str(number)

    def activate(self, version: str) -> None:
        if not self.exists(version):
            raise DefectscopeError(f"no model version {version}")
        self.root.mkdir(parents=True, exist_ok=True)
        pointer = self.root / ACTIVE
        staging = pointer.with_name(f".{ACTIVE}.{os.getpid()}.{threading.get_ident()}")
        staging.write_text(f"{int(version)}\n")
        os.replace(staging, pointer)

    def describe(self) -> dict[str, Any]:
        """{active, versions: [...]} as the API answers it."""
        active = self.active()
        listed = []
        for number in self.numbers():
            meta: dict[str, Any] = {}
            with contextlib.suppress(DefectscopeError):
                meta = read_header(self.file(str(number)))
            lineage = meta.get("lineage") or {}
            listed.append(
                {
                    "version": str(number),
                    "parent": lineage.get("parent_version"),
                    "created_at": lineage.get("created_at") or meta.get("created_at"),
                    "created_by": lineage.get("created_by"),
                    "images_taught": int(lineage.get("images_taught", 0)),
                    "bank_rows": meta.get("bank_size"),
                    "prediction_ids": lineage.get("prediction_ids", []),
                }
            )
        return {"active": active or ("1" if listed else None), "versions": listed}
