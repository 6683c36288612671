"""The command line, run as a user runs it: real processes, real files, real weights."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
from _cli import FAST_OVERRIDES
from _cli import run_cli as _run_cli

from defectscope.data.synthetic import make_synthetic_dataset

FAST = FAST_OVERRIDES


run_cli = partial(_run_cli, check=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiles"
    return make_synthetic_dataset(root, n_train=12, n_test_good=4, n_test_defect=6, size=128)


@pytest.fixture(scope="module")
def model(dataset: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiles"
    proc = run_cli("fit", str(dataset), "--out", str(out), *FAST)
    assert "memory bank" in proc.stdout
    assert "half-size bank" in proc.stdout and "weight 0.5" in proc.stdout
    assert "1% target on good images, leave_one_out, tail x1.2" in proc.stdout
    assert "edge profile" in proc.stdout
    return out


def test_fit_writes_a_self_describing_model(model: Path) -> None:
    assert (model / "model.safetensors").is_file()
    meta = json.loads(run_cli("inspect", str(model)).stdout)
    assert meta["backbone"]["name"] == "tf_efficientnet_lite0"
    assert meta["config"]["features"]["input_size"] == [128, 128]
    assert meta["scales"]["half_weight"] == 0.5 and meta["scales"]["half_grid_size"] == [8, 8]
    assert meta["training"]["n_images"] == 12
    # Learned from the training images' leave-one-out scores; never raises an edge patch.
    assert len(meta["edge_profile"]["factors"]) == 4
    assert all(f >= 1.0 for f in meta["edge_profile"]["factors"])
    assert meta["calibration"]["threshold"] > 0
    assert meta["calibration"]["tail_spread"] == 1.2


def test_evaluate_writes_report_and_can_store_f1_threshold(
    model: Path, dataset: Path, tmp_path
) -> None:
    report = tmp_path / "report"
    run_cli("evaluate", str(model), str(dataset), "--report", str(report))
    metrics = json.loads((report / "metrics.json").read_text())["metrics"]
    assert 0.5 < metrics["image_auroc"] <= 1.0
    assert 0.8 < metrics["pixel_auroc"] <= 1.0
    assert (report / "report.html").is_file() and (report / "report.md").is_file()
    rule = "1% target on good images, leave_one_out, tail x1.2"
    assert rule in (report / "report.md").read_text()

    copy = tmp_path / "model_copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    run_cli("evaluate", str(copy), str(dataset), "--report", str(report), "--set-threshold", "f1")
    meta = json.loads(run_cli("inspect", str(copy)).stdout)
    assert meta["calibration"]["threshold"] == pytest.approx(metrics["f1_threshold"])
    assert meta["calibration"]["threshold_source"] == "f1_validation"


def test_predict_writes_unique_outputs_and_reports_bad_images(
    model: Path, dataset: Path, tmp_path
) -> None:
    (dataset / "test" / "broken.png").write_bytes(b"not an image")
    try:
        out = tmp_path / "pred"
        proc = run_cli("predict", str(model), str(dataset / "test"), "--out", str(out))
    finally:
        (dataset / "test" / "broken.png").unlink()
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 11
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 1 and errors[0]["source"].endswith("broken.png")
    assert "1 unreadable" in proc.stdout
    names = [r["output_name"] for r in rows]
    assert len(set(names)) == len(names)  # same file names in different folders stay apart
    scored = [r for r in rows if not r["error"]]
    for row in scored:
        for kind in ("heatmap", "overlay", "mask"):
            assert (out / row["files"][kind]).is_file()
    defects = [r for r in scored if "/good/" not in r["source"]]
    goods = [r for r in scored if "/good/" in r["source"]]
    assert sum(r["score"] for r in defects) / len(defects) > sum(r["score"] for r in goods) / len(
        goods
    )
    assert any(r["is_anomalous"] for r in defects)
    assert max(r["normalized_score"] for r in defects) > 0.5
    assert (out / "results.csv").read_text().count("\n") == 12
    assert all(0 < r["normalized_score"] < 1 for r in goods)


def test_predict_threshold_override(model: Path, dataset: Path, tmp_path) -> None:
    image = next((dataset / "test" / "good").iterdir())
    run_cli(
        "predict", str(model), str(image), "--out", str(tmp_path), "--threshold", "0", "--no-images"
    )
    (row,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert row["is_anomalous"] and row["threshold"] == 0.0
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "/nonexistent/data", "--out", "/tmp/x"], "not found"),
        (["fit", "{data}", "--out", "{tmp}/m", "detector.coreset.ratio=3"], "coreset.ratio"),
        (["fit", "{data}", "--out", "{tmp}/m", "detector.nonsense=1"], "nonsense"),
        (["fit", "{data}", "--out", "{tmp}/m", "backbone=resnet9000"], "backbone/resnet9000"),
        (["predict", "{tmp}/nomodel", "{data}"], "model not found"),
        (["predict", "{tmp}/junk.safetensors", "{data}"], "not a defectscope model"),
        (["evaluate", "{tmp}/junk.safetensors", "{data}"], "not a defectscope model"),
        (["experiment", "detector.coreset.ratio=0.1,0.2"], "--multirun"),
        (["experiment"], "no dataset"),
        (["evaluate", "{model}", "{data}", "--set-threshold", "max"], "--set-threshold"),
    ],
)
def test_user_errors_are_one_clear_line(args, message, dataset, model, tmp_path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(300))
    args = [a.format(data=dataset, tmp=tmp_path, model=model) for a in args]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_synth_and_augment_commands(tmp_path) -> None:
    run_cli("synth", str(tmp_path / "s"))
    assert len(list((tmp_path / "s" / "train" / "good").glob("*.png"))) == 30
    proc = run_cli(
        "augment", str(tmp_path / "s"), str(tmp_path / "a"), "--rotate", "10", "--brightness", "0.2"
    )
    assert "30 train" in proc.stdout
    assert (tmp_path / "a" / "ground_truth").is_dir()


@pytest.mark.parametrize(
    ("setting", "field"),
    [
        ("detector.features.half_size_bank=-1", "features.half_size_bank"),
        ("detector.calibration.tail_spread=0.5", "calibration.tail_spread"),
    ],
)
def test_fit_refuses_a_bad_setting_before_fitting(
    dataset: Path, tmp_path: Path, setting: str, field: str
) -> None:
    out = tmp_path / "m"
    proc = _run_cli("fit", str(dataset), "--out", str(out), setting)
    assert proc.returncode == 2
    assert field in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
