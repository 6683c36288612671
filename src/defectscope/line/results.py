"""The watcher's result files: one line per scored file, appended to JSONL and/or CSV files.

Each line carries the file's journal key, so that a watcher restarted after a crash can tell
which claimed files already have their line (and must not be scored again).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from defectscope.errors import ConfigError, DefectscopeError
from defectscope.prediction_writer import FORMULA_PREFIXES, csv_safe, json_safe

COLUMNS = [
    "time",
    "path",
    "key",
    "score",
    "normalized_score",
    "is_anomalous",
    "threshold",
    "model",
    "model_version",
    "model_fingerprint",
    "sorted_to",
    "error",
]
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def result_format(path: Path) -> str:
    try:
        return FORMATS[path.suffix.lower()]
    except KeyError:
        raise ConfigError(
            f"--results {path}: name a .jsonl or .csv file (the suffix picks the format)"
        ) from None


class ResultFiles:
    """Appends result rows to every file, each line flushed and fsynced before returning."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = list(paths)
        self.formats = [result_format(path) for path in self.paths]
        self._streams: list[IO[str]] = []

    def open(self) -> ResultFiles:
        for path, fmt in zip(self.paths, self.formats, strict=True):
            if path.is_dir():
                raise ConfigError(f"--results {path}: a folder, not a file")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                stream = open(path, "a+", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"--results {path}: cannot write: {exc.strerror}") from None
            # A line torn by a crash is closed, so the next line starts on its own.
            size = stream.seek(0, os.SEEK_END)
            if size:
                stream.seek(size - 1)
                if stream.read(1) != "\n":
                    stream.write("\n")
            elif fmt == "csv":
                csv.writer(stream).writerow(COLUMNS)
            stream.flush()
            self._streams.append(stream)
        return self

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows``; a file that cannot be written stops the watcher (DefectscopeError):
        a result that is not recorded must not count as done."""
        for path, stream, fmt in zip(self.paths, self._streams, self.formats, strict=True):
            try:
                self._write(stream, fmt, rows)
            except OSError as exc:
                raise DefectscopeError(
                    f"{path}: cannot write results: {exc.strerror or exc}"
                ) from None

    @staticmethod
    def _write(stream: IO[str], fmt: str, rows: list[dict[str, Any]]) -> None:
        if fmt == "jsonl":
            stream.writelines(json.dumps(json_safe(row)) + "\n" for row in rows)
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            for row in rows:
                writer.writerow(["" if row.get(c) is None else csv_safe(row[c]) for c in COLUMNS])
            stream.write(buffer.getvalue())
        stream.flush()
        os.fsync(stream.fileno())

    def rows_present(self, wanted: set[str]) -> dict[str, dict[str, Any]]:
        """The rows of ``wanted`` keys that already have a whole line in every result file
        (as the first file has them)."""
        found: dict[str, dict[str, Any]] | None = None
        for path, fmt in zip(self.paths, self.formats, strict=True):
            rows = _rows_in(path, fmt, wanted) if path.exists() else {}
            found = rows if found is None else {k: v for k, v in found.items() if k in rows}
        return found or {}

    def close(self) -> None:
        for stream in self._streams:
            stream.close()
        self._streams = []


def _rows_in(path: Path, fmt: str, wanted: set[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    if not wanted:
        return found
    with open(path, encoding="utf-8", errors="replace", newline="") as stream:
        if fmt == "jsonl":
            for line in stream:
                try:
                    row = json.loads(line)
                    key = row.get("key")
                except (json.JSONDecodeError, AttributeError):
                    continue  # a torn line: not written, so that file is scored again
                if key in wanted:
                    found[key] = row
        else:
            for record in csv.DictReader(stream):
                key = unquoted(record.get("key") or "")
                # A torn row lacks its last columns (None); it does not count.
                if key in wanted and None not in record.values():
                    found[key] = {k: unquoted(v) for k, v in record.items()}
    return found


def unquoted(value: str) -> str:
    """A CSV cell as it was before `csv_safe` quoted a formula-like text."""
    if value.startswith("'") and value[1:].startswith(FORMULA_PREFIXES):
        return value[1:]
    return value
