"""Optional MLflow experiment tracking for `fit`, `evaluate` and experiment sweeps.

`open_tracker(enabled=False)` gives a tracker whose runs do nothing, so callers never branch on
whether tracking is on. With tracking on, every run records the flattened configuration as
params, fit timings, bank size and evaluation metrics as metrics, the model folder and the
report files as artefacts, and tags (package version, backbone, dataset, git commit).

Failure policy: `open_tracker` contacts the store before any work and raises `TrackingError`
(the CLI's one-line error, exit status 2) when MLflow is missing, the URI is bad or the store
cannot be reached, so nothing expensive is computed for a run the user asked to track and that
would go unrecorded. Every failure after that (starting a run, logging metrics or artefacts)
only logs a warning naming what was not recorded: the model and report are written to disk
first, and a fit result is never thrown away because a tracking server went down.

The default store is ``sqlite:///mlflow.db`` in the current directory (MLflow 3's own default;
its file store ``./mlruns`` is deprecated and refuses to open unless opted in), with artefacts
in ``mlruns/`` next to the database file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError
from defectscope.version import __version__

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "defectscope"
# MLflow's own limits (log_batch accepts at most 100 params; values up to 6000 characters).
_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000
_METRICS_PER_BATCH = 1000
_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-. /]")


class TrackingError(DefectscopeError):
    """The tracking store cannot be used (mlflow missing, bad URI, store unreachable)."""


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else the local SQLite store in the current folder."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def open_tracker(
    enabled: bool, uri: str | None = None, experiment: str | None = None
) -> NullTracker:
    """The tracker the CLI flags ask for: ``--mlflow``, ``--mlflow-uri``, ``--mlflow-experiment``.

    A URI alone enables tracking; ``$MLFLOW_TRACKING_URI`` only chooses the store, it never turns
    tracking on by itself (a variable set for another tool should not start logging runs).
    """
    if not enabled and uri is None:
        return NullTracker()
    return MlflowTracker(resolve_tracking_uri(uri), experiment or DEFAULT_EXPERIMENT)


class NullRun:
    """A run that records nothing: what callers get when tracking is off."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record configuration values (nested mappings are flattened to dotted keys)."""

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Record numeric values; None, NaN and non-numbers are skipped."""

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or a folder into the run's artefacts."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Attach string tags to the run."""


class NullTracker:
    """A tracker that records nothing."""

    enabled = False
    uri: str | None = None

    @contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        parent: NullRun | None = None,
        started: float | None = None,
    ) -> Iterator[NullRun]:
        """A run for the duration of the block.

        ``parent`` nests it (one run per sweep point under the sweep's run); ``started`` (a
        ``time.time()``) backdates it, so that a run opened after the work, to record it, spans
        the work. An exception leaving the block marks the run FAILED.
        """
        yield NullRun()


class MlflowRun(NullRun):
    """One MLflow run; logging failures become warnings (see the module's failure policy)."""

    run_id: str

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.failures: list[str] = []

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, _param_value(value)) for key, value in flatten(params).items() if key]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self._guard(
                "params",
                lambda s=start: self.client.log_batch(
                    self.run_id, params=items[s : s + _PARAMS_PER_BATCH]
                ),
            )

    def log_metrics(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [
            Metric(_safe_key(prefix + key), float(value), stamp, 0)
            for key, value in flatten(metrics).items()
            if _is_number(value)
        ]
        for start in range(0, len(items), _METRICS_PER_BATCH):
            self._guard(
                "metrics",
                lambda s=start: self.client.log_batch(
                    self.run_id, metrics=items[s : s + _METRICS_PER_BATCH]
                ),
            )

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._guard(
                f"artefacts {path}",
                lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path),
            )
        elif path.is_file():
            self._guard(
                f"artefact {path}",
                lambda: self.client.log_artifact(self.run_id, str(path), artifact_path),
            )
        else:
            self._warn(f"artefact {path}", FileNotFoundError(f"{path} does not exist"))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(_safe_key(k), str(v)) for k, v in tags.items() if v is not None]
        self._guard("tags", lambda: self.client.log_batch(self.run_id, tags=items))

    def _guard(self, what: str, call: Any) -> None:
        try:
            call()
        except Exception as exc:  # MLflow raises many types (REST, SQL, OS errors)
            self._warn(what, exc)

    def _warn(self, what: str, exc: BaseException) -> None:
        self.failures.append(what)
        logger.warning(
            "MLflow run %s: could not log %s (%s); results on disk are unaffected",
            self.run_id,
            what,
            _first_line(exc),
        )


class MlflowTracker(NullTracker):
    """Runs in one MLflow experiment; opening it checks that the store answers."""

    enabled = True
    uri: str

    def __init__(self, uri: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise TrackingError(
                "experiment tracking needs MLflow: pip install 'defectscope[tracking]'"
            ) from None
        self.uri = uri
        self.experiment = experiment
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter
        try:
            with _fail_fast_http():
                self.client = MlflowClient(tracking_uri=uri)
                self.experiment_id = self._experiment_id(experiment)
        except Exception as exc:  # bad scheme, unreachable server, unwritable database...
            raise TrackingError(
                f"cannot use the MLflow tracking store {uri}: {_store_reason(exc)}"
            ) from None

    def _experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        artifacts = _local_artifact_root(self.uri)
        return str(
            self.client.create_experiment(
                name, artifact_location=artifacts.as_uri() if artifacts else None
            )
        )

    @contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        parent: NullRun | None = None,
        started: float | None = None,
    ) -> Iterator[NullRun]:
        all_tags = {**default_tags(), **(tags or {})}
        if parent is not None and parent.run_id:
            all_tags["mlflow.parentRunId"] = parent.run_id
        try:
            created = self.client.create_run(
                self.experiment_id,
                start_time=None if started is None else int(started * 1000),
                run_name=name,
                tags={_safe_key(k): str(v) for k, v in all_tags.items() if v is not None},
            )
        except Exception as exc:  # the store answered at open; a hiccup now must not stop work
            logger.warning(
                "MLflow: could not start run %r in %s (%s); it is not tracked",
                name,
                self.uri,
                _first_line(exc),
            )
            yield NullRun()
            return
        run = MlflowRun(self.client, created.info.run_id)
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            try:
                self.client.set_terminated(run.run_id, status=status)
            except Exception as exc:
                run._warn("the run's end", exc)
            if run.failures:
                logger.warning(
                    "MLflow run %s in %s is incomplete: %s not logged",
                    run.run_id,
                    self.uri,
                    ", ".join(run.failures),
                )


