"""Scoring images as they arrive in a folder: poll, wait for each file to settle, score the
ready ones in batches with the core `Detector`, record, sort, notify.

One batch goes through these steps, each durable before the next, so that a watcher killed
at any point and restarted scores every file exactly once:

1. claim the files in the journal;
2. read them and score them with ``Detector.iter_predict`` (an unreadable file is a result
   with an error, never a stop);
3. append their result lines (JSONL / CSV), then the prediction log rows when asked;
4. move them to ``ok/``, ``ng/`` or ``error/`` when asked, queue the webhook posts;
5. mark them done in the journal.

At start, files claimed by an earlier run and not done are finished from their result line
when it exists (sorted if they were not yet), otherwise scored again.

Polling, not file-system events: it works the same on every OS and on network shares, where
events are unreliable.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defectscope.errors import ConfigError, DefectscopeError
from defectscope.line.journal import FileKey, Journal
from defectscope.line.results import ResultFiles
from defectscope.line.sorting import ERROR, NG, OK, Sorter

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector
    from defectscope.line.hooks import WebhookSender

log = logging.getLogger(__name__)

DEFAULT_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff", "*.webp")
STATE_DIR = ".defectscope-watch"


def check_patterns(patterns: Sequence[str]) -> tuple[str, ...]:
    """File-name globs (``*.png``); refuse empty ones, paths and unbalanced brackets."""
    for pattern in patterns:
        if not pattern or "/" in pattern or os.sep in pattern:
            raise ConfigError(f"--pattern {pattern!r}: a file-name glob such as '*.png'")
        if pattern.count("[") != pattern.count("]"):
            raise ConfigError(f"--pattern {pattern!r}: unbalanced '[' or ']'")
    return tuple(patterns)


@dataclass
class WatchOptions:
    """What to watch and where results go (the CLI's options, checked)."""

    root: Path
    results: list[Path]
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    settle_s: float = 1.0
    poll_s: float = 0.5
    batch_size: int = 16
    once: bool = False
    sort_to: Path | None = None
    state_dir: Path | None = None
    only_anomalies: bool = False
    model: str = ""  # the model as given: a path or a registry reference
    model_version: int | None = None  # the registry version, when the model came from one


@dataclass
class WatchStats:
    scored: int = 0
    anomalous: int = 0
    errors: int = 0
    recovered: int = 0
    log_failures: int = 0
    batches: int = 0
    seconds: float = 0.0
    webhook: dict[str, int] = field(default_factory=dict)


class Scanner:
    """Finds files matching the patterns under ``root`` and says which have settled: their
    size and mtime unchanged for ``settle_s`` seconds, by observation or by the mtime itself."""

    def __init__(
        self, root: Path, patterns: Sequence[str], settle_s: float, exclude: Sequence[Path]
    ) -> None:
        self.root = root
        self.settle_s = settle_s
        self.exclude = {p.resolve() for p in exclude}
        joined = "|".join(fnmatch.translate(p) for p in patterns)
        self._match = re.compile(joined, re.IGNORECASE).match
        self._seen: dict[str, tuple[FileKey, float]] = {}

    def _walk(self) -> Iterator[Path]:
        for folder, dirs, files in os.walk(self.root):
            here = Path(folder)
            # Hidden folders hold state and temporary uploads; sort targets hold done files.
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".") and (here / d).resolve() not in self.exclude
            )
            for name in sorted(files):
                if not name.startswith(".") and self._match(name):
                    yield here / name

    def scan(self, done: set[str]) -> tuple[list[FileKey], int]:
        """(files ready to score, number still settling), files in ``done`` left out."""
        now_mono, now_wall = time.monotonic(), time.time()
        seen: dict[str, tuple[FileKey, float]] = {}
        ready, settling = [], 0
        for path in self._walk():
            try:
                key = FileKey.of(self.root, path)
            except OSError:
                continue  # removed between listing and stat
            if key.key in done:
                continue
            previous = self._seen.get(key.rel)
            if previous is not None and previous[0] == key:
                since = previous[1]
            else:
                quiet_for = max(0.0, now_wall - key.mtime_ns / 1e9)
                since = now_mono - min(quiet_for, self.settle_s)
            seen[key.rel] = (key, since)
            if now_mono - since >= self.settle_s:
                ready.append(key)
            else:
                settling += 1
        self._seen = seen
        return ready, settling


