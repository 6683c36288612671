"""The `defectscope` command line: a thin adapter over `Detector` and the library functions.

Commands live in one module per group (model, serving, experiments, monitoring) and import
their heavy dependencies inside the command, so that ``defectscope --help`` does not import
torch. ``main`` is the console script.
"""

from __future__ import annotations

import logging

import typer

from defectscope import __version__
from defectscope.cli import experiments, line, model, monitoring, registry, review, serving
from defectscope.cli.console import out, run_reporting_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="defectscope",
    help="Visual anomaly detection for industrial inspection: learn good, find defects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version() -> None:
    """Print the version."""
    out.print(f"defectscope {__version__}")


# Registration order is the order `defectscope --help` lists the commands in.
for command in (
    model.fit,
    model.evaluate,
    model.predict,
    model.export,
    serving.serve,
    serving.ui,
    serving.bento,
    model.inspect,
    experiments.experiment,
    experiments.demo,
    experiments.synth,
    experiments.augment,
    monitoring.drift,
):
    app.command()(command)
app.command("drift-study")(monitoring.drift_study)
app.command()(version)
app.add_typer(serving.client_app, name="client")
app.command()(line.watch)
app.add_typer(registry.registry_app, name="registry")
app.add_typer(review.review_app, name="review")
app.command("teach")(review.teach_local)


def main() -> None:
    """Entry point: user errors print one clear line (exit 2), never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run_reporting_errors(app)