def sweep_run(
    tracker: NullTracker, n_runs: int, name: str, tags: Mapping[str, Any] | None = None
) -> AbstractContextManager[NullRun]:
    """The parent run of a sweep, under which each point's run nests; no parent for one run."""
    if n_runs <= 1:
        return nullcontext(NullRun())
    return tracker.run(name, {"defectscope.sweep_size": n_runs, **(tags or {})})


# ----------------------------------------------------------------- what each command records
def log_fit(
    run: NullRun,
    detector: Any,
    model_path: str | Path,
    config: Mapping[str, Any] | None = None,
) -> None:
    """Config as params; fit timings, bank and calibration as metrics; the model as artefact.

    ``model_path`` is what the command was told to write (a folder or a file); a remote
    (s3:// or gs://) model is recorded as a tag instead of being copied into the store.
    """
    info = detector.info
    run.log_params(config if config is not None else {"detector": detector.config.to_dict()})
    run.set_tags(
        {
            "defectscope.backbone": detector.config.backbone.name,
            "defectscope.model": str(model_path),
        }
    )
    training = info.training
    run.log_metrics({f"fit_{key}": value for key, value in info.timings.items()})
    run.log_metrics(
        {
            "bank_size": info.bank_size,
            "n_train_images": training.n_images,
            "n_train_patches": training.n_patches,
            "n_skipped_images": len(training.skipped),
            "threshold": detector.threshold,
            "pixel_threshold": detector.pixel_threshold,
        }
    )
    local = Path(model_path) if not _is_remote(model_path) else None
    if local is not None:
        run.log_artifacts(local, "model")


def log_evaluation(
    run: NullRun,
    result: Mapping[str, Any],
    report_dir: str | Path,
    detector: Any = None,
    params: Mapping[str, Any] | None = None,
) -> None:
    """The metrics of ``metrics.json`` (same keys and values), per-defect metrics, counts and
    timings, and the report files as the ``report`` artefact folder.

    ``detector`` (when the run has no fit of its own) adds the model's config as params and its
    backbone as a tag; ``params`` adds the evaluation's own settings.
    """
    config = getattr(detector, "config", None)
    if config is not None:
        run.log_params({"detector": config.to_dict()})
        run.set_tags({"defectscope.backbone": config.backbone.name})
    if params:
        run.log_params(params)
    run.log_metrics(result.get("metrics", {}))
    for defect, row in (result.get("per_defect") or {}).items():
        run.log_metrics(
            {key: value for key, value in row.items() if key != "defect_type"},
            prefix=f"defect/{defect}/",
        )
    run.log_metrics(result.get("counts") or {}, prefix="count/")
    run.log_metrics(result.get("timings") or {}, prefix="eval_time/")
    if not _is_remote(report_dir):
        run.log_artifacts(report_dir, "report")


def default_tags() -> dict[str, str | None]:
    """Tags every run gets: the package version and, in a git checkout, the source commit."""
    commit = git_commit()
    return {
        "defectscope.version": __version__,
        "defectscope.git_commit": commit,
        "mlflow.source.git.commit": commit,
    }


def git_commit() -> str | None:
    """The commit of the defectscope source tree, or None outside a git checkout."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values (one param, not one per item)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[: _MAX_PARAM_CHARS - 3] + "..."


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def _is_remote(path: str | Path) -> bool:
    return "://" in str(path)


def _safe_key(key: str) -> str:
    # MLflow accepts letters, digits, _ - . space and /; a defect folder could hold anything.
    return _UNSAFE_KEY_CHARS.sub("_", key)


def _local_artifact_root(uri: str) -> Path | None:
    """For a SQLite store, ``mlruns/`` beside the database (MLflow would use the cwd's)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = uri.removeprefix("sqlite:///")
    if database in ("", ":memory:"):
        return None
    return (Path(database).expanduser().resolve().parent / "mlruns").resolve()


@contextmanager
def _fail_fast_http() -> Iterator[None]:
    # MLflow retries an unreachable server for about four minutes by default; the first
    # contact only checks that the store answers, so fail within seconds (a user's own
    # settings win).
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    added = [key for key in defaults if key not in os.environ]
    os.environ.update({key: defaults[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _store_reason(exc: BaseException) -> str:
    # MLflow wraps a refused connection in several layers of urllib3 text; the OS error at the
    # bottom is the part a user can act on.
    text = _first_line(exc)
    refused = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if refused and "Max retries exceeded" in text:
        return f"cannot connect ({refused.group(1).strip()}); is the server running?"
    return text if len(text) <= 300 else text[:297] + "..."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
