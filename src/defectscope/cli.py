"""The `defectscope` command line: a thin adapter over `Detector` and the evaluation runner."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from defectscope import __version__

app = typer.Typer(
    name="defectscope",
    help="Visual anomaly detection for industrial inspection: learn good, find defects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

STAGE_LABELS = {
    "auto": "Choosing configuration",
    "features": "Extracting features",
    "coreset": "Selecting coreset",
    "calibration": "Calibrating thresholds",
    "predict": "Predicting",
    "evaluate": "Evaluating",
    "study": "Drift study",
}

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra-style overrides, e.g. detector.coreset.ratio=0.05 backbone=efficientnet_lite1"
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Experiment YAML (default: packaged configs).")
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
RuntimeOpt = Annotated[
    str,
    typer.Option(
        help="auto (from MODEL's suffix: .onnx, .xml, else torch), torch (MODEL is a model "
        "folder), onnx or openvino (MODEL is an exported file, or a folder holding model.onnx / "
        "model.xml)."
    ),
]
EngineOpt = Annotated[
    str, typer.Option(help='local (this process) or ray (a Ray cluster; the "ray" extra).')
]
RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        envvar="RAY_ADDRESS",
        help="With --engine ray: unset starts a local cluster; 'auto' joins the one started here "
        "by 'ray start --head'; host:6379 or ray://host:10001 a remote one.",
    ),
]
RayWorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", help="With --engine ray: Ray workers (default: one per CPU)."),
]
MlflowOpt = Annotated[
    bool,
    typer.Option(
        "--mlflow",
        help='Track the run in MLflow (the "tracking" extra): $MLFLOW_TRACKING_URI, else '
        "sqlite:///mlflow.db in the current folder.",
    ),
]
MlflowUriOpt = Annotated[
    str | None, typer.Option("--mlflow-uri", help="MLflow tracking URI (implies --mlflow).")
]
MlflowExperimentOpt = Annotated[
    str | None,
    typer.Option("--mlflow-experiment", help="MLflow experiment name [default: defectscope]."),
]


@contextmanager
def progress_bars() -> Iterator[Callable[[str, int, int], None]]:
    """A progress(stage, done, total) callback drawing one bar per stage."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and "CI" in os.environ,
    ) as bars:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(STAGE_LABELS.get(stage, stage), total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update


def _compose(config: Path | None, overrides: list[str] | None, device: str | None):
    from defectscope.experiment import compose

    experiment = compose(config, overrides or [])
    if device is not None:
        experiment.detector.device = device
    return experiment


# Outputs derived from a model; after a new fit in their place they would describe the old one.
STALE_MODEL_OUTPUTS = ("report", "model.onnx", "model.xml", "model.bin")


def _check_output_folder(out: Path | str, option: str = "--out") -> None:
    """A local output folder must be a folder or not exist yet: refused before any work."""
    from defectscope import storage
    from defectscope.errors import DefectscopeError

    path = storage.location(out)
    if not isinstance(path, Path):
        return
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == path else f" (inside {candidate}, a file)"
                raise DefectscopeError(f"{option} {out}: not a folder{where}")
            return


def _model_destination(out: Path, overwrite: bool) -> Path | str | None:
    """Check fit's --out before the fit: refuse a file in the way, or an existing model unless
    ``overwrite``. Returns the folder whose stale outputs go once the new model is saved."""
    from defectscope import storage
    from defectscope.detector.model_file import MODEL_FILENAME
    from defectscope.errors import DefectscopeError

    target = storage.location(out)
    named = str(target).endswith(".safetensors")
    folder: Path | str
    model_file: Path | str
    if isinstance(target, Path):
        folder = target.parent if named else target
        _check_output_folder(folder)
        if named and target.is_dir():
            raise DefectscopeError(f"--out {out}: a folder, not a .safetensors file")
        model_file = target if named else target / MODEL_FILENAME
    else:
        folder = target.rsplit("/", 1)[0] if named else target.rstrip("/")
        model_file = target if named else f"{folder}/{MODEL_FILENAME}"
    if not storage.exists(model_file):
        return None
    if not overwrite:
        raise DefectscopeError(
            f"{model_file} already exists; pass --overwrite to replace it (its report/ and "
            "exported model files are then removed)"
        )
    # Exports and report/ belong to model.safetensors; another file name shares the folder.
    return folder if str(model_file).endswith(f"/{MODEL_FILENAME}") else None


def _remove_stale_outputs(folder: Path | str) -> None:
    from defectscope import storage

    removed = []
    for name in STALE_MODEL_OUTPUTS:
        item = folder / name if isinstance(folder, Path) else f"{folder}/{name}"
        if storage.exists(item):
            storage.remove(item)
            removed.append(name)
    if removed:
        console.print(f"Removed the replaced model's {', '.join(removed)} from {folder}")


# ---------------------------------------------------------------------------------- commands
@app.command()
def fit(
    data: Annotated[
        Path, typer.Argument(help="Dataset root, folder of good images, or one image.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Model folder to write.")],
    overrides: Overrides = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    skip_bad: Annotated[
        bool, typer.Option(help="Skip unreadable images instead of stopping.")
    ] = False,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: RayWorkersOpt = None,
    mlflow: MlflowOpt = False,
    mlflow_uri: MlflowUriOpt = None,
    mlflow_experiment: MlflowExperimentOpt = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace an existing model (its report/ and exports are removed)."),
    ] = False,
    auto: Annotated[
        bool | None,
        typer.Option(
            "--auto/--no-auto",
            help="Choose the feature configuration from synthetic defects on held-out good "
            "images (default: on, unless the config sets detector.auto.enabled).",
        ),
    ] = None,
) -> None:
    """Learn what good looks like from the good training images of DATA.

    DATA and --out may be s3:// or gs:// URIs (the "cloud" extra).
    """
    from defectscope import storage
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.distributed.cluster import check_engine
    from defectscope.tracking import log_fit, open_tracker

    check_engine(engine, ray_address)
    experiment = _compose(config, overrides, device)
    if auto is not None:
        experiment.detector.auto.enabled = auto
    storage.check_destination(out_dir)  # a missing bucket fails now, not after the fit
    stale_folder = _model_destination(out_dir, overwrite)  # likewise an existing model
    tracker = open_tracker(mlflow, mlflow_uri, mlflow_experiment)  # unreachable: fails now
    started = time.time()
    data_uri = storage.location(data)
    dataset = open_dataset(storage.localize(data_uri))
    paths = [sample.path for sample in dataset.train]
    console.print(f"Fitting on {len(paths)} good images from {data_uri} ({dataset.layout} layout)")
    detector = Detector(experiment.detector)
    with progress_bars() as progress:
        on_error = "skip" if skip_bad else "raise"
        if engine == "ray":
            from defectscope.distributed.fit import fit_on_cluster

            detector = fit_on_cluster(
                experiment.detector,
                paths,
                address=ray_address,
                workers=workers,
                on_error=on_error,
                progress=progress,
            )
        else:
            detector.fit(paths, on_error=on_error, progress=progress)
    path = detector.save(out_dir)
    if stale_folder is not None:
        _remove_stale_outputs(stale_folder)
    _print_fit_summary(detector, path)
    tags = {"defectscope.command": "fit", "defectscope.dataset": str(data_uri)}
    with tracker.run(Path(str(out_dir)).name, tags, started=started) as run:
        log_fit(run, detector, storage.location(out_dir), config=experiment.raw)


