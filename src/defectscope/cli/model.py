"""Model commands: fit, evaluate, predict, export and inspect."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.table import Table

from defectscope.cli.console import console, out, progress_bars
from defectscope.cli.fit_summary import print_fit_summary
from defectscope.cli.options import (
    ConfigOpt,
    DeviceOpt,
    EngineOpt,
    LabelledDataArg,
    MlflowExperimentOpt,
    MlflowOpt,
    MlflowUriOpt,
    ModelArg,
    ModelRefArg,
    Overrides,
    RayAddressOpt,
    RayWorkersOpt,
    RuntimeOpt,
)

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector
    from defectscope.registry import Registry

# Outputs derived from a model; after a new fit in their place they would describe the old one.
STALE_MODEL_OUTPUTS = ("report", "model.onnx", "model.xml", "model.bin")


def model_destination(out: Path | str, overwrite: bool) -> Path | str | None:
    """Check fit's --out before the fit: refuse a file in the way, or an existing model unless
    ``overwrite``. Returns the folder whose stale outputs go once the new model is saved."""
    from defectscope import storage
    from defectscope.detector.model_file import MODEL_FILENAME
    from defectscope.errors import DefectscopeError

    target = storage.location(out)
    named = str(target).endswith(".safetensors")
    if isinstance(target, Path):
        folder: Path | str = target.parent if named else target
        storage.check_output_folder(folder, "--out")
        if named and target.is_dir():
            raise DefectscopeError(f"--out {out}: a folder, not a .safetensors file")
    else:
        folder = target.rsplit("/", 1)[0] if named else target.rstrip("/")
    model_file = target if named else storage.join(folder, MODEL_FILENAME)
    if not storage.exists(model_file):
        return None
    if not overwrite:
        raise DefectscopeError(
            f"{model_file} already exists; pass --overwrite to replace it (its report/ and "
            "exported model files are then removed)"
        )
    # Exports and report/ belong to model.safetensors; another file name shares the folder.
    return folder if str(model_file).endswith(f"/{MODEL_FILENAME}") else None


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
    register: Annotated[
        str | None,
        typer.Option(help="Also register the model as the next version of this name."),
    ] = None,
    registry: Annotated[
        str | None,
        typer.Option(envvar="DEFECTSCOPE_REGISTRY", help="Registry folder or mlflow:URI."),
    ] = None,
    auto: Annotated[
        bool | None,
        typer.Option(
            "--auto/--no-auto",
            help="Choose the feature configuration from synthetic defects on held-out good "
            "images (default: on, unless the config sets detector.auto.enabled).",
        ),
    ] = None,
    drop_suspects: Annotated[
        bool,
        typer.Option(
            "--drop-suspects",
            help="Fit again without the training images that score like defects "
            "(detector.fit.drop_suspects).",
        ),
    ] = False,
    defects: Annotated[
        str | None,
        typer.Option(
            "--defects",
            help="Folder (or one image) of real defective images of this product: auto mode "
            "chooses the configuration on them instead of synthetic defects, the half-size "
            "pass included (detector.auto.known_defects).",
        ),
    ] = None,
) -> None:
    """Learn what good looks like from the good training images of DATA.

    DATA and --out may be s3:// or gs:// URIs (the "cloud" extra).
    """
    from defectscope import storage
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.known_defect_files import known_defect_paths
    from defectscope.distributed.cluster import check_engine
    from defectscope.errors import ConfigError
    from defectscope.experiment import compose
    from defectscope.tracking import log_fit, open_tracker

    check_engine(engine, ray_address)
    experiment = compose(config, overrides, device)
    if auto is not None:
        experiment.detector.auto.enabled = auto
    if defects is not None:
        experiment.detector.auto.known_defects = defects
    if drop_suspects:
        experiment.detector.fit.drop_suspects = True
    known = experiment.detector.auto.known_defects
    if known is not None:
        if not experiment.detector.auto.enabled:
            raise ConfigError("known defects choose the configuration: they need auto mode")
        known_defect_paths(known)  # a missing, empty or unreadable one: now, not after minutes
    storage.check_destination(out_dir)  # a missing bucket fails now, not after the fit
    stale_folder = model_destination(out_dir, overwrite)  # likewise an existing model
    tracker = open_tracker(mlflow, mlflow_uri, mlflow_experiment)  # unreachable: fails now
    target = open_registry(registry, register)  # likewise a bad name or registry
    started = time.time()
    data_uri = storage.location(data)
    dataset = open_dataset(storage.localize(data_uri))
    paths = [sample.path for sample in dataset.train]
    console.print(f"Fitting on {len(paths)} good images from {data_uri} ({dataset.layout} layout)")
    # Imported after the checks above: a mistake is reported without loading torch (seconds).
    from defectscope.detector.detector import Detector

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
        removed = storage.remove_outputs(stale_folder, STALE_MODEL_OUTPUTS)
        if removed:
            console.print(f"Removed the replaced model's {', '.join(removed)} from {stale_folder}")
    print_fit_summary(detector, path)
    if target is not None and register is not None:
        version = register_fitted(target, register, path, str(data_uri))
        out.print(f"Registered {register}@{version} in {target.uri}")
    tags = {"defectscope.command": "fit", "defectscope.dataset": str(data_uri)}
    with tracker.run(Path(str(out_dir)).name, tags, started=started) as run:
        log_fit(run, detector, storage.location(out_dir), config=experiment.raw)


def open_registry(uri: str | None, name: str | None) -> Registry | None:
    """fit's --register target, opened (and the name checked) before the fit."""
    if name is None:
        return None
    from defectscope.registry import open_registry as open_store
    from defectscope.registry.base import check_name

    check_name(name)
    return open_store(uri)


