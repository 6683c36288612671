"""The webhook: each result posted as JSON to a URL, from a thread, with retries and backoff.

Scoring never waits on the receiver: results go into a bounded queue that one thread drains.
A full queue drops the result (counted and reported to ``on_failure``) instead of blocking; a
post that fails is retried on connection errors, timeouts, 408, 429 and 5xx with exponential
backoff, and after the last attempt it is counted, logged and reported to ``on_failure``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from defectscope.errors import ConfigError

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_STOP = object()


def check_webhook_url(url: str) -> str:
    """Refuse what cannot be a webhook URL before the watcher starts."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"--webhook {url!r}: give an http:// or https:// URL")
    return url


class WebhookSender:
    """Posts JSON payloads to ``url`` from a background thread."""

    def __init__(
        self,
        url: str,
        *,
        on_failure: Callable[[dict[str, Any], str], None] | None = None,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        timeout_s: float = 5.0,
        queue_size: int = 1000,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.url = check_webhook_url(url)
        self.on_failure = on_failure
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self._client = httpx.Client(timeout=timeout_s, headers=headers)
        self._thread = threading.Thread(target=self._run, name="defectscope-webhook", daemon=True)
        self._thread.start()

    def submit(self, payload: dict[str, Any]) -> None:
        """Queue ``payload``; when the queue is full it is dropped, never waited for."""
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            self._failed(payload, "webhook queue full: the receiver is too slow or down")

    def _failed(self, payload: dict[str, Any], reason: str) -> None:
        log.warning("webhook %s: %s (%s)", self.url, reason, payload.get("path"))
        if self.on_failure is not None:
            try:
                self.on_failure(payload, reason)
            except Exception:  # the hook must never stop the thread
                log.exception("webhook failure handler failed")

    def _run(self) -> None:
        while True:
            payload = self._queue.get()
            if payload is _STOP:
                return
            reason = self._post(payload)
            if reason is None:
                self.sent += 1
            else:
                self.failed += 1
                self._failed(payload, reason)

    def _post(self, payload: dict[str, Any]) -> str | None:
        """Post with retries; None when delivered, else why not."""
        reason = "not attempted"
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
                # Closing: stop waiting between attempts, so stop stays quick.
                if self._closing.wait(delay):
                    return f"{reason}; gave up at shutdown"
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code < 300:
                return None
            reason = f"HTTP {response.status_code}"
            if response.status_code not in RETRY_STATUS:
                return reason
        return f"{reason} after {self.retries + 1} attempts"

    def close(self, drain_s: float = 10.0) -> None:
        """Send what is queued within ``drain_s`` seconds, then stop the thread."""
        deadline = time.monotonic() + drain_s
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.1, drain_s))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._closing.set()
            self._thread.join(self.max_backoff_s + 5)
        left = 0
        while True:
            try:
                payload = self._queue.get_nowait()
            except queue.Empty:
                break
            if payload is not _STOP:
                left += 1
                self._failed(payload, "not sent before the watcher stopped")
        self.failed += left
        self._client.close()

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped}
