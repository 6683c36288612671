"""On the line: `defectscope watch`, scoring images as they arrive in a folder."""

from __future__ import annotations

import hashlib
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from defectscope.cli.console import console, out
from defectscope.cli.options import DeviceOpt, RuntimeOpt

RegistryOpt = Annotated[
    str | None,
    typer.Option(
        "--registry",
        envvar="DEFECTSCOPE_REGISTRY",
        help="Model registry: a folder (default ~/.defectscope/registry) or mlflow:TRACKING_URI.",
    ),
]


def model_fingerprint(path: Path | str, detector: Any) -> str:
    """The model file's sha256 (16 hex digits), as the REST API reports it; the training
    fingerprint when the file cannot be read."""
    from defectscope.detector.model_file import resolve_model_path

    try:
        target = Path(path)
        file = target if target.is_file() else resolve_model_path(target)
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    except Exception:
        return str(detector.info.training.fingerprint)[:16]


def watch(
    folder: Annotated[Path, typer.Argument(help="Folder to watch (searched recursively).")],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="Model folder or file, or a registry reference NAME@VERSION, "
            "NAME@STAGE (e.g. bottle@production) or NAME@latest.",
        ),
    ],
    results: Annotated[
        list[Path] | None,
        typer.Option(
            "--results",
            help="Result file to append to, .jsonl or .csv; repeat for both "
            "[default: FOLDER/.defectscope-watch/results.jsonl].",
        ),
    ] = None,
    sort_to: Annotated[
        Path | None,
        typer.Option(help="Move each scored file to ok/, ng/ or error/ under this folder."),
    ] = None,
    once: Annotated[
        bool, typer.Option(help="Score the files there now (once settled), then exit.")
    ] = False,
    poll: Annotated[float, typer.Option(help="Seconds between scans of the folder.")] = 0.5,
    settle: Annotated[
        float,
        typer.Option(help="A file is read once its size and mtime are unchanged this long (s)."),
    ] = 1.0,
    pattern: Annotated[
        list[str] | None,
        typer.Option(help="File-name glob to score; repeat for several [default: images]."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="At most this many files per batch.")] = 16,
    webhook: Annotated[
        str | None, typer.Option(help="POST each result as JSON to this URL (with retries).")
    ] = None,
    only_anomalies: Annotated[
        bool, typer.Option(help="With --webhook: post only anomalous results.")
    ] = False,
    webhook_retries: Annotated[int, typer.Option(help="Retries of a failed post.")] = 4,
    log_url: Annotated[
        str | None,
        typer.Option(help="Also write each prediction to this log database (SQLAlchemy URL)."),
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(help="Journal folder [default: FOLDER/.defectscope-watch]."),
    ] = None,
    registry: RegistryOpt = None,
    runtime: RuntimeOpt = "auto",
    device: DeviceOpt = None,
) -> None:
    """Score images as they arrive in FOLDER, each exactly once, even across restarts.

    Results go to JSONL/CSV files, optionally to the prediction log database and a webhook;
    --sort-to moves each file to ok/, ng/ or error/. Stops on Ctrl-C or SIGTERM after the
    current batch.
    """
    from defectscope.errors import ConfigError
    from defectscope.export.runtimes import load_detector
    from defectscope.line.hooks import WebhookSender, check_webhook_url
    from defectscope.line.results import result_format
    from defectscope.line.watcher import (
        DEFAULT_PATTERNS,
        STATE_DIR,
        Watcher,
        WatchOptions,
        check_patterns,
    )
    from defectscope.registry import resolve_model_ref

    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise ConfigError(f"{folder}: {what}")
    if poll <= 0 or settle < 0 or batch_size < 1 or webhook_retries < 0:
        raise ConfigError("--poll must be > 0, --settle >= 0, --batch-size >= 1, retries >= 0")
    patterns = check_patterns(pattern or DEFAULT_PATTERNS)
    result_paths = list(results or [(state or folder / STATE_DIR) / "results.jsonl"])
    for path in result_paths:
        result_format(path)
    if sort_to is not None and sort_to.exists() and not sort_to.is_dir():
        raise ConfigError(f"--sort-to {sort_to}: a file, not a folder")
    if webhook is not None:
        check_webhook_url(webhook)
    prediction_log = open_prediction_log(log_url) if log_url else None

    model_path, found = resolve_model_ref(model, registry)
    detector = load_detector(model_path, runtime, device)
    options = WatchOptions(
        root=folder.resolve(),
        results=result_paths,
        patterns=patterns,
        settle_s=settle,
        poll_s=poll,
        batch_size=batch_size,
        once=once,
        sort_to=sort_to.resolve() if sort_to else None,
        state_dir=state.resolve() if state else None,
        only_anomalies=only_anomalies,
        model=found.ref if found else model,
        model_version=found.version if found else None,
    )
    watcher = Watcher(
        detector,
        options,
        model_fingerprint=model_fingerprint(model_path, detector),
        prediction_log=prediction_log,
        log_columns=log_columns() if prediction_log is not None else None,
        on_result=print_result,
    )
    if webhook is not None:
        watcher.webhook = WebhookSender(
            webhook,
            retries=webhook_retries,
            on_failure=lambda row, why: watcher.journal.note(
                "webhook_failed", row["key"], reason=why
            ),
        )
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum: int, _frame: Any) -> None:
        console.print(f"{signal.Signals(signum).name}: stopping after the current batch")
        stop.set()

    for sig in previous:
        signal.signal(sig, request_stop)
    console.print(f"Watching {options.root} with {options.model} (results: {result_paths[0]})")
    try:
        stats = watcher.run(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    hook = stats.webhook
    console.print(
        f"{stats.scored} scored ({stats.anomalous} anomalous), {stats.errors} unreadable, "
        f"{stats.recovered} recovered from an earlier run in {stats.seconds:.1f} s"
        + (f"; webhook: {hook['sent']} sent, {hook['failed']} failed" if hook else "")
        + (f"; {stats.log_failures} not logged" if stats.log_failures else "")
    )


def open_prediction_log(url: str) -> Any:
    """The prediction log at ``url``; a URL SQLAlchemy cannot use is a one-line error."""
    from defectscope.errors import ConfigError

    try:
        from defectscope.serving.predictions_log import PredictionLogRepository

        return PredictionLogRepository(url)
    except ImportError as exc:
        raise ConfigError(f"--log-url needs the serve extra ({exc.name} is missing)") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--log-url {url}: {first}") from None


def log_columns() -> set[str]:
    """The prediction log's columns: the watcher leaves out what this version lacks."""
    from defectscope.serving.predictions_log import PredictionRecord

    return set(PredictionRecord.__table__.columns.keys())


def print_result(row: dict[str, Any]) -> None:
    if row["error"]:
        out.print(f"error  {row['path']}: {row['error']}", highlight=False, markup=False)
        return
    label = "ng" if row["is_anomalous"] else "ok"
    out.print(f"{label:5}  {row['score']:.4f}  {row['path']}", highlight=False, markup=False)