def _print_fit_summary(detector, path: Path | str) -> None:
    info = detector.info
    timings = info["timings"]
    table = Table(title="Model", show_header=False)
    table.add_row("file", str(path))
    table.add_row("backbone", detector.features.backbone.name)
    table.add_row(
        "memory bank", f"{info['bank_size']:,} of {info['training']['n_patches']:,} patches"
    )
    table.add_row("threshold", f"{detector.threshold:.4f} (pixel {detector.pixel_threshold:.4f})")
    table.add_row(
        "fit time",
        f"{timings['total_s']:.1f} s ("
        + (f"choosing {timings['selection_s']:.1f}, " if "selection_s" in timings else "")
        + f"features {timings['features_s']:.1f}, coreset {timings['coreset_s']:.1f}, "
        f"calibration {timings['calibration_s']:.1f})",
    )
    selection = info.get("selection") or {}
    if selection:
        table.add_row("configuration", selection["reason"])
        if selection.get("geometry", {}).get("reason"):
            table.add_row("geometry", selection["geometry"]["reason"])
    if info["training"]["skipped"]:
        table.add_row("skipped", f"{len(info['training']['skipped'])} unreadable images")
    out.print(table)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    data: Annotated[Path, typer.Argument(help="Dataset with a labelled test split.")],
    report: Annotated[Path, typer.Option("--report", "-r", help="Report folder.")] = Path(
        "reports"
    ),
    set_threshold: Annotated[
        str,
        typer.Option(help="'none', or 'f1': store the F1-optimal image threshold in the model."),
    ] = "none",
    device: DeviceOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    runtime: RuntimeOpt = "auto",
    mlflow: MlflowOpt = False,
    mlflow_uri: MlflowUriOpt = None,
    mlflow_experiment: MlflowExperimentOpt = None,
) -> None:
    """Score the test split of DATA, compute metrics and write a report.

    MODEL, DATA and --report may be s3:// or gs:// URIs (the "cloud" extra).
    """
    from defectscope import storage
    from defectscope.data.datasets import open_dataset
    from defectscope.errors import DefectscopeError
    from defectscope.evaluation.report import write_report
    from defectscope.evaluation.runner import evaluate as run_evaluation
    from defectscope.tracking import log_evaluation, open_tracker

    if set_threshold not in ("none", "f1"):
        raise DefectscopeError("--set-threshold must be 'none' or 'f1'")
    from defectscope.export.runtimes import load_detector, resolve_runtime

    if set_threshold != "none" and resolve_runtime(model, runtime) != "torch":
        raise DefectscopeError("--set-threshold needs --runtime torch (it rewrites the model)")
    storage.check_destination(report)
    tracker = open_tracker(mlflow, mlflow_uri, mlflow_experiment)  # unreachable: fails now
    started = time.time()
    detector = load_detector(model, runtime, device)
    data_uri = storage.location(data)
    dataset = open_dataset(storage.localize(data_uri))
    if not dataset.test:
        raise DefectscopeError(f"{data_uri}: no labelled test images to evaluate on")
    with progress_bars() as progress:
        result = run_evaluation(
            detector,
            dataset,
            batch_size=batch_size,
            progress=lambda done, total: progress("evaluate", done, total),
        )
    with storage.staged_output(report) as local_report:
        path = write_report(result, local_report)
        tags = {"defectscope.command": "evaluate", "defectscope.dataset": str(data_uri)}
        tags["defectscope.model"] = str(model)
        with tracker.run(f"evaluate {model.name}", tags, started=started) as run:
            settings = {"runtime": runtime, "batch_size": batch_size}
            log_evaluation(run, result.to_dict(), local_report, detector, {"evaluate": settings})
    report_location: Path | str = path
    if storage.is_remote(report):
        relative = Path(path).relative_to(local_report).as_posix()
        report_location = f"{storage.location(report)}/{relative}"
    _print_metrics(result.to_dict())
    out.print(f"Report: {report_location}")
    if set_threshold == "f1":
        metrics = result.to_dict()["metrics"]
        if metrics.get("f1_threshold") is None:
            raise DefectscopeError(
                "no F1-optimal threshold: the test split has no defective images"
            )
        detector.set_thresholds(image=metrics["f1_threshold"], source="f1_validation")
        detector.save(model)
        out.print(f"Stored the F1-optimal threshold {metrics['f1_threshold']:.4f} in {model}")