class Watcher:
    """Scores a folder's arriving images with one loaded detector."""

    def __init__(
        self,
        detector: Detector,
        options: WatchOptions,
        *,
        model_fingerprint: str = "",
        prediction_log: Any | None = None,
        log_columns: set[str] | None = None,
        webhook: WebhookSender | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.detector = detector
        self.options = options
        self.root = options.root
        self.fingerprint = model_fingerprint
        self.prediction_log = prediction_log
        self.log_columns = log_columns
        self.webhook = webhook
        self.on_result = on_result
        self.stats = WatchStats()
        state = options.state_dir or self.root / STATE_DIR
        self.state_dir = state
        self.journal = Journal(state / "journal.jsonl")
        self.results = ResultFiles(options.results)
        self.sorter = Sorter(self.root, options.sort_to) if options.sort_to else None
        exclude = [state] + ([options.sort_to] if options.sort_to else [])
        self.scanner = Scanner(self.root, options.patterns, options.settle_s, exclude)
        self._lock_handle: Any = None

    # ------------------------------------------------------------------ lifecycle
    def _take_folder(self) -> None:
        """One watcher per state folder: a second one would score the same files."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.state_dir / "watch.lock", "a+")  # noqa: SIM115 - held while running
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # pragma: no cover - Windows: no guard
            pass
        except OSError:
            handle.close()
            raise DefectscopeError(
                f"{self.root} is already being watched (lock {self.state_dir / 'watch.lock'})"
            ) from None
        self._lock_handle = handle

    def run(self, stop: threading.Event | None = None) -> WatchStats:
        """Watch until ``stop`` is set (or, with ``once``, until every file is scored)."""
        stop = stop or threading.Event()
        started = time.monotonic()
        self._take_folder()
        try:
            self.results.open()
            self.journal.open(self.root)
            self._recover()
            while not stop.is_set():
                ready, settling = self.scanner.scan(self.journal.done)
                for start in range(0, len(ready), self.options.batch_size):
                    self._score(ready[start : start + self.options.batch_size])
                    if stop.is_set():
                        break
                if self.options.once and not ready and not settling:
                    break
                if not ready:
                    stop.wait(self.options.poll_s)
        finally:
            self.results.close()
            if self.webhook is not None:
                self.webhook.close()
                self.stats.webhook = self.webhook.stats()
            self.journal.close()
            if self._lock_handle is not None:
                self._lock_handle.close()
            self.stats.seconds = time.monotonic() - started
        return self.stats

    def _recover(self) -> None:
        """Finish what a killed run claimed: from its result line, or leave it to be scored."""
        unfinished = self.journal.unfinished()
        if not unfinished:
            return
        rows = self.results.rows_present({k.key for k in unfinished})
        finished, outcomes = [], []
        for key in unfinished:
            row = rows.get(key.key)
            if row is None:
                if not key.still_there(self.root):
                    finished.append(key)
                    outcomes.append("gone")  # removed or rewritten: a new key if it is back
                continue  # still there without a result line: the scan scores it again
            if self.sorter is not None and key.still_there(self.root) and row.get("sorted_to"):
                self._move(key, row["sorted_to"], row.get("error") or None)
            finished.append(key)
            outcomes.append("recovered")
            self.stats.recovered += 1
        if finished:
            self.journal.finish(finished, outcomes)

    # ------------------------------------------------------------------ one batch
    def _score(self, keys: list[FileKey]) -> None:
        self.journal.claim(keys)
        inputs: list[tuple[FileKey, bytes]] = []
        read_errors: dict[str, str] = {}
        for key in keys:
            try:
                data = (self.root / key.rel).read_bytes()
            except OSError as exc:
                if not (self.root / key.rel).exists():
                    self.journal.finish([key], ["gone"])
                    continue
                read_errors[key.key] = f"cannot read: {exc.strerror or exc}"
                data = b""
            if len(data) != key.size and key.key not in read_errors:
                self.journal.finish([key], ["changed"])  # written again: a new key, rescanned
                continue
            inputs.append((key, data))
        if not inputs:
            return
        rows, records = self._predict(inputs, read_errors)
        self.results.write(rows)  # the record of truth: before anything else happens
        self._log(records)
        for (key, _), row in zip(inputs, rows, strict=True):
            if row["sorted_to"]:
                self._move(key, row["sorted_to"], row["error"])
            if self.webhook is not None and (
                row["is_anomalous"] or not self.options.only_anomalies
            ):
                self.webhook.submit(row)
            if self.on_result is not None:
                self.on_result(row)
        outcomes = ["error" if row["error"] else "scored" for row in rows]
        self.journal.finish([key for key, _ in inputs], outcomes)
        self.stats.batches += 1

    def _move(self, key: FileKey, destination: str, reason: str | None) -> None:
        """Sort one file; a move that fails (permissions, disk) is logged and journaled, and
        the file stays where it is, already done."""
        if self.sorter is None:
            return
        try:
            self.sorter.move(key.rel, Path(destination), reason)
        except OSError as exc:
            log.warning("%s: not moved to %s: %s", key.rel, destination, exc)
            self.journal.note("move_failed", key.key, reason=str(exc))

    def _predict(
        self, inputs: list[tuple[FileKey, bytes]], read_errors: dict[str, str]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Score the batch: a result row per file, and prediction-log records for the scored."""
        readable = [(i, data) for i, (key, data) in enumerate(inputs) if key.key not in read_errors]
        outcomes: dict[int, Any] = {}
        if readable:
            predicted = self.detector.iter_predict(
                [data for _, data in readable], batch_size=len(readable)
            )
            for (position, _), (_, _, result) in zip(readable, predicted, strict=True):
                outcomes[position] = result
        rows, records = [], []
        now = datetime.now(UTC)
        for position, (key, data) in enumerate(inputs):
            outcome = outcomes.get(position)
            row: dict[str, Any] = {
                "time": now.isoformat(timespec="milliseconds"),
                "path": key.rel,
                "key": key.key,
                "score": None,
                "normalized_score": None,
                "is_anomalous": None,
                "threshold": None,
                "model": self.options.model,
                "model_version": self.options.model_version,
                "model_fingerprint": self.fingerprint,
                "sorted_to": None,
                "error": None,
            }
            if outcome is None or isinstance(outcome, Exception):
                row["error"] = read_errors.get(key.key) or str(outcome) or "unreadable image"
                self.stats.errors += 1
                category = ERROR
            else:
                row.update(
                    score=outcome.score,
                    normalized_score=outcome.normalized_score,
                    is_anomalous=bool(outcome.is_anomalous),
                    threshold=outcome.threshold,
                )
                self.stats.scored += 1
                self.stats.anomalous += int(outcome.is_anomalous)
                category = NG if outcome.is_anomalous else OK
                records.append(self._record(now, key, data, outcome))
            if self.sorter is not None:
                row["sorted_to"] = str(self.sorter.plan(key.rel, category))
            rows.append(row)
        return rows, records

    def _record(self, now: datetime, key: FileKey, data: bytes, outcome: Any) -> dict[str, Any]:
        height, width = outcome.anomaly_map.shape[:2]
        return {
            "created_at": now,
            "route": "watch",
            "request_id": hashlib.sha1(key.key.encode()).hexdigest(),
            "model_fingerprint": self.fingerprint,
            "image_sha256": hashlib.sha256(data).hexdigest(),
            "width": int(width),
            "height": int(height),
            "score": float(outcome.score),
            "normalized_score": float(outcome.normalized_score),
            "is_anomalous": bool(outcome.is_anomalous),
            "threshold": float(outcome.threshold),
            "latency_ms": float(outcome.timings.get("model_ms", 0.0)),
            # As the REST API logs it: the registry version that scored, else the fingerprint.
            "model_version": self.options.model
            if self.options.model_version is not None
            else self.fingerprint,
        }

    def _log(self, records: list[dict[str, Any]]) -> None:
        """Prediction log rows; a database that fails is logged and counted, never a stop."""
        if self.prediction_log is None or not records:
            return
        # Columns a log database of another version lacks are left out, not an error.
        if self.log_columns is not None:
            known = self.log_columns
            records = [{k: v for k, v in record.items() if k in known} for record in records]
        try:
            self.prediction_log.add_many(records)
        except Exception as exc:
            self.stats.log_failures += len(records)
            log.warning("prediction log: %d rows not written: %s", len(records), exc)
