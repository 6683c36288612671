"""Prometheus alert rules: every metric and label they use is exposed by the app."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from _images import png, texture_crops  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from defectscope.serving.app import create_app  # noqa: E402
from defectscope.serving.settings import ServingSettings  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "alerts.yml"
# Made by Prometheus itself for every scrape target, not by the app.
SCRAPE_METRICS = {"up"}
TARGET_LABELS = {"job", "instance", "service"}
REQUIRED_ALERTS = {
    "DefectscopeHighLatencyP95",
    "DefectscopeHighErrorRate",
    "DefectscopeAnomalyRateSpike",
    "DefectscopeModelNotReady",
}
# A metric-like name followed by a label selector or a range: metric names in PromQL.
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*(\[[^\]]*\])?")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)")


@pytest.fixture(scope="module")
def exposed(fitted) -> dict[str, set[str]]:
    """Sample name -> label names, from a real /metrics after some real traffic."""
    detector = copy.deepcopy(fitted)  # the app's own: the session's model stays as it is
    app = create_app(ServingSettings(model_path=None, prediction_log_url=None), detector=detector)
    with TestClient(app, raise_server_exceptions=False) as client:
        image = png(texture_crops(1, seed=5)[0])
        assert client.post("/v1/predict", files={"file": ("a.png", image)}).status_code == 200
        assert client.post("/v1/predict", files={"file": ("b.png", b"no")}).status_code == 415
        text = client.get("/metrics").text
    samples: dict[str, set[str]] = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.fixture(scope="module")
def rules() -> list[dict]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def selectors(expr: str) -> list[tuple[str, list[str]]]:
    """(metric name, label names it matches on) for every selector in a PromQL expression."""
    # Drop strings first: regexes like "/v1/predict.*" are not names.
    found = []
    for match in SELECTOR.finditer(re.sub(r'"[^"]*"', '""', expr)):
        name, braces, window = match.groups()
        if braces is None and window is None and not name.startswith("defectscope_"):
            continue  # a function, keyword or grouping label
        labels = MATCHER.findall(braces or "")
        found.append((name, [label for label, _ in labels]))
    return found


def test_rules_are_complete_and_well_formed(rules):
    names = {rule["alert"] for rule in rules}
    assert names >= REQUIRED_ALERTS
    for rule in rules:
        assert rule["expr"].strip() and rule["for"]
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_metric_and_label_in_the_rules_is_exposed(rules, exposed):
    used = set()
    for rule in rules:
        found = selectors(rule["expr"])
        assert found, f"{rule['alert']}: no metric found in its expression"
        for name, labels in found:
            used.add(name)
            if name in SCRAPE_METRICS:
                continue
            assert name in exposed, (
                f"{rule['alert']} uses {name}, which the app does not expose; "
                f"it exposes {sorted(exposed)}"
            )
            unknown = set(labels) - exposed[name] - TARGET_LABELS
            assert not unknown, f"{rule['alert']}: {name} has no label(s) {sorted(unknown)}"
    # The checker itself must see the metrics the rules are about.
    assert {
        "defectscope_http_request_duration_seconds_bucket",
        "defectscope_http_requests_total",
        "defectscope_anomalies_total",
        "defectscope_predictions_total",
        "defectscope_model_ready",
    } <= used


def test_the_checker_catches_a_renamed_metric(exposed):
    stale = 'rate(defectscope_http_requests_totals{status=~"5.."}[5m]) > 0'
    assert [name for name, _ in selectors(stale)] == ["defectscope_http_requests_totals"]
    assert "defectscope_http_requests_totals" not in exposed


def test_prometheus_config_loads_the_rules():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "defectscope"]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_files():
    for args in (
        ["check", "rules", str(RULES)],
        ["check", "config", str(DEPLOY / "prometheus.yml")],
    ):
        done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