def _print_metrics(result: dict) -> None:
    metrics = result["metrics"]
    table = Table(title="Metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"):
        if key in metrics and metrics[key] is not None:
            table.add_row(key, f"{metrics[key]:.4f}")
    out.print(table)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "predictions"
    ),
    threshold: Annotated[float | None, typer.Option(help="Override the image threshold.")] = None,
    pixel_threshold: Annotated[
        float | None, typer.Option(help="Override the mask threshold.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch.")] = None,
    device: DeviceOpt = None,
    images: Annotated[bool, typer.Option(help="Write heatmap, overlay and mask PNGs.")] = True,
    skip_bad: Annotated[bool, typer.Option(help="Record unreadable images and go on.")] = True,
    runtime: RuntimeOpt = "auto",
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    workers: RayWorkersOpt = None,
) -> None:
    """Score images: a JSONL and CSV of results, and heatmap / overlay / mask PNGs.

    MODEL, the inputs (files, folders or globs) and --out may be s3:// or gs:// URIs.
    """
    from contextlib import ExitStack

    from defectscope import storage
    from defectscope.data.io import expand_image_paths
    from defectscope.distributed.cluster import check_engine
    from defectscope.errors import DefectscopeError
    from defectscope.export.runtimes import load_detector
    from defectscope.prediction_writer import PredictionWriter

    check_engine(engine, ray_address)
    storage.check_destination(out_dir)
    _check_output_folder(out_dir)
    detector = load_detector(model, runtime, device)
    paths = expand_image_paths([p for src in inputs for p in storage.localize_matches(src)])
    if not paths:
        raise DefectscopeError("no images found in " + ", ".join(str(i) for i in inputs))
    stack = ExitStack()
    local_out = stack.enter_context(storage.staged_output(out_dir))
    writer = PredictionWriter(local_out, paths, detector, write_images=images)
    failures = 0
    with stack, writer, progress_bars() as progress:
        if engine == "ray":
            from defectscope.distributed.predict import predict_on_cluster

            iterator = predict_on_cluster(
                model,
                paths,
                address=ray_address,
                workers=workers,
                batch_size=batch_size,
                runtime=runtime,
                device=device,
                threshold=threshold,
                pixel_threshold=pixel_threshold,
            )
        else:
            iterator = detector.iter_predict(
                paths, threshold=threshold, pixel_threshold=pixel_threshold, batch_size=batch_size
            )
        for done, (index, _, result) in enumerate(iterator, start=1):
            if isinstance(result, Exception):
                if not skip_bad:
                    raise result
                failures += 1
                console.print(f"[yellow]skipped[/] {result}")
            writer.write(index, result)
            progress("predict", done, len(paths))
    flagged = writer.n_anomalous
    results: Path | str = writer.jsonl_path
    if storage.is_remote(out_dir):
        relative = writer.jsonl_path.relative_to(local_out).as_posix()
        results = f"{storage.location(out_dir)}/{relative}"
    out.print(
        f"{len(paths) - failures} images scored, {flagged} anomalous, {failures} unreadable. "
        f"Results: {results}"
    )


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="File to write (default: MODEL/model.onnx or .xml)."),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="onnx or openvino.")] = "onnx",
    precision: Annotated[
        str,
        typer.Option(
            help="fp32; fp16 (weights and memory bank stored in fp16); int8 (OpenVINO only: "
            "backbone quantized with NNCF on --calibration-images)."
        ),
    ] = "fp32",
    calibration_images: Annotated[
        Path | None,
        typer.Option(help="Folder of good images for INT8 calibration (e.g. the training set)."),
    ] = None,
    max_calibration: Annotated[
        int, typer.Option(help="At most this many calibration images.")
    ] = 64,
) -> None:
    """Export the whole detector (backbone, memory bank, thresholds) to one ONNX/OpenVINO file."""
    from defectscope.detector.detector import Detector
    from defectscope.errors import ConfigError
    from defectscope.export.onnx import export_onnx, export_openvino

    if fmt not in ("onnx", "openvino"):
        raise ConfigError(f"--format must be 'onnx' or 'openvino', not {fmt!r}")
    detector = Detector.load(model, device="cpu")
    if out_file is None:
        folder = model if model.is_dir() else model.parent
        out_file = folder / ("model.onnx" if fmt == "onnx" else "model.xml")
    if precision == "int8" and fmt != "openvino":
        raise ConfigError("int8 is available for --format openvino only")
    if fmt == "onnx":
        path = export_onnx(detector, out_file, precision=precision)
    else:
        images = None
        if calibration_images is not None:
            from defectscope.data.io import expand_image_paths

            found = expand_image_paths([calibration_images])
            images = found[:: max(1, len(found) // max_calibration)][:max_calibration]
        path = export_openvino(detector, out_file, precision=precision, calibration_images=images)
        if precision == "int8":
            from defectscope.export.runtime import OpenVinoDetector

            check = OpenVinoDetector.load(path).meta["export"]["int8_check"]
            out.print(
                f"INT8 check on {check['n_images']} calibration images: scores moved "
                f"{100 * check['mean_rel_score_change']:.2f}% on average "
                f"(max {100 * check['max_rel_score_change']:.2f}%), "
                f"{check['decision_flips']} decision flips"
            )
    size = path.stat().st_size + (
        path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0
    )
    assert detector.preprocessor is not None  # Detector.load sets it
    height, width = detector.preprocessor.input_size
    out.print(
        f"Exported {fmt} ({precision}, input batch x 3 x {height} x {width}, "
        f"{size / 1e6:.1f} MB): {path}"
    )


@app.command()
def serve(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="Worker processes (each loads the model).")] = 1,
    runtime: RuntimeOpt = "auto",
    report: Annotated[
        Path | None,
        typer.Option(help="Evaluation report folder for /v1/model/report [default: MODEL/report]."),
    ] = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    replicas: Annotated[
        int, typer.Option(help="With --engine ray: Ray Serve replicas (each loads the model).")
    ] = 1,
) -> None:
    """Serve MODEL over HTTP (REST API, /docs, /metrics); needs the "serve" extra.

    Other settings come from DEFECTSCOPE_* environment variables (see serving/settings.py).
    """
    from defectscope.detector.model_file import resolve_model_path
    from defectscope.distributed.cluster import check_engine
    from defectscope.errors import DefectscopeError
    from defectscope.export.runtimes import localize_model

    check_engine(engine, ray_address)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise DefectscopeError(
            "serving needs extra packages: pip install 'defectscope[serve]'"
        ) from None
    # A remote model is fetched once here into the local cache; the workers load that copy.
    model = localize_model(model, runtime)
    resolve_model_path(model)  # a missing or wrong path fails here, not in every worker
    # Workers are separate processes: they get the settings through the environment and build
    # the app with the factory.
    os.environ["DEFECTSCOPE_MODEL_PATH"] = str(model.resolve())
    os.environ["DEFECTSCOPE_RUNTIME"] = runtime
    if report is not None:
        if not (report / "metrics.json").is_file():
            raise DefectscopeError(f"{report}: no metrics.json (write it with evaluate --report)")
        os.environ["DEFECTSCOPE_REPORT_DIR"] = str(report.resolve())
    if engine == "ray":
        from defectscope.distributed.serve import serve_on_cluster

        # Replicas on other nodes load this same path: it must be on a disk they all share.
        serve_on_cluster(
            model,
            address=ray_address,
            replicas=replicas,
            runtime=runtime,
            host=host,
            port=port,
            on_ready=lambda url: console.print(
                f"Serving {model} on {url} ({replicas} Ray Serve replica(s)); Ctrl+C stops it"
            ),
        )
        return
    metrics_dir = None
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Without a shared folder each worker would report only its own counts on /metrics.
        metrics_dir = tempfile.mkdtemp(prefix="defectscope-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    console.print(f"Serving {model} on http://{host}:{port} ({workers} worker(s))")
    try:
        uvicorn.run(
            "defectscope.serving.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            # Closes connections whose request headers stall (DEFECTSCOPE_READ_TIMEOUT_S).
            http="defectscope.serving.protocol:HeaderTimeoutProtocol",
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def ui(
    api: Annotated[str, typer.Option(help="URL of the REST API (defectscope serve).")] = (
        "http://127.0.0.1:8000"
    ),
    api_key: Annotated[
        str | None,
        typer.Option(help="API key, if the server wants one.", envvar="DEFECTSCOPE_API_KEY"),
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8501,
    samples: Annotated[
        Path | None, typer.Option(help="Folder of sample images to pick from (e.g. a dataset).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an API answer.")] = 60.0,
) -> None:
    """Web UI over the REST API (Streamlit): inspect, threshold, history, drift, model."""
    import importlib.util
    import subprocess

    from defectscope.errors import DefectscopeError

    if importlib.util.find_spec("streamlit") is None:
        raise DefectscopeError("the web UI needs: pip install 'defectscope[ui]'")
    if not api.startswith(("http://", "https://")):
        raise DefectscopeError(f"--api must be an http:// or https:// URL, not {api!r}")
    if samples is not None and not samples.is_dir():
        raise DefectscopeError(f"--samples {samples}: not a folder")
    if timeout <= 0:
        raise DefectscopeError("--timeout must be positive")
    # The page scripts read these: Streamlit re-runs them in its own process.
    env = {**os.environ, "DEFECTSCOPE_API_URL": api, "DEFECTSCOPE_UI_TIMEOUT": str(timeout)}
    if api_key:
        env["DEFECTSCOPE_API_KEY"] = api_key
    if samples is not None:
        env["DEFECTSCOPE_UI_SAMPLES"] = str(samples.resolve())
    script = Path(__file__).parent / "ui" / "app.py"
    command = [sys.executable, "-m", "streamlit", "run", str(script)]
    command += ["--server.address", host, "--server.port", str(port), "--server.headless", "true"]
    command += ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    console.print(f"defectscope UI on http://{host}:{port} (API {api})")
    sys.stdout.flush()
    if os.name == "posix":
        # Become the Streamlit process: a supervisor's SIGTERM then stops the UI itself, not a
        # launcher that would leave it running.
        os.execve(sys.executable, command, env)
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command()
def bento(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 3000,
    runtime: RuntimeOpt = "auto",
) -> None:
    """Serve MODEL with BentoML (adaptive batching); needs the "bentoml" extra.

    Routes: POST /v1/predict (multipart field 'images'), /v1/model, /v1/health.
    """
    import importlib.util
    import subprocess

    from defectscope.detector.model_file import resolve_model_path
    from defectscope.errors import DefectscopeError
    from defectscope.export.runtimes import resolve_runtime

    if importlib.util.find_spec("bentoml") is None:
        raise DefectscopeError("BentoML serving needs: pip install 'defectscope[bentoml]'")
    if resolve_runtime(model, runtime) == "torch":
        resolve_model_path(model)  # fail here with a clear message, not inside a worker
    elif not model.exists():
        raise DefectscopeError(f"{model}: model file not found")
    # BentoML workers are separate processes: they read the model through the environment.
    env = {
        **os.environ,
        "DEFECTSCOPE_MODEL_PATH": str(model.resolve()),
        "DEFECTSCOPE_RUNTIME": runtime,
    }
    command = [sys.executable, "-m", "bentoml", "serve"]
    command += ["defectscope.serving.bento_service:DefectscopeService"]
    command += ["--host", host, "--port", str(port)]
    console.print(f"Serving {model} with BentoML on http://{host}:{port}")
    try:
        code = subprocess.call(command, env=env)
    except KeyboardInterrupt:
        code = 130
    if code:
        raise typer.Exit(code)


client_app = typer.Typer(
    help="Call a running defectscope REST server (defectscope serve).", no_args_is_help=True
)
app.add_typer(client_app, name="client")


@client_app.command("predict")
def client_predict(
    inputs: Annotated[list[Path], typer.Argument(help="Images or folders (searched recursively).")],
    url: Annotated[
        str, typer.Option(envvar="DEFECTSCOPE_URL", help="Server URL.")
    ] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option(envvar="DEFECTSCOPE_API_KEY", help="X-API-Key header.")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Write heatmap and overlay PNGs and results.jsonl here."),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="Override the image threshold.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each answer.")] = 60.0,
) -> None:
    """Score images on a server; print a table and optionally save the returned PNGs."""
    from defectscope.client import ClientError, DefectscopeClient, decode_png
    from defectscope.data.io import expand_image_paths
    from defectscope.errors import DefectscopeError
    from defectscope.prediction_writer import unique_output_names

    paths = expand_image_paths(inputs)
    if not paths:
        raise DefectscopeError("no images found in " + ", ".join(str(i) for i in inputs))
    names = unique_output_names(paths)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"{url}: {len(paths)} images")
    for column in ("image", "score", "normalized", "decision", "defect area"):
        table.add_column(column, justify="left" if column in ("image", "decision") else "right")
    rows: list[dict] = []
    failures = 0
    with DefectscopeClient(url, api_key=api_key, timeout=timeout) as client:
        for path, name in zip(paths, names, strict=True):
            try:
                result = client.predict(
                    path,
                    threshold=threshold,
                    heatmap=out_dir is not None,
                    overlay=out_dir is not None,
                )
            except ClientError as exc:
                # A bad image is that image's problem; no server, a wrong key or a server error
                # would fail every image, so they stop the command.
                if exc.status is None or exc.status == 401 or exc.status >= 500:
                    raise
                failures += 1
                table.add_row(str(path), "-", "-", f"[red]error {exc.status}[/]", "-")
                rows.append({"source": str(path), "error": str(exc)})
                continue
            if out_dir is not None:
                for key in ("heatmap", "overlay"):
                    (out_dir / f"{name}_{key}.png").write_bytes(decode_png(result[f"{key}_png"]))
            summary = {k: v for k, v in result.items() if not k.endswith("_png")}
            rows.append({"source": str(path), "output_name": name, **summary})
            table.add_row(
                str(path),
                f"{result['score']:.4f}",
                f"{result['normalized_score']:.3f}",
                result["label"],
                f"{100 * result['defect_area_fraction']:.2f}%",
            )
    out.print(table)
    if out_dir is not None:
        jsonl = out_dir / "results.jsonl"
        jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
        out.print(f"Heatmaps, overlays and {jsonl.name}: {out_dir}")
    if failures:
        console.print(f"{failures} of {len(paths)} images failed")
        raise typer.Exit(1)


@app.command()
def inspect(model: Annotated[Path, typer.Argument(help="Model folder or file.")]) -> None:
    """Print a model's metadata (reads the header only; does not load the backbone)."""
    from defectscope.detector.model_file import compact_metadata, read_header, resolve_model_path

    meta = read_header(resolve_model_path(model))
    meta = compact_metadata(meta)
    out.print_json(json.dumps(meta))


@app.command()
def experiment(
    overrides: Overrides = None,
    config: ConfigOpt = None,
    multirun: Annotated[bool, typer.Option("--multirun", "-m", help="Sweep comma lists.")] = False,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output root.")] = Path("outputs"),
    device: DeviceOpt = None,
    mlflow: MlflowOpt = False,
    mlflow_uri: MlflowUriOpt = None,
    mlflow_experiment: MlflowExperimentOpt = None,
) -> None:
    """Fit and evaluate from a composed config; with --multirun, sweep every combination.

    With --mlflow, each run is an MLflow run; a sweep's runs nest under one parent run.
    """
    from defectscope.errors import ConfigError
    from defectscope.experiment import compose, expand_sweep
    from defectscope.runs import run_experiment, write_sweep_summary
    from defectscope.tracking import open_tracker, sweep_run

    overrides = overrides or []
    if multirun:
        base = compose(config, [o for o in overrides if "," not in o.split("=", 1)[-1]])
        runs = expand_sweep(overrides, base.raw.get("sweep"))
    else:
        if any(
            "," in o.split("=", 1)[-1] and not o.split("=", 1)[-1].startswith("[")
            for o in overrides
        ):
            raise ConfigError("comma lists in overrides sweep several runs: add --multirun")
        runs = [overrides]
    tracker = open_tracker(mlflow, mlflow_uri, mlflow_experiment)  # unreachable: fails now
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    results = []
    tags = {"defectscope.command": "experiment"}
    with sweep_run(tracker, len(runs), f"sweep {stamp}", tags) as parent:
        for number, run_overrides in enumerate(runs):
            exp = _compose(config, run_overrides, device)
            if not exp.data:
                raise ConfigError("no dataset: set data=PATH or use an experiment=... config")
            run_dir = out_dir / exp.name / stamp / (str(number) if len(runs) > 1 else "")
            console.print(
                f"[bold]run {number + 1}/{len(runs)}[/] {' '.join(run_overrides) or '(defaults)'}"
            )
            name = f"{exp.name} {number}" if len(runs) > 1 else exp.name
            with progress_bars() as progress, tracker.run(name, tags, parent) as run:
                results.append(run_experiment(exp, run_dir, progress, run))
            _print_metrics(results[-1])
        if len(runs) > 1:
            summary = write_sweep_summary(results, out_dir / exp.name / stamp)
            out.print(f"Sweep summary: {summary}")
            for file_name in ("summary.md", "summary.csv", "summary.json"):
                parent.log_artifacts(summary.parent / file_name, "summary")


@app.command()
def demo(
    data: Annotated[
        Path | None, typer.Option(help="Use real data instead of the synthetic set.")
    ] = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "demo_output"
    ),
    overrides: Overrides = None,
    device: DeviceOpt = None,
) -> None:
    """Fit, evaluate and report end to end; no download, no data needed."""
    from defectscope.data.synthetic import make_synthetic_dataset
    from defectscope.runs import run_experiment

    if data is None:
        data = out_dir / "data"
        console.print(f"Building a synthetic dataset from scikit-image textures in {data}")
        make_synthetic_dataset(data, overwrite=True)
    exp = _compose(None, [*(overrides or []), f"data={data}", "name=demo"], device)
    with progress_bars() as progress:
        result = run_experiment(exp, out_dir, progress)
    _print_metrics(result)
    out.print(f"Model: {out_dir / 'model'}   Report: {out_dir / 'report' / 'report.html'}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the dataset to.")],
    texture: Annotated[str, typer.Option(help="brick, grass or gravel.")] = "brick",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset.")] = False,
) -> None:
    """Write a synthetic MVTec-layout dataset with exact defect masks."""
    from defectscope.data.synthetic import make_synthetic_dataset

    path = make_synthetic_dataset(out_dir, texture=texture, seed=seed, overwrite=overwrite)
    out.print(f"Synthetic dataset: {path}")


