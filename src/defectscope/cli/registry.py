"""`defectscope registry ...`: named, numbered model versions, stages, lineage and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from defectscope.cli.console import out
from defectscope.cli.line import RegistryOpt

registry_app = typer.Typer(
    help="Model registry: register versions, promote a version to a stage, roll back.",
    no_args_is_help=True,
)

StageOpt = Annotated[str, typer.Option("--stage", help="Stage label, e.g. production.")]


@registry_app.command("list")
def list_models(
    name: Annotated[str | None, typer.Argument(help="A model name: list its versions.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """List the registered models, or the versions of NAME."""
    from defectscope.registry import open_registry

    store = open_registry(registry)
    if name is None:
        table = Table(title=f"Models in {store.uri}")
        for column in ("name", "versions", "latest", "stages"):
            table.add_column(column)
        for model in store.names():
            versions = store.versions(model)
            stages = ", ".join(f"{s}@{v.version}" for v in versions for s in v.stages)
            table.add_row(model, str(len(versions)), str(versions[-1].version), stages)
        out.print(table)
        return
    table = Table(title=f"{name} in {store.uri}")
    for column in ("version", "created", "stages", "training", "parent", "report"):
        table.add_column(column)
    for version in store.versions(name):
        lineage = version.lineage
        table.add_row(
            str(version.version),
            version.created_at,
            ", ".join(version.stages),
            str(lineage.get("training_fingerprint", ""))[:12],
            str(lineage.get("parent", "")),
            "yes" if version.has_report else "",
        )
    out.print(table)


@registry_app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME@VERSION, NAME@STAGE, NAME@latest or NAME.")],
    registry: RegistryOpt = None,
) -> None:
    """Print one version as JSON: lineage, stages, report and the model's stage history."""
    from defectscope.registry import open_registry

    store = open_registry(registry)
    found = store.find(ref)
    record = found.to_dict()
    record["model_file"] = str(store.local_model(found.name, found.version))
    record["report"] = store.report(found.name, found.version)
    record["stage_history"] = store.stage_history(found.name)
    out.print_json(json.dumps(record, default=str))


@registry_app.command()
def register(
    name: Annotated[str, typer.Argument(help="Model name, e.g. bottle.")],
    model: Annotated[Path, typer.Argument(help="Model folder or model.safetensors file.")],
    stage: Annotated[str | None, typer.Option(help="Also give it this stage.")] = None,
    parent: Annotated[
        str | None, typer.Option(help="The version it was derived from, e.g. bottle@2.")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Evaluation report: metrics.json or its folder [default: MODEL/report]."),
    ] = None,
    data: Annotated[str | None, typer.Option(help="Where its training data lives.")] = None,
    registry: RegistryOpt = None,
) -> None:
    """Register a copy of MODEL as the next version of NAME."""
    from defectscope.registry import open_registry

    store = open_registry(registry)
    lineage = {"data": data} if data else None
    version = store.register(
        name, model, parent=parent, stage=stage, report=report, lineage=lineage
    )
    out.print(f"Registered {name}@{version}" + (f" ({stage})" if stage else ""))


@registry_app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(help="Version number.")],
    stage: StageOpt = "production",
    registry: RegistryOpt = None,
) -> None:
    """Give STAGE to VERSION of NAME (the version holding it before is remembered)."""
    from defectscope.registry import open_registry

    open_registry(registry).promote(name, version, stage)
    out.print(f"{name}@{stage} -> version {version}")


@registry_app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="Model name.")],
    stage: StageOpt = "production",
    registry: RegistryOpt = None,
) -> None:
    """Give STAGE back to the version of NAME that held it before."""
    from defectscope.registry import open_registry

    version = open_registry(registry).rollback(name, stage)
    out.print(f"{name}@{stage} -> version {version} (rolled back)")
