"""Real processes and a real browser for the web UI's end-to-end test and the docs screenshots:
`defectscope serve` and `defectscope ui` as subprocesses, Debian's chromium through Playwright
(``executable_path``; never a browser downloaded by ``playwright install``)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from _images import free_port

CHROMIUM = Path("/usr/bin/chromium")
# The opened image's decision line on Inspect: scores have 4 significant digits.
SCORE = r"\d+(?:\.\d+)?(?:e[+-]\d+)?"
SCORE_LINE = rf"score ({SCORE}) [≥<] threshold ({SCORE})"


@contextmanager
def process(
    args: list[str],
    log: Path,
    ready_url: str,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[None]:
    """Run ``python -m defectscope.cli ARGS`` until ``ready_url`` answers 200, then yield."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "defectscope.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{args[0]} exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{args[0]} not ready in {timeout} s:\n{log.read_text()}")
            time.sleep(0.25)
        yield
    finally:
        # The whole session (start_new_session): a child the command started goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def api_and_ui(
    model: Path, workdir: Path, ui_args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[tuple[str, str]]:
    """`defectscope serve MODEL` and `defectscope ui --api ...`; yields (API URL, UI URL).

    The prediction log goes to ``workdir/log.db`` unless ``env`` says otherwise.
    """
    env = {"DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{workdir / 'log.db'}", **(env or {})}
    env = {**os.environ, **env}
    api_port, ui_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    ui = f"http://127.0.0.1:{ui_port}"
    serve_args = ["serve", str(model), "--port", str(api_port)]
    ui_cli = ["ui", "--api", api, "--port", str(ui_port), *ui_args]
    with (
        process(serve_args, workdir / "serve.log", f"{api}/readyz", env),
        process(ui_cli, workdir / "ui.log", f"{ui}/_stcore/health", env),
    ):
        yield api, ui


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


def upload_and_score(page: Any, ui_url: str, images: list[Path]) -> str:
    """Open the Inspect page, upload ``images``, press Score; return the first result line."""
    page.goto(ui_url)
    page.get_by_text("Upload images or pick a sample set").wait_for()
    page.locator("input[type=file]").set_input_files([str(p) for p in images])
    # The button counts the files once their upload has reached the Streamlit server.
    page.get_by_role("button", name=re.compile(rf"Score {len(images)} image")).click()
    result = page.get_by_text(re.compile(SCORE_LINE)).first
    result.wait_for()
    return result.inner_text()
