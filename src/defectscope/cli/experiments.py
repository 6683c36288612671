"""Experiment and data commands: experiment (sweeps), demo, synth and augment."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from defectscope.cli.console import console, out, progress_bars
from defectscope.cli.model import print_metrics
from defectscope.cli.options import (
    ConfigOpt,
    DeviceOpt,
    MlflowExperimentOpt,
    MlflowOpt,
    MlflowUriOpt,
    Overrides,
)


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
    from defectscope import storage
    from defectscope.errors import ConfigError
    from defectscope.experiment import compose, plan_runs, run_experiment, write_sweep_summary
    from defectscope.tracking import open_tracker, sweep_run

    storage.check_output_folder(out_dir, "--out")
    runs = plan_runs(config, overrides or [], multirun)
    tracker = open_tracker(mlflow, mlflow_uri, mlflow_experiment)  # unreachable: fails now
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    results = []
    tags = {"defectscope.command": "experiment"}
    with sweep_run(tracker, len(runs), f"sweep {stamp}", tags) as parent:
        for number, run_overrides in enumerate(runs):
            exp = compose(config, run_overrides, device)
            if not exp.data:
                raise ConfigError("no dataset: set data=PATH or use an experiment=... config")
            run_dir = out_dir / exp.name / stamp / (str(number) if len(runs) > 1 else "")
            console.print(
                f"[bold]run {number + 1}/{len(runs)}[/] {' '.join(run_overrides) or '(defaults)'}"
            )
            name = f"{exp.name} {number}" if len(runs) > 1 else exp.name
            with progress_bars() as progress, tracker.run(name, tags, parent) as run:
                results.append(run_experiment(exp, run_dir, progress, run))
            print_metrics(results[-1])
        if len(runs) > 1:
            summary = write_sweep_summary(results, out_dir / exp.name / stamp)
            out.print(f"Sweep summary: {summary}")
            for file_name in ("summary.md", "summary.csv", "summary.json"):
                parent.log_artifacts(summary.parent / file_name, "summary")


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
    from defectscope import storage
    from defectscope.data.synthetic import make_synthetic_dataset
    from defectscope.experiment import compose, run_experiment

    storage.check_output_folder(out_dir, "--out")
    if data is None:
        data = out_dir / "data"
        console.print(f"Building a synthetic dataset from scikit-image textures in {data}")
        make_synthetic_dataset(data, overwrite=True)
    exp = compose(None, [*(overrides or []), f"data={data}", "name=demo"], device)
    with progress_bars() as progress:
        result = run_experiment(exp, out_dir, progress)
    print_metrics(result)
    out.print(f"Model: {out_dir / 'model'}   Report: {out_dir / 'report' / 'report.html'}")


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
    from defectscope.data.augment import spec_from_options
    from defectscope.data.augmented_copy import write_augmented_dataset

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
