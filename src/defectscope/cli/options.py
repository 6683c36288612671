"""Options several commands share, so that each has one name and one help text everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from defectscope.registry import resolve_model_arg

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="Hydra-style overrides, e.g. detector.coreset.ratio=0.05 backbone=efficientnet_lite1"
    ),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Experiment YAML (default: packaged configs).")
]


def _device(value: str | None) -> str | None:
    from defectscope.config import check_device

    return None if value is None else check_device(value)


# Checked as the command line is read: a typo is reported before a model or torch loads.
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.", callback=_device)]
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
ModelArg = Annotated[Path, typer.Argument(help="Model folder or file.")]
# Read-only commands also take a registry reference (NAME@3, NAME@production), looked up in
# $DEFECTSCOPE_REGISTRY: the others write beside the model, which a registered version is not for.
ModelRefArg = Annotated[
    Path,
    typer.Argument(
        help="Model folder or file, or a registry reference NAME@VERSION / NAME@STAGE.",
        callback=resolve_model_arg,
    ),
]
LabelledDataArg = Annotated[Path, typer.Argument(help="Dataset with a labelled test split.")]
