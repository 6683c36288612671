"""The drift study on a small synthetic dataset (fast model): rows, files and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from defectscope import Detector
from defectscope.data.datasets import open_dataset
from defectscope.data.synthetic import make_synthetic_dataset
from defectscope.errors import DefectscopeError
from defectscope.monitoring.study import SHIFT_NAMES, run_drift_study
from tests._images import FAST_CONFIG


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("study") / "tiles"
    return make_synthetic_dataset(root, n_train=12, n_test_good=10, n_test_defect=6, size=128)


@pytest.fixture(scope="module")
def model(data: Path, tmp_path_factory) -> Path:
    detector = Detector(FAST_CONFIG).fit(open_dataset(data).train_paths)
    return detector.save(tmp_path_factory.mktemp("model") / "tiles")


def test_study_rows_files_and_refit(model: Path, data: Path, tmp_path: Path) -> None:
    detector = Detector.load(model)
    stages = []
    result = run_drift_study(
        detector,
        open_dataset(data),
        tmp_path / "out",
        shifts=["brightness"],
        refit=True,
        max_train=8,
        progress=lambda stage, done, total: stages.append((done, total)),
    )
    rows = result["rows"]
    assert [r["shift"] for r in rows] == ["none"] + ["brightness"] * 3
    assert stages[-1][0] == stages[-1][1]
    for row in rows:
        assert 0.0 <= row["image_auroc"] <= 1.0
        assert 0.0 <= row["false_alarm_rate"] <= 1.0
        assert row["drift_all"]["verdict"] in ("ok", "warning", "drift")
        assert row["drift_good"]["n"] == 10
    # The refit is done only at the strongest level of each shift.
    assert [r["level"] for r in rows if "refit_image_auroc" in r] == [3]
    assert result["refit"]["unshifted"]["n_train"] == 8
    # Halving the brightness of everything is drift by any measure.
    assert rows[3]["drift_all"]["verdict"] == "drift"
    out = tmp_path / "out"
    for name in ("study.json", "study.md", "study.html", "study.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "study.json").read_text())["rows"][0]["shift"] == "none"
    assert "| brightness |" in (out / "study.md").read_text()


def test_study_refuses_unknown_shift_and_old_models(model: Path, data: Path, tmp_path) -> None:
    detector = Detector.load(model)
    with pytest.raises(DefectscopeError, match="unknown shift"):
        run_drift_study(detector, open_dataset(data), tmp_path, shifts=["fog"])
    detector.info.reference = None
    with pytest.raises(DefectscopeError, match="no drift reference"):
        run_drift_study(detector, open_dataset(data), tmp_path, shifts=["noise"])
    assert set(SHIFT_NAMES) == {
        "brightness",
        "contrast",
        "color",
        "blur",
        "rotate",
        "noise",
        "shift",
    }


def test_drift_study_cli(model: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "defectscope.cli",
            "drift-study",
            str(model.parent),
            str(data),
            "--out",
            str(out),
            "--shift",
            "rotate",
            "--max-images",
            "12",
            "--no-refit",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "160"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "study.json").read_text())
    assert result["dataset"]["n_test"] == 12
    assert len(result["rows"]) == 4 and not result["refit"]["enabled"]
    assert "rotate" in proc.stdout
