"""The embedded registry: plain folders, no server.

Layout::

    ROOT/NAME/versions/N/model.safetensors   a copy of the registered model file
    ROOT/NAME/versions/N/version.json        when, from where, lineage
    ROOT/NAME/versions/N/report.json         the evaluation report, when one was attached
    ROOT/NAME/stages.json                    stage -> version, each stage's earlier holders,
                                             and the history of every stage change

Every change runs under an exclusive lock file (``ROOT/NAME/.lock``), so concurrent writers
(two `fit --register` at once) get distinct versions and never lose a stage change. Files are
written to a temporary name and renamed, so a reader or a crash never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defectscope.registry.base import (
    MAX_STAGE_HISTORY,
    ModelVersion,
    Registry,
    RegistryError,
    check_name,
    check_stage,
    prepare_registration,
)

MODEL_FILENAME = "model.safetensors"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: corrupt {what} ({exc}); restore or remove it") from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read {what}: {exc.strerror or exc}") from None


class FolderRegistry(Registry):
    """A registry in a local (or shared, POSIX-locking) folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.uri = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise RegistryError(f"registry {self.root}: a file, not a folder")

    # ------------------------------------------------------------------ reading
    def _model_dir(self, name: str, must_exist: bool = True) -> Path:
        folder = self.root / check_name(name)
        if must_exist and not (folder / "versions").is_dir():
            known = ", ".join(self.names()[:10]) or "none"
            raise RegistryError(f"no model named {name!r} in {self.root} (known: {known})")
        return folder

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "versions").is_dir())

    def _stages(self, folder: Path) -> dict[str, Any]:
        path = folder / "stages.json"
        if not path.exists():
            return {"stages": {}, "holders": {}, "history": []}
        data = read_json(path, "stage file")
        if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
            raise RegistryError(f"{path}: corrupt stage file (no 'stages' object); restore it")
        data.setdefault("holders", {})
        data.setdefault("history", [])
        return data

    def _numbers(self, folder: Path) -> list[int]:
        versions = folder / "versions"
        if not versions.is_dir():
            return []
        return sorted(int(p.name) for p in versions.iterdir() if p.name.isdigit())

    def versions(self, name: str) -> list[ModelVersion]:
        folder = self._model_dir(name)
        stages = self._stages(folder)["stages"]
        found = []
        for number in self._numbers(folder):
            record = read_json(folder / "versions" / str(number) / "version.json", "version file")
            found.append(
                ModelVersion(
                    name=name,
                    version=number,
                    created_at=record.get("created_at", ""),
                    source=record.get("source", ""),
                    stages=sorted(s for s, v in stages.items() if v == number),
                    lineage=record.get("lineage", {}),
                    has_report=(folder / "versions" / str(number) / "report.json").is_file(),
                )
            )
        return found

    def report(self, name: str, version: int) -> dict[str, Any] | None:
        self.get(name, version)
        path = self._model_dir(name) / "versions" / str(version) / "report.json"
        return read_json(path, "report") if path.is_file() else None

    def stage_history(self, name: str) -> list[dict[str, Any]]:
        return list(self._stages(self._model_dir(name))["history"])

    def local_model(self, name: str, version: int) -> Path:
        path = self._model_dir(name) / "versions" / str(version) / MODEL_FILENAME
        if not path.is_file():
            raise RegistryError(f"{name}@{version}: no such version in {self.root}")
        return path

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self, folder: Path) -> Iterator[None]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / ".lock", "a+b")  # noqa: SIM115 - held for the lock's life
        except OSError as exc:
            raise RegistryError(f"{folder}: cannot write: {exc.strerror or exc}") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: renames stay atomic, not serialised
            with handle:
                yield
            return
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

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
        prepared = prepare_registration(
            name, model_path, parent=parent, stage=stage, report=report, lineage=lineage
        )
        source, found, attached = prepared.source, prepared.lineage, prepared.report
        folder = self._model_dir(name, must_exist=False)
        with self._locked(folder):
            (folder / "versions").mkdir(exist_ok=True)
            number = max(self._numbers(folder), default=0) + 1
            staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
            try:
                shutil.copyfile(source, staging / MODEL_FILENAME)
                record = {
                    "name": name,
                    "version": number,
                    "created_at": now(),
                    "source": str(Path(source).resolve()),
                    "lineage": found,
                }
                write_json_atomic(staging / "version.json", record)
                if attached is not None:
                    write_json_atomic(staging / "report.json", attached)
                os.replace(staging, folder / "versions" / str(number))
            except OSError as exc:
                raise RegistryError(f"{folder}: cannot register: {exc.strerror or exc}") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            if stage is not None:
                self._move_stage(folder, number, stage, "register")
        return number

    def set_stage(self, name: str, version: int, stage: str) -> None:
        check_stage(stage)
        folder = self._model_dir(name)
        with self._locked(folder):
            if version not in self._numbers(folder):
                raise RegistryError(f"{name}@{version}: no such version in {self.root}")
            self._move_stage(folder, version, stage, "promote")

    def rollback(self, name: str, stage: str) -> int:
        check_stage(stage)
        folder = self._model_dir(name)
        with self._locked(folder):
            data = self._stages(folder)
            holders = [v for v in data["holders"].get(stage, []) if isinstance(v, int)]
            current = data["stages"].get(stage)
            if current is None:
                raise RegistryError(f"{name}: no version holds the stage {stage!r}")
            if len(holders) < 2:
                raise RegistryError(f"{name}: no earlier version held {stage!r} to roll back to")
            holders.pop()
            previous = holders[-1]
            data["holders"][stage] = holders
            data["stages"][stage] = previous
            data["history"].append(
                {"at": now(), "action": "rollback", "stage": stage, "version": previous,
                 "previous": current}
            )  # fmt: skip
            write_json_atomic(folder / "stages.json", data)
        return previous

    def _move_stage(self, folder: Path, version: int, stage: str, action: str) -> None:
        """Under the lock: ``stage`` -> ``version``, remembered for rollback."""
        data = self._stages(folder)
        current = data["stages"].get(stage)
        if current == version:
            return
        holders = [v for v in data["holders"].get(stage, []) if v != version]
        data["holders"][stage] = [*holders, version][-MAX_STAGE_HISTORY:]
        data["stages"][stage] = version
        data["history"].append(
            {"at": now(), "action": action, "stage": stage, "version": version,
             "previous": current}
        )  # fmt: skip
        write_json_atomic(folder / "stages.json", data)
