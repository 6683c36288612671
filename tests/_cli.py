"""`defectscope` run as a user runs it: a subprocess of this interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The CLI's twin of `_images.FAST_CONFIG`: a small input and the plain fit for a dozen images.
# The few-shot fit compares view sets first (about 3x the fit); tests/unit/test_few_shot.py
# covers it.
FAST_OVERRIDES = (
    "detector.features.input_size=[128,128]",
    "detector.coreset.ratio=0.25",
    "detector.coreset.min_size=null",
    "detector.device=cpu",
    "detector.few_shot.enabled=false",
)


def run_cli(
    *args: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    unset: tuple[str, ...] = (),
    columns: int = 400,
    umask: int | None = None,
    check: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python -m defectscope.cli ARGS``; ``columns`` fixes rich's line width so output can be
    matched (wide by default: an error naming a long temporary path stays on one line),
    ``unset`` drops variables the caller's environment may hold, ``check`` raises with both
    streams on a non-zero exit."""
    # A crash in native code (exit -11) prints every thread's Python stack to stderr.
    full_env = {
        **os.environ,
        "COLUMNS": str(columns),
        "PYTHONFAULTHANDLER": "1",
        **(env or {}),
    }
    for name in unset:
        full_env.pop(name, None)
    extra: dict[str, Any] = {} if umask is None else {"umask": umask}
    proc = subprocess.run(
        [sys.executable, "-m", "defectscope.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        check=False,
        **extra,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc
