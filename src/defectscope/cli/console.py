"""The CLI's shared terminal: rich consoles, per-stage progress bars and the error policy."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from defectscope.detector.progress import ProgressFn

# Messages and progress go to stderr so that stdout carries only results (tables, JSON).
console = Console(stderr=True)
out = Console()

STAGE_LABELS = {
    "auto": "Choosing configuration",
    "features": "Extracting features",
    "coreset": "Selecting coreset",
    "calibration": "Calibrating thresholds",
    "half-size features": "Half-size bank: features",
    "half-size coreset": "Half-size bank: coreset",
    "half-size calibration": "Half-size bank: calibration",
    "predict": "Predicting",
    "evaluate": "Evaluating",
    "study": "Drift study",
}


@contextmanager
def progress_bars() -> Iterator[ProgressFn]:
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


def run_reporting_errors(command: Callable[[], Any]) -> None:
    """Run ``command``; a user error prints one clear line and exits 2, never a traceback.

    ``DEFECTSCOPE_DEBUG=1`` lets the exception through, with its traceback.
    """
    from defectscope.errors import DefectscopeError

    debug = os.environ.get("DEFECTSCOPE_DEBUG") == "1"
    try:
        command()
    except DefectscopeError as exc:
        if debug:
            raise
        # Escaped: messages name extras like 'defectscope[cloud]', which rich reads as markup.
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        sys.exit(2)
    except OSError as exc:
        # A file or folder the system refused (a full disk, permissions, a read-only mount):
        # the commands check their outputs first, this catches what only fails on writing.
        if debug or exc.filename is None:
            raise
        console.print(
            f"[bold red]error:[/] {escape(f'{exc.filename}: {exc.strerror or exc}')}",
            highlight=False,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
    except MemoryError:
        console.print("[bold red]error:[/] out of memory; try a smaller --batch-size or coreset")
        sys.exit(1)
