"""The watcher's journal: which files were claimed for scoring and which are done, on disk.

One JSON object per line, appended and fsynced before the step it records goes on, so that a
watcher killed at any moment restarts knowing every file it finished. A file's identity is its
path relative to the watched folder, its size and its mtime in nanoseconds: the same name
written again later is a new file. The journal is rewritten (atomically) at start, keeping
only the files still in the folder, so it stays as large as the folder, not its history.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from defectscope.errors import DefectscopeError


@dataclass(frozen=True)
class FileKey:
    """A file's identity for the journal and the results: relative path, size, mtime."""

    rel: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        return f"{self.rel}|{self.size}|{self.mtime_ns}"

    @classmethod
    def of(cls, root: Path, path: Path) -> FileKey:
        stat = path.stat()
        return cls(path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns)

    def still_there(self, root: Path) -> bool:
        """True when ``root/rel`` is still this file (same size and mtime)."""
        try:
            stat = (root / self.rel).stat()
        except OSError:
            return False
        return stat.st_size == self.size and stat.st_mtime_ns == self.mtime_ns


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Journal:
    """Append-only record of claimed / done files (and failed webhook posts); thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: set[str] = set()
        self.claimed: dict[str, FileKey] = {}
        self._lock = threading.Lock()
        self._stream: IO[str] | None = None

    def open(self, root: Path) -> Journal:
        """Read the journal, compact it to the files still under ``root``, open for append."""
        records = self._read()
        for record in records:
            key = FileKey(record["rel"], int(record["size"]), int(record["mtime_ns"]))
            if record["event"] == "claimed":
                self.claimed[key.key] = key
            elif record["event"] == "done":
                self.done.add(key.key)
                self.claimed.pop(key.key, None)
        kept = {k: r for r in records if (k := _key(r)) in self.done and _exists(root, r)}
        self.done = set(kept)
        lines = [{**r, "event": "done"} for r in kept.values()]
        lines += [{**_record(k), "event": "claimed"} for k in self.claimed.values()]
        self._rewrite(lines)
        self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open
        return self

    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        records = []
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise DefectscopeError(f"{self.path}: cannot read the journal: {exc}") from None
        for line in text.splitlines():
            try:
                record = json.loads(line)
                _key(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line torn by a crash mid-write: its step was not finished
            if isinstance(record, dict) and record.get("event") in ("claimed", "done"):
                records.append(record)
        return records

    def _rewrite(self, lines: list[dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".journal.", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.writelines(json.dumps(line) + "\n" for line in lines)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _append(self, lines: list[dict[str, Any]]) -> None:
        with self._lock:
            if self._stream is None:
                raise RuntimeError("journal is not open")
            try:
                self._stream.writelines(json.dumps(line) + "\n" for line in lines)
                self._stream.flush()
                os.fsync(self._stream.fileno())
            except OSError as exc:
                # Without the journal nothing is crash-safe: stop rather than go on blind.
                raise DefectscopeError(
                    f"{self.path}: cannot write the journal: {exc.strerror or exc}"
                ) from None

    def claim(self, keys: list[FileKey]) -> None:
        self._append([{**_record(k), "event": "claimed", "at": utc_now()} for k in keys])
        self.claimed.update((k.key, k) for k in keys)

    def finish(self, keys: list[FileKey], outcomes: list[str]) -> None:
        """Mark files done (after their result line is written and they are sorted)."""
        lines = [
            {**_record(k), "event": "done", "outcome": outcome, "at": utc_now()}
            for k, outcome in zip(keys, outcomes, strict=True)
        ]
        self._append(lines)
        for k in keys:
            self.done.add(k.key)
            self.claimed.pop(k.key, None)

    def note(self, event: str, key: str, **fields: Any) -> None:
        """Record something that happened to a file besides scoring (a failed webhook post)."""
        self._append([{"event": event, "key": key, "at": utc_now(), **fields}])

    def unfinished(self) -> list[FileKey]:
        """Files claimed by an earlier run that never finished (it crashed or was killed)."""
        return list(self.claimed.values())

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream = None


def _record(key: FileKey) -> dict[str, Any]:
    return {"rel": key.rel, "size": key.size, "mtime_ns": key.mtime_ns}


def _key(record: dict[str, Any]) -> str:
    return FileKey(record["rel"], int(record["size"]), int(record["mtime_ns"])).key


def _exists(root: Path, record: dict[str, Any]) -> bool:
    return FileKey(record["rel"], int(record["size"]), int(record["mtime_ns"])).still_there(root)
