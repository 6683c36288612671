"""MLflow tracking: real local stores written by the CLI, read back with MlflowClient."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli import FAST_OVERRIDES
from _cli import run_cli as _run_cli
from _images import free_port

from defectscope.data.synthetic import make_synthetic_dataset
from defectscope.detector.detector import Detector
from defectscope.detector.model_file import read_header, resolve_model_path
from defectscope.tracking import (
    NullTracker,
    TrackingError,
    flatten,
    log_fit,
    open_tracker,
    resolve_tracking_uri,
)

mlflow = pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")

FAST = FAST_OVERRIDES


run_cli = _run_cli


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def runs_of(uri: str, experiment: str = "defectscope") -> list:
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> set[str]:
    client = mlflow.MlflowClient(uri)
    found: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(uri, run_id, item.path) if item.is_dir else {item.path}
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiles"
    return make_synthetic_dataset(root, n_train=10, n_test_good=3, n_test_defect=5, size=128)


def test_fit_and_evaluate_are_recorded_with_params_metrics_and_artefacts(
    dataset: Path, tmp_path: Path
) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    model, report = tmp_path / "model", tmp_path / "report"
    # --mlflow takes the store from the environment, --mlflow-uri names it.
    ok(
        run_cli(
            "fit", str(dataset), "--out", str(model), *FAST, "--mlflow",
            env={"MLFLOW_TRACKING_URI": uri},
        )
    )  # fmt: skip
    ok(
        run_cli(
            "evaluate", str(model), str(dataset), "--report", str(report), "--mlflow-uri", uri,
        )
    )  # fmt: skip

    fit_run, eval_run = runs_of(uri)
    assert fit_run.info.status == eval_run.info.status == "FINISHED"
    assert fit_run.info.run_name == "model"
    assert fit_run.data.params["detector.coreset.ratio"] == "0.25"
    assert fit_run.data.params["detector.features.input_size"] == "[128, 128]"
    meta = read_header(resolve_model_path(model))
    assert fit_run.data.metrics["bank_size"] == meta["bank_size"]
    assert fit_run.data.metrics["fit_total_s"] == pytest.approx(meta["timings"]["total_s"])
    assert fit_run.data.metrics["threshold"] == pytest.approx(meta["calibration"]["threshold"])
    tags = fit_run.data.tags
    assert tags["defectscope.version"] and tags["defectscope.command"] == "fit"
    assert tags["defectscope.backbone"] == "tf_efficientnet_lite0"
    assert tags["defectscope.dataset"] == str(dataset)
    assert "model/model.safetensors" in artifact_paths(uri, fit_run.info.run_id)
    # The artefacts sit beside the database, not in the directory the command ran from.
    assert (tmp_path / "store" / "mlruns").is_dir()

    expected = json.loads((report / "metrics.json").read_text())
    logged = eval_run.data.metrics
    for key, value in expected["metrics"].items():
        if value is None:
            assert key not in logged  # undefined metrics are left out, never logged as 0
        else:
            assert logged[key] == pytest.approx(value, rel=1e-12), key
    assert logged["image_auroc"] > 0.5
    for defect, row in expected["per_defect"].items():
        assert logged[f"defect/{defect}/count"] == row["count"]
    assert eval_run.data.params["detector.coreset.ratio"] == "0.25"
    assert eval_run.data.params["evaluate.runtime"] == "auto"
    assert eval_run.data.tags["defectscope.model"] == str(model)
    report_files = artifact_paths(uri, eval_run.info.run_id)
    assert {"report/metrics.json", "report/report.html", "report/report.md"} <= report_files
    assert "report/predictions.csv" in report_files


def test_sweep_points_nest_under_one_parent_run(dataset: Path, tmp_path: Path) -> None:
    # Also the CLI's multirun sweep itself (one sweep serves both: each costs two fits).
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = ok(
        run_cli(
            "experiment", f"data={dataset}", "name=tiles", *FAST[:1], *FAST[2:],
            "detector.coreset.ratio=0.2,0.4", "--multirun", "--out", str(tmp_path / "out"),
            "--mlflow-uri", uri, "--mlflow-experiment", "sweeps",
        )
    )  # fmt: skip
    assert "Sweep summary" in proc.stdout
    lines = next((tmp_path / "out").glob("tiles/*/summary.csv")).read_text().splitlines()
    assert len(lines) == 3 and "detector.coreset.ratio=0.2" in lines[1]
    assert len(list((tmp_path / "out").glob("tiles/*/*/model/model.safetensors"))) == 2
    runs = runs_of(uri, "sweeps")
    assert len(runs) == 3
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    assert sorted(r.data.params["detector.coreset.ratio"] for r in children) == ["0.2", "0.4"]
    assert parent.data.tags["defectscope.sweep_size"] == "2"
    summary = json.loads(next((tmp_path / "out" / "tiles").glob("*/summary.json")).read_text())
    for child in children:
        row = next(r for r in summary if child.data.tags["defectscope.overrides"] in r["overrides"])
        assert child.data.metrics["image_auroc"] == pytest.approx(row["image_auroc"])
        files = artifact_paths(uri, child.info.run_id)
        assert {"model/model.safetensors", "report/metrics.json", "config.yaml"} <= files
    assert {"summary/summary.md", "summary/summary.csv"} <= artifact_paths(uri, parent.info.run_id)


def test_unreachable_tracking_server_fails_fast_before_fitting(
    dataset: Path, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    started = time.monotonic()
    proc = run_cli(
        "fit", str(dataset), "--out", str(model), *FAST,
        "--mlflow-uri", f"http://127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "cannot use the MLflow tracking store http://127.0.0.1:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60  # MLflow alone would retry for about four minutes
    assert not model.exists()  # nothing was fitted for a run that could not be recorded


def test_unknown_tracking_scheme_is_a_clear_error() -> None:
    with pytest.raises(TrackingError, match="cannot use the MLflow tracking store nosuch://x"):
        open_tracker(True, "nosuch://x")


def test_broken_artefact_store_after_the_fit_warns_and_keeps_the_model(
    fitted: Detector, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("artefacts cannot be written below a file")
    mlflow.MlflowClient(uri).create_experiment(
        "broken", artifact_location=(blocker / "mlruns").as_uri()
    )
    tracker = open_tracker(True, uri, "broken")  # the store itself answers: no error here
    detector = fitted
    model = tmp_path / "model"
    detector.save(model)
    with caplog.at_level("WARNING", logger="defectscope.tracking"), tracker.run("x") as run:
        log_fit(run, detector, model)
    assert (model / "model.safetensors").is_file()
    assert "could not log artefacts" in caplog.text
    (found,) = runs_of(uri, "broken")
    assert found.info.status == "FINISHED"
    assert found.data.metrics["bank_size"] == detector.info.bank_size  # the rest is recorded
    assert found.data.params["detector.coreset.ratio"] == "0.25"


def test_mlflow_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(TrackingError, match=r"pip install 'defectscope\[tracking\]'"):
        open_tracker(True)


def test_tracking_is_off_unless_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'x.db'}")
    tracker = open_tracker(False)
    assert type(tracker) is NullTracker and not tracker.enabled
    with tracker.run("nothing") as run:
        run.log_metrics({"a": 1.0})
    assert not (tmp_path / "x.db").exists()
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path / 'x.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    assert resolve_tracking_uri("http://mlflow:5000") == "http://mlflow:5000"


def test_flatten_keeps_lists_whole() -> None:
    flat = flatten({"detector": {"coreset": {"ratio": 0.1}, "layers": [1, 2]}, "empty": {}})
    assert flat == {"detector.coreset.ratio": 0.1, "detector.layers": [1, 2], "empty": {}}
