"""The code-quality gates CI enforces (CI runs only pytest): ruff lint and format, mypy, and the
pre-commit and GitHub Actions configs that run the same tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import _mypy
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def run(*command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def ruff() -> str:
    found = shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (dev extra)")
    return found


def test_ruff_lint_is_clean() -> None:
    proc = run(ruff(), "check", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


def test_ruff_format_is_clean() -> None:
    proc = run(ruff(), "format", "--check", "--output-format", "concise", ".")
    assert proc.returncode == 0, (
        f"not formatted (run `ruff format` on these files):\n{proc.stdout}{proc.stderr}"
    )


def test_mypy_passes_on_the_package() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (dev extra)")
    # Files, strictness and third-party handling come from [tool.mypy] in pyproject.toml; the
    # run itself started when collection finished (_mypy.py).
    returncode, output = _mypy.result()
    assert returncode == 0, f"mypy:\n{output}"
    assert _pyproject()["tool"]["mypy"]["files"] == ["src/defectscope"]


def test_pre_commit_hooks_are_local_and_valid() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = {hook["id"]: hook for repo in config["repos"] for hook in repo["hooks"]}
    # Local hooks on the installed tools: pre-commit never downloads a hook environment.
    assert [repo["repo"] for repo in config["repos"]] == ["local"]
    assert {"ruff-check", "ruff-format", "mypy"} <= set(hooks)
    assert all(hook["language"] == "system" for hook in hooks.values())
    if shutil.which("pre-commit"):
        proc = run("pre-commit", "validate-config", ".pre-commit-config.yaml")
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_github_workflow_mirrors_ci_run() -> None:
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    (job,) = workflow["jobs"].values()
    assert job["container"]["image"].startswith("python:3.11")
    runs = [step.get("run", "") for step in job["steps"]]
    assert ".ci/run" in runs  # the same script, not a copy of its steps that could drift
    uploads = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and "coverage.xml" in uploads[0]["with"]["path"]
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "--cov" in ci_run and "coverage.xml" in ci_run


def test_coverage_counts_every_module() -> None:
    coverage = _pyproject()["tool"]["coverage"]
    # A package source (not `include` patterns, not omissions): never-imported modules count.
    assert coverage["run"]["source"] == ["defectscope"]
    assert "omit" not in coverage["run"] and "omit" not in coverage.get("report", {})
    assert coverage["report"]["fail_under"] >= 50


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())