@app.command()
def augment(
    source: Annotated[Path, typer.Argument(help="Dataset to copy.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the augmented copy.")],
    rotate: Annotated[float, typer.Option(help="Rotation in degrees.")] = 0.0,
    brightness: Annotated[float, typer.Option(help="Brightness factor change, e.g. 0.2.")] = 0.0,
    contrast: Annotated[float, typer.Option(help="Contrast factor change.")] = 0.0,
    saturation: Annotated[float, typer.Option(help="Saturation factor change.")] = 0.0,
    hue: Annotated[float, typer.Option(help="Hue shift (fraction of a turn, <= 0.5).")] = 0.0,
    blur: Annotated[float, typer.Option(help="Gaussian blur sigma in pixels.")] = 0.0,
    noise: Annotated[float, typer.Option(help="Gaussian noise sigma (0-255 scale).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
) -> None:
    """Write an augmented copy of a dataset (same layout, masks moved with the image)."""
    from defectscope.data.augment import spec_from_options, write_augmented_dataset

    spec = spec_from_options(
        rotate=rotate,
        brightness=brightness,
        contrast=contrast,
        saturation=saturation,
        hue=hue,
        blur=blur,
        noise=noise,
    )
    dataset = write_augmented_dataset(source, dest, spec, seed=seed, overwrite=overwrite)
    out.print(f"Augmented copy: {dest} ({len(dataset.train)} train, {len(dataset.test)} test)")


@app.command()
def drift(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    images: Annotated[
        list[Path] | None,
        typer.Option("--images", "-i", help="Images or folders of recent inputs (all tests)."),
    ] = None,
    log: Annotated[
        str | None,
        typer.Option(
            help="Prediction log URL of `defectscope serve` (e.g. sqlite:///predictions.db): "
            "tests the logged scores of this model (score tests only)."
        ),
    ] = None,
    since: Annotated[str | None, typer.Option(help="With --log: ISO 8601 start (UTC).")] = None,
    until: Annotated[str | None, typer.Option(help="With --log: ISO 8601 end (UTC).")] = None,
    limit: Annotated[int, typer.Option(help="With --log: newest predictions tested.")] = 500,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the full drift report here.")
    ] = None,
    min_window: Annotated[int, typer.Option(help="Fewest images a window may have.")] = 10,
    fail_on: Annotated[
        str,
        typer.Option(help="Exit with status 1 on this verdict or worse: never, warning, drift."),
    ] = "never",
    device: DeviceOpt = None,
) -> None:
    """Test whether recent images drifted from the model's training images."""
    from defectscope.data.io import expand_image_paths
    from defectscope.detector.detector import Detector
    from defectscope.errors import DefectscopeError
    from defectscope.monitoring.drift import VERDICTS, DriftDetector, DriftThresholds

    if fail_on not in ("never", *VERDICTS[1:]):
        raise DefectscopeError("--fail-on must be 'never', 'warning' or 'drift'")
    if (images is None) == (log is None):
        raise DefectscopeError("give either --images or --log")
    detector = Detector.load(model, device=device)
    monitor = DriftDetector.from_detector(detector, DriftThresholds(min_window=min_window))
    if log is not None:
        scores = _logged_scores(model, log, since, until, limit)
        report = monitor.check_scores(scores)
        title = f"Drift check: {len(scores)} logged predictions"
    else:
        assert images is not None  # exactly one of --images / --log, checked above
        paths = expand_image_paths(images)
        if not paths:
            raise DefectscopeError("no images found in " + ", ".join(str(i) for i in images))
        with progress_bars() as progress:
            report = monitor.check_images(detector, paths, progress=progress)
        title = f"Drift check: {len(paths)} images"
    table = Table(title=title)
    for column in ("test", "statistic", "p-value", "adjusted p", "verdict"):
        table.add_column(column, justify="left" if column == "test" else "right")
    for test in report.tests:
        table.add_row(
            test.name,
            f"{test.statistic:.4g}",
            "-" if test.p_value is None else f"{test.p_value:.3g}",
            "-" if test.adjusted_p is None else f"{test.adjusted_p:.3g}",
            test.verdict or "(info)",
        )
    out.print(table)
    for note in report.notes:
        console.print(f"note: {note}")
    colour = {"ok": "green", "warning": "yellow", "drift": "red"}[report.verdict]
    out.print(f"verdict: [bold {colour}]{report.verdict}[/]")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        out.print(f"Report: {json_out}")
    if fail_on != "never" and VERDICTS.index(report.verdict) >= VERDICTS.index(fail_on):
        raise typer.Exit(1)


def _logged_scores(model: Path, url: str, since: str | None, until: str | None, limit: int):
    """Scores this model logged while serving (rows of other models are not comparable)."""
    from datetime import datetime

    import numpy as np

    from defectscope.errors import DefectscopeError

    try:
        from defectscope.serving.app import file_fingerprint
        from defectscope.serving.predictions_log import LogQuery, PredictionLogRepository
    except ImportError:
        raise DefectscopeError(
            "--log needs the serve extra: pip install 'defectscope[serve]'"
        ) from None
    try:
        bounds = [datetime.fromisoformat(v) if v else None for v in (since, until)]
    except ValueError as exc:
        raise DefectscopeError(f"--since/--until must be ISO 8601 times: {exc}") from None
    try:
        repository = PredictionLogRepository(url)
        rows = repository.recent_scores(
            LogQuery(limit=limit, since=bounds[0], until=bounds[1]), file_fingerprint(model)
        )
    except DefectscopeError:
        raise
    except Exception as exc:  # SQLAlchemy raises many types for a bad URL or database
        raise DefectscopeError(f"cannot read the prediction log {url}: {exc}") from None
    return np.array([score for _, score in rows])


@app.command("drift-study")
def drift_study(
    model: Annotated[Path, typer.Argument(help="Model folder or file.")],
    data: Annotated[Path, typer.Argument(help="Dataset with a labelled test split.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the study.")] = Path(
        "drift_study"
    ),
    shifts: Annotated[
        list[str] | None,
        typer.Option(
            "--shift",
            help="Shift to study (repeatable): brightness, contrast, color, blur, rotate, "
            "noise, shift. Default: all.",
        ),
    ] = None,
    max_images: Annotated[
        int | None, typer.Option(help="Subsample the test split (stratified by label).")
    ] = None,
    refit: Annotated[
        bool, typer.Option(help="Refit on shifted train images at each shift's strongest level.")
    ] = True,
    max_train: Annotated[int, typer.Option(help="Training images per refit.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (subsampling, permutations).")] = 0,
    device: DeviceOpt = None,
) -> None:
    """Score the test split under controlled shifts; AUROC, false alarms and drift verdicts."""
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.monitoring.study import run_drift_study

    detector = Detector.load(model, device=device)
    dataset = open_dataset(data)
    with progress_bars() as progress:
        result = run_drift_study(
            detector,
            dataset,
            out_dir,
            shifts=shifts,
            max_images=max_images,
            refit=refit,
            max_train=max_train,
            seed=seed,
            progress=progress,
        )
    table = Table(title=f"Drift study ({result['seconds']:.0f} s)")
    for column in ("shift", "strength", "AUROC", "false alarms", "verdict", "refit AUROC"):
        table.add_column(column)
    for row in result["rows"]:
        verdict = (row.get("drift_all") or {}).get("verdict", "-")
        refit_auroc = row.get("refit_image_auroc")
        table.add_row(
            row["shift"],
            row["label"],
            "-" if row["image_auroc"] is None else f"{row['image_auroc']:.3f}",
            "-" if row["false_alarm_rate"] is None else f"{row['false_alarm_rate']:.2f}",
            verdict,
            "" if refit_auroc is None else f"{refit_auroc:.3f}",
        )
    out.print(table)
    out.print(f"Study: {out_dir / 'study.md'}  {out_dir / 'study.html'}  {out_dir / 'study.png'}")


@app.command()
def version() -> None:
    """Print the version."""
    out.print(f"defectscope {__version__}")


def main() -> None:
    """Entry point: user errors print one clear line (exit 2), never a traceback."""
    from defectscope.errors import DefectscopeError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = os.environ.get("DEFECTSCOPE_DEBUG") == "1"
    try:
        app()
    except DefectscopeError as exc:
        if debug:
            raise
        # Escaped: messages name extras like 'defectscope[cloud]', which rich reads as markup.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except MemoryError:
        console.print("[bold red]error:[/] out of memory; try a smaller --batch-size or coreset")
        sys.exit(1)


if __name__ == "__main__":
    main()
