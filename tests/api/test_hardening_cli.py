"""What a careless operator does to the command line: outputs in the way, existing models,
impossible devices, corrupt models, file names that are spreadsheet formulas. Every mistake is
one line and exit status 2, found before any long work; nothing is silently overwritten."""

from __future__ import annotations

import csv
import json
import os
import stat
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from _cli import FAST_OVERRIDES
from _cli import run_cli as _run_cli
from _images import png, texture_crops
from _models import copy_model, rewritten_model

FAST = FAST_OVERRIDES


run_cli = partial(_run_cli, columns=200, unset=("DEFECTSCOPE_DEBUG",), umask=0o022)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    message = " ".join(proc.stderr.split())  # rich may wrap a long line
    assert message.startswith("error:"), proc.stderr
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def good_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good")
    for i, image in enumerate(texture_crops(6, seed=9)):
        (folder / f"{i}.png").write_bytes(png(image))
    return folder


@pytest.fixture
def model_copy(texture_model_dir, tmp_path) -> Path:
    return copy_model(texture_model_dir, tmp_path / "model")


# --------------------------------------------------------------------------------- outputs
def test_fit_refuses_an_output_in_the_way_before_fitting(good_images, model_copy, tmp_path):
    in_the_way = tmp_path / "results.txt"
    in_the_way.write_text("keep me")
    for out, words in [
        (in_the_way, ("not a folder",)),
        (in_the_way / "model", ("not a folder", "a file")),
        (model_copy, ("already exists", "--overwrite")),
        (model_copy / "model.safetensors", ("already exists", "--overwrite")),
        # A folder no one can create: found before the fit, not when the model is saved.
        (Path("/proc/defectscope-test/model"), ("cannot write in /proc",)),
    ]:
        started = time.monotonic()
        proc = run_cli("fit", str(good_images), "--out", str(out), *FAST)
        assert_one_line_error(proc, *words)
        assert "Fitting on" not in proc.stderr + proc.stdout  # refused before the work
        assert time.monotonic() - started < 60
    assert in_the_way.read_text() == "keep me"


def test_outputs_that_cannot_be_written_are_refused_before_the_work(
    texture_model_dir, good_images
) -> None:
    # /proc takes no new folders, not even from root: each command says so in one line at
    # once, instead of a traceback after scoring, tracing or fitting.
    model, data = str(texture_model_dir), str(good_images)
    for argv, option in [
        (["evaluate", model, data, "--report", "/proc/ds-test/report"], "--report"),
        (["export", model, "--out", "/proc/ds-test/model.onnx"], "--out"),
        (["predict", model, data, "--out", "/proc/ds-test/p"], "--out"),
        (["demo", "--out", "/proc/ds-test/demo"], "--out"),
        (["experiment", "--out", "/proc/ds-test/x", f"data={data}"], "--out"),
    ]:
        assert_one_line_error(run_cli(*argv), option, "cannot write in /proc")


def test_a_refused_write_the_checks_did_not_foresee_is_one_line(capsys) -> None:
    from defectscope.cli.console import run_reporting_errors

    def writes_to_a_full_disk() -> None:
        raise OSError(28, "No space left on device", "/data/out/model.safetensors")

    with pytest.raises(SystemExit) as exited:
        run_reporting_errors(writes_to_a_full_disk)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    message = " ".join((captured.err + captured.out).split())
    assert message == "error: /data/out/model.safetensors: No space left on device"

    def a_bug() -> None:
        raise OSError("no file involved")  # not about a path: a bug, shown as one

    with pytest.raises(OSError, match="no file involved"):
        run_reporting_errors(a_bug)


