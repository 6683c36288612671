"""The documentation site builds with warnings as errors, and its generated references are whole.

CI runs only pytest, so this test is the docs build of CI: `mkdocs build --strict` fails on a
broken link, a missing page in the nav, a docstring mkdocstrings cannot render or a hook error.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed")
pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")
pytest.importorskip("mkdocstrings", reason="the docs extra (mkdocstrings) is not installed")
pytest.importorskip("fastapi", reason="the REST reference needs the serve extra")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def page_text(site: Path, page: str) -> str:
    path = site / page / "index.html" if page else site / "index.html"
    assert path.is_file(), f"{page or 'home'} page missing from the site"
    return html.unescape(re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))


def test_key_pages_are_built(site: Path) -> None:
    for page in (
        "",
        "getting-started",
        "architecture",
        "tracking",
        "deployment",
        "ui",
        "development",
        "reference/cli",
        "reference/python",
        "reference/rest",
        "benchmarks",
    ):
        page_text(site, page)
    assert "defectscope demo" in page_text(site, "getting-started")
    assert "Memory bank" in page_text(site, "architecture") or "memory bank" in page_text(
        site, "architecture"
    )


def test_cli_reference_lists_every_command_and_option(site: Path) -> None:
    import typer.main

    from defectscope.cli import app

    text = page_text(site, "reference/cli")
    pending = [(("defectscope",), typer.main.get_command(app))]
    seen = 0
    while pending:
        path, command = pending.pop()
        for name, sub in getattr(command, "commands", {}).items():
            full = (*path, name)
            assert " ".join(full) in text, f"`{' '.join(full)}` missing from the CLI reference"
            for param in sub.params:
                for flag in param.opts if param.param_type_name == "option" else []:
                    assert flag in text, f"{flag} of {' '.join(full)} missing"
            pending.append((full, sub))
            seen += 1
    assert seen >= 15  # fit, evaluate, predict, export, serve, ... and the client group


def test_rest_reference_covers_every_route(site: Path) -> None:
    from defectscope.serving.app import create_app
    from defectscope.serving.settings import ServingSettings

    text = page_text(site, "reference/rest")
    paths = create_app(ServingSettings(model_path="model")).openapi()["paths"]
    for path, operations in paths.items():
        for method in operations:
            assert f"{method.upper()} {path}" in " ".join(text.split()), f"{method} {path}"
    assert "/v1/predict" in paths and "413" in text


def test_python_reference_renders_the_public_classes(site: Path) -> None:
    text = page_text(site, "reference/python")
    for name in (
        "Detector",
        "DetectorConfig",
        "load_detector",
        "load_exported",
        "ExportedGraph",
        "DriftDetector",
        "DefectscopeClient",
    ):
        assert re.search(rf"\b{name}\b", text), name
    # Methods come with their docstrings, not just the class names.
    assert "fit" in text and "predict" in text and "save" in text


def test_benchmarks_page_is_benchmarks_md(site: Path) -> None:
    first_heading = next(
        line.lstrip("# ").strip()
        for line in (ROOT / "BENCHMARKS.md").read_text().splitlines()
        if line.startswith("# ")
    )
    assert first_heading in page_text(site, "benchmarks")
