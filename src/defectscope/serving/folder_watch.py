"""A folder the server watches itself (``serve --watch DIR``): the line's watcher
(`defectscope.line.watcher`: settle time, journal, results, sorting) in a background thread.

Each batch is scored by the detector the server serves at that moment, so a taught or
promoted version takes over the folder too, and every result names that version. With several
worker processes, the first to take the folder's lock watches it; the others leave it.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from defectscope.errors import DefectscopeError
from defectscope.line.watcher import STATE_DIR, Watcher, WatchOptions

if TYPE_CHECKING:
    from defectscope.serving.state import ServingState

log = logging.getLogger(__name__)


class ServedWatcher(Watcher):
    """A watcher that scores every batch with the server's current detector and version."""

    def __init__(self, state: ServingState, options: WatchOptions, **kwargs: Any) -> None:
        super().__init__(state.ready_detector(), options, **kwargs)
        self.state = state

    def _predict(self, inputs: Any, read_errors: Any) -> Any:
        served = self.state.served()
        self.detector = served.detector
        self.fingerprint = served.log_version
        return super()._predict(inputs, read_errors)


class FolderWatch:
    """Starts the watcher once the model is ready; stops it with the server."""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="defectscope-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _options(self) -> WatchOptions:
        settings = self.state.settings
        root = settings.watch_dir
        assert root is not None  # only started with a folder
        root = root.resolve()
        return WatchOptions(
            root=root,
            results=[settings.watch_results or root / STATE_DIR / "results.jsonl"],
            settle_s=settings.watch_settle_s,
            poll_s=settings.watch_poll_s,
            sort_to=settings.watch_sort_to,
            model=str(settings.model_ref or settings.model_path or ""),
        )

    def _run(self) -> None:
        while not self.state.ready and not self.stopping.wait(0.5):
            pass
        if self.stopping.is_set():
            return
        repository = self.state.repository
        try:
            columns = None
            if repository is not None:
                from defectscope.serving.predictions_log import PredictionRecord

                columns = set(PredictionRecord.__table__.columns.keys())
            watcher = ServedWatcher(
                self.state, self._options(), prediction_log=repository, log_columns=columns
            )
            stats = watcher.run(self.stopping)
        except DefectscopeError as exc:
            log.warning("folder watch off: %s", exc)
        except Exception:
            log.exception("folder watch stopped")
        else:
            log.info("folder watch stopped: %s", stats)