def test_fit_overwrite_replaces_the_model_and_its_stale_outputs(good_images, model_copy):
    before = (model_copy / "model.safetensors").read_bytes()
    (model_copy / "report").mkdir()
    (model_copy / "report" / "metrics.json").write_text('{"metrics": {"image_auroc": 1.0}}')
    (model_copy / "model.onnx").write_bytes(b"an export of the old model")
    (model_copy / "notes.txt").write_text("the operator's own file")
    proc = run_cli("fit", str(good_images), "--out", str(model_copy), "--overwrite", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert (model_copy / "model.safetensors").read_bytes() != before
    # The old report would otherwise be served as the new model's (GET /v1/model/report).
    assert not (model_copy / "report").exists() and not (model_copy / "model.onnx").exists()
    assert (model_copy / "notes.txt").read_text() == "the operator's own file"
    assert "Removed the replaced model's report, model.onnx" in " ".join(proc.stderr.split())
    # Written with the umask's mode (0644 here), not always 0600.
    assert stat.S_IMODE((model_copy / "model.safetensors").stat().st_mode) == 0o644


def test_predict_refuses_an_output_file_before_loading(texture_model_dir, good_images, tmp_path):
    in_the_way = tmp_path / "predictions"
    in_the_way.write_text("keep me")
    proc = run_cli("predict", str(texture_model_dir), str(good_images), "--out", str(in_the_way))
    assert_one_line_error(proc, "not a folder")
    assert in_the_way.read_text() == "keep me"


@pytest.mark.parametrize("device", ["tpu", "mps", "cpu:99", "cuda:x"])
def test_an_impossible_device_is_one_line(texture_model_dir, good_images, tmp_path, device):
    proc = run_cli(
        "predict", str(texture_model_dir), str(good_images), "--out", str(tmp_path / "p"),
        "--device", device,
    )  # fmt: skip
    assert_one_line_error(proc, "device must be auto, cpu, cuda or cuda:N", repr(device))
    if device == "tpu":  # fit assigns the device elsewhere (its config): the same one line
        proc = run_cli("fit", str(good_images), "--out", str(tmp_path / "m"), "--device", device)
        assert_one_line_error(proc, "device must be")


# Runs the CLI in a fresh interpreter and reports whether torch was imported by the time it ended.
WITHOUT_TORCH = """
import sys
from defectscope.cli import main
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules, file=sys.stderr)
"""


def test_common_mistakes_are_answered_before_torch_loads(good_images, tmp_path) -> None:
    # Importing torch and timm takes seconds: a typo must not wait for them.
    in_the_way = tmp_path / "results.txt"
    in_the_way.write_text("keep me")
    missing = str(tmp_path / "no-model")
    (tmp_path / "no-defects").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    fit = ["fit", str(good_images), "--out", str(tmp_path / "m")]
    mistakes = [
        (["fit", str(good_images), "--out", str(in_the_way)], "not a folder"),
        ([*fit, "--defects", missing], "file or folder not found"),
        ([*fit, "--defects", str(tmp_path / "no-defects")], "no images in"),
        ([*fit, "--defects", str(tmp_path / "broken.png")], "not a readable image"),
        (["predict", missing, str(good_images), "--out", str(tmp_path / "p")], "not found"),
        (["evaluate", missing, str(good_images)], "not found"),
        (["export", missing], "not found"),
        (["serve", missing], "not found"),
        (["serve", "--models", missing], "not a folder"),
        (["inspect", missing], "not found"),
        (["predict", str(good_images), str(good_images), "--out", str(tmp_path / "p")], "no "),
        (["predict", missing, str(good_images), "--device", "tpu"], "device must be"),
    ]
    for argv, words in mistakes:
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_TORCH, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
            timeout=120,
            check=False,
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith("error:") and words in lines[0], (argv, proc.stderr)
        assert lines[-1] == "torch imported: False", (argv, proc.stderr)


# ---------------------------------------------------------------------------- bad models
def set_calibration(key: str, value: object):
    def edit(meta: dict, tensors: dict) -> None:
        meta["calibration"][key] = value

    return edit


def set_bank(make):
    def edit(meta: dict, tensors: dict) -> None:
        tensors["memory_bank"] = make(tensors["memory_bank"])

    return edit


def with_nan_row(bank: torch.Tensor) -> torch.Tensor:
    bank = bank.clone()
    bank[3] = float("nan")
    return bank


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (set_calibration("threshold", "abc"), ("threshold is 'abc', not a finite number",)),
        (set_calibration("threshold", float("nan")), ("threshold is nan",)),
        (set_bank(with_nan_row), ("NaN or infinite",)),
        (set_bank(lambda bank: bank[:0]), ("memory bank is empty",)),
    ],
    ids=["text", "nan", "nan-bank", "empty-bank"],  # the other checks: test_model_file.py
)
def test_invalid_numbers_in_a_model_are_refused(
    texture_model_dir, good_images, tmp_path, edit, words
) -> None:
    model = rewritten_model(texture_model_dir, tmp_path / "bad", edit)
    out = tmp_path / "predictions"
    proc = run_cli("predict", str(model), str(good_images), "--out", str(out))
    assert_one_line_error(proc, *words)
    assert not (out / "results.jsonl").exists()  # no result judged with a broken model


# --------------------------------------------------------------------------------- results
def refuse_constant(name: str) -> None:
    raise AssertionError(f"{name} in results.jsonl: not JSON")


def test_results_never_hold_formulas_or_nan(texture_model_dir, tmp_path) -> None:
    names = ["=HYPERLINK(1).png", "+cmd.png", "-2.png", "@sum.png", "\tx.png", "plain.png"]
    image = png(texture_crops(1, seed=2)[0])
    for name in names:
        (tmp_path / name).write_bytes(image)
    (tmp_path / "=broken.png").write_bytes(b"not an image")
    inputs = [*names, "=broken.png"]
    # "--" ends the options: "-2.png" is a file name here.
    proc = run_cli("predict", "--out", "out", str(texture_model_dir), "--", *inputs, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(inputs)
    for row in rows:
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), (column, cell)
    sources = {row["source"] for row in rows}
    assert "'=HYPERLINK(1).png" in sources and "plain.png" in sources
    # The JSONL keeps the names as they are, and is strict JSON throughout.
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse_constant) for line in lines]
    assert {r.get("source") for r in records} >= {"=HYPERLINK(1).png", "=broken.png"}
