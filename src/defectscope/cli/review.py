"""`defectscope review ...`: the review loop against a running server (queue, verdicts,
exports, teaching, versions), and `defectscope teach`: teaching a model file locally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from defectscope.cli.console import console, out

if TYPE_CHECKING:
    from defectscope.client import DefectscopeClient

review_app = typer.Typer(
    help="Review predictions on a running server: queue, verdicts, exports, teaching, versions.",
    no_args_is_help=True,
)

UrlOpt = Annotated[str, typer.Option(envvar="DEFECTSCOPE_URL", help="Server URL.")]
KeyOpt = Annotated[str | None, typer.Option(envvar="DEFECTSCOPE_API_KEY", help="X-API-Key header.")]
ReviewerOpt = Annotated[
    str | None, typer.Option(envvar="DEFECTSCOPE_REVIEWER", help="Your name, kept with the change.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON.")]
DEFAULT_URL = "http://127.0.0.1:8000"
VERDICTS = ("correct", "false_alarm", "missed_defect")


def connect(url: str, api_key: str | None) -> DefectscopeClient:
    from defectscope.client import DefectscopeClient

    return DefectscopeClient(url, api_key=api_key)


def show(body: Any) -> None:
    out.print_json(json.dumps(body, default=str))


@review_app.command("queue")
def queue(
    scope: Annotated[str, typer.Option(help="flagged (to confirm) or audit (passed sample).")] = (
        "flagged"
    ),
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    since: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    seed: Annotated[int, typer.Option(help="Audit sample seed.")] = 0,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the predictions waiting for review."""
    from defectscope.errors import DefectscopeError

    if scope not in ("flagged", "audit"):
        raise DefectscopeError(f"--scope must be flagged or audit, not {scope!r}")
    with connect(url, api_key) as client:
        body = client.review_queue(scope, limit=limit, since=since, seed=seed)
    if as_json:
        show(body)
        return
    table = Table(title=f"{scope}: {len(body['items'])} of {body['total']}")
    for column in ("id", "created", "part", "station", "score", "decision"):
        table.add_column(column)
    for item in body["items"]:
        table.add_row(
            str(item["id"]),
            item["created_at"][:19],
            item.get("part_id") or "-",
            item.get("station") or "-",
            f"{item['score']:.4f}",
            "anomalous" if item["is_anomalous"] else "good",
        )
    out.print(table)


@review_app.command("mark")
def mark(
    prediction_id: Annotated[int, typer.Argument(help="The prediction's id.")],
    verdict: Annotated[str, typer.Argument(help="correct, false_alarm or missed_defect.")],
    note: Annotated[str | None, typer.Option(help="Why (at most 1000 characters).")] = None,
    reviewer: ReviewerOpt = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Store a verdict on a prediction (a second verdict replaces the first)."""
    from defectscope.errors import DefectscopeError

    if verdict not in VERDICTS:
        raise DefectscopeError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    with connect(url, api_key) as client:
        body = client.review(prediction_id, verdict, note, reviewer)
    console.print(f"prediction {prediction_id}: {body['review']['verdict']}")


@review_app.command("export")
def export(
    csv_path: Annotated[
        Path | None, typer.Option("--csv", help="Write the reviews as CSV.")
    ] = None,
    zip_path: Annotated[
        Path | None, typer.Option("--zip", help="Write images + labels (evaluate reads it).")
    ] = None,
    since: Annotated[str | None, typer.Option(help="ISO 8601 time.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 time, exclusive.")] = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Download the reviewed predictions: --csv PATH and/or --zip PATH."""
    from defectscope.errors import DefectscopeError

    if csv_path is None and zip_path is None:
        raise DefectscopeError("give --csv PATH and/or --zip PATH")
    with connect(url, api_key) as client:
        for path, fetch in (
            (csv_path, lambda c: c.reviews_csv(since=since, until=until)),
            (zip_path, lambda c: c.reviews_zip(since, until)),
        ):
            if path is None:
                continue
            data = fetch(client)
            try:
                path.write_bytes(data)
            except OSError as exc:
                raise DefectscopeError(f"{path}: cannot write ({exc.strerror or exc})") from None
            console.print(f"wrote {path} ({len(data):,} bytes)")


@review_app.command("teach")
def teach(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Prediction ids (default: every false alarm).")
    ] = None,
    preview: Annotated[bool, typer.Option("--preview", help="Only show what would change.")] = (
        False
    ),
    reviewer: ReviewerOpt = None,
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Teach the served model the reviewed false alarms (a new version, served at once)."""
    with connect(url, api_key) as client:
        if preview:
            show(client.teach_preview(ids or None))
            return
        body = client.teach(ids or None, reviewer=reviewer)
    console.print(
        f"version {body['version']} (parent {body['parent']}): {body['images']} images, "
        f"{body['bank_rows_added']} bank rows added; undo: defectscope review activate "
        f"{body['parent']}"
    )


@review_app.command("versions")
def versions(url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List the served model's versions."""
    with connect(url, api_key) as client:
        body = client.versions()
    if as_json:
        show(body)
        return
    table = Table(title=f"active: {body['active'] or 'unversioned'}")
    for column in ("version", "parent", "created", "by", "images", "bank rows"):
        table.add_column(column)
    for v in body["versions"]:
        table.add_row(
            v["version"],
            v["parent"] or "-",
            (v["created_at"] or "-")[:19],
            v["created_by"] or "-",
            str(v["images_taught"]),
            str(v["bank_rows"]),
        )
    out.print(table)


@review_app.command("activate")
def activate(
    version: Annotated[str, typer.Argument(help="The version to serve (undo: the parent).")],
    url: UrlOpt = DEFAULT_URL,
    api_key: KeyOpt = None,
) -> None:
    """Serve another model version."""
    with connect(url, api_key) as client:
        body = client.activate(version)
    console.print(f"serving version {body['active']}")


def teach_local(
    model: Annotated[Path, typer.Argument(help="Model folder or .safetensors file.")],
    images: Annotated[list[Path], typer.Argument(help="Good images (or folders) to teach.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Folder of the new model.")],
    who: Annotated[str, typer.Option("--by", help="Who taught it (kept in lineage).")] = (
        "anonymous"
    ),
) -> None:
    """Teach a model file good images without a refit: their patches join the memory bank."""
    from defectscope.data.io import expand_image_paths
    from defectscope.detector.detector import Detector
    from defectscope.detector.teaching import extend_bank, lineage, save_model
    from defectscope.errors import DefectscopeError

    paths = expand_image_paths(images)
    if not paths:
        raise DefectscopeError("no images found in " + ", ".join(str(i) for i in images))
    detector = Detector.load(model)
    result = extend_bank(detector, paths)
    extras = {
        "lineage": lineage(detector, result, parent_version=None, created_by=who),
        "calibrated_threshold": result.calibrated_threshold,
        "calibrated_pixel_threshold": result.calibrated_pixel_threshold,
    }
    try:
        saved = save_model(result.detector, out_path, extras)
    except OSError as exc:
        raise DefectscopeError(f"{out_path}: cannot write ({exc.strerror or exc})") from None
    console.print(
        f"wrote {saved}: {result.images} images, {result.bank_rows_added} bank rows added "
        f"({result.bank_rows} in all), threshold {result.detector.threshold:.4f}"
    )