def register_fitted(target: Registry, name: str, path: Path | str, data: str) -> int:
    """Register the saved model; a failure says that the model itself is safe on disk."""
    from defectscope.errors import DefectscopeError
    from defectscope.registry import RegistryError

    try:
        return target.register(name, path, lineage={"data": data})
    except DefectscopeError as exc:
        raise RegistryError(f"model saved to {path}, but not registered: {exc}") from None


def evaluate(
    model: ModelArg,
    data: LabelledDataArg,
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
    from defectscope.export.runtimes import load_detector, resolve_runtime
    from defectscope.tracking import log_evaluation, open_tracker

    if set_threshold not in ("none", "f1"):
        raise DefectscopeError("--set-threshold must be 'none' or 'f1'")
    if set_threshold != "none" and resolve_runtime(model, runtime) != "torch":
        raise DefectscopeError("--set-threshold needs --runtime torch (it rewrites the model)")
    storage.check_destination(report)
    storage.check_output_folder(report, "--report")  # before the scoring, not after it
    tracker = open_tracker(mlflow, mlflow_uri, mlflow_experiment)  # unreachable: fails now
    started = time.time()
    detector = load_detector(model, runtime, device)
    data_uri = storage.location(data)
    dataset = open_dataset(storage.localize(data_uri))
    if not dataset.test:
        raise DefectscopeError(f"{data_uri}: no labelled test images to evaluate on")
    from defectscope.evaluation.report import write_report
    from defectscope.evaluation.runner import evaluate as run_evaluation

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
    print_metrics(result.to_dict())
    out.print(f"Report: {storage.output_location(report, local_report, path)}")
    if set_threshold == "f1":
        threshold = store_f1_threshold(detector, result.to_dict()["metrics"], model)
        out.print(f"Stored the F1-optimal threshold {threshold:.4f} in {model}")


def store_f1_threshold(detector: Detector, metrics: dict[str, Any], model: Path) -> float:
    """Make the evaluation's F1-optimal image threshold the model's and save it to ``model``."""
    from defectscope.errors import DefectscopeError

    threshold = metrics.get("f1_threshold")
    if threshold is None:
        raise DefectscopeError("no F1-optimal threshold: the test split has no defective images")
    detector.set_thresholds(image=threshold, source="f1_validation")
    detector.save(model)
    return float(threshold)


def print_metrics(result: dict[str, Any]) -> None:
    """The headline metrics of an evaluation summary as a table on stdout."""
    metrics = result["metrics"]
    table = Table(title="Metrics")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "f1_threshold"):
        if key in metrics and metrics[key] is not None:
            table.add_row(key, f"{metrics[key]:.4f}")
    out.print(table)


def predict(
    model: ModelRefArg,
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

    check_engine(engine, ray_address)
    storage.check_destination(out_dir)
    storage.check_output_folder(out_dir, "--out")
    detector = load_detector(model, runtime, device)
    paths = expand_image_paths([p for src in inputs for p in storage.localize_matches(src)])
    if not paths:
        raise DefectscopeError("no images found in " + ", ".join(str(i) for i in inputs))
    from defectscope.prediction_writer import PredictionWriter

    stack = ExitStack()
    local_out = stack.enter_context(storage.staged_output(out_dir))
    writer = PredictionWriter(local_out, paths, detector, write_images=images)
    failures = 0
    with stack, writer, progress_bars() as progress:
        # (index, source, result[, decoded image]): only a local run has the decoded image.
        iterator: Iterator[tuple[Any, ...]]
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
            iterator = detector.iter_predict_decoded(
                paths, threshold=threshold, pixel_threshold=pixel_threshold, batch_size=batch_size
            )
        for done, item in enumerate(cast("Iterator[tuple[Any, ...]]", iterator), start=1):
            index, result = item[0], item[2]
            image = item[3] if len(item) > 3 else None
            if isinstance(result, Exception):
                if not skip_bad:
                    raise result
                failures += 1
                console.print(f"[yellow]skipped[/] {result}")
            writer.write(index, result, image)
            progress("predict", done, len(paths))
    results = storage.output_location(out_dir, local_out, writer.jsonl_path)
    out.print(
        f"{len(paths) - failures} images scored, {writer.n_anomalous} anomalous, "
        f"{failures} unreadable. Results: {results}"
    )


def export(
    model: ModelArg,
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
    from defectscope.errors import ConfigError
    from defectscope.export.runtimes import load_detector

    if fmt not in ("onnx", "openvino"):
        raise ConfigError(f"--format must be 'onnx' or 'openvino', not {fmt!r}")
    if precision == "int8" and fmt != "openvino":
        raise ConfigError("int8 is available for --format openvino only")
    if out_file is not None:
        from defectscope import storage

        storage.check_output_folder(out_file.parent, "--out")  # before the trace and export
    detector = load_detector(model, "torch", device="cpu")
    from defectscope.export.onnx import export_onnx, export_openvino

    if out_file is None:
        folder = model if model.is_dir() else model.parent
        out_file = folder / ("model.onnx" if fmt == "onnx" else "model.xml")
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
            from defectscope.export.graph import exported_metadata

            check = exported_metadata(path, "openvino")["export"]["int8_check"]
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


def inspect(model: ModelRefArg) -> None:
    """Print a model's metadata (reads the header only; does not load the backbone)."""
    from defectscope.detector.model_file import compact_metadata, read_header, resolve_model_path

    meta = read_header(resolve_model_path(model))
    meta = compact_metadata(meta)
    out.print_json(json.dumps(meta))
