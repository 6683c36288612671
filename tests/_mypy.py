"""mypy over the package, started as soon as the test session knows it will need it.

A cold mypy run takes one to two minutes of one core; started when collection finishes, it runs
beside the tests before `test_mypy_passes_on_the_package`, which then only waits for its answer.
Its cache lives outside the checkout, so a machine that runs the tests again checks only what
changed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ID = "tests/integration/test_toolchain.py::test_mypy_passes_on_the_package"
_running: subprocess.Popen[str] | None = None


def cache_dir() -> Path:
    """The user's cache folder (XDG), else the temporary one where that cannot be written."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    try:
        (base / "defectscope-mypy").mkdir(parents=True, exist_ok=True)
    except OSError:
        base = Path(tempfile.gettempdir())
    return base / "defectscope-mypy"


def start() -> None:
    """Start mypy in the background (once); its output is read by `result`."""
    global _running
    if _running is not None:
        return
    # Coverage measures only the package: keep its tracer out of mypy's own process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    _running = subprocess.Popen(
        [sys.executable, "-m", "mypy", "--cache-dir", str(cache_dir())],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def result(timeout: float = 900) -> tuple[int, str]:
    """mypy's exit status and output, starting it now if nothing did."""
    start()
    assert _running is not None
    output, _ = _running.communicate(timeout=timeout)
    return _running.returncode, output


def stop() -> None:
    """End a run nobody waited for (a session cut short), so it does not outlive pytest."""
    if _running is not None and _running.poll() is None:
        _running.kill()
        _running.communicate()
