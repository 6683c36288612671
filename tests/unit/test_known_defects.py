"""Known defects: auto mode judges its candidates, and the half-size pass, on a few real
defective images when the user has them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _auto import AUTO_CONFIG, BlindCandidate
from _cli import run_cli
from _images import FAST_CONFIG, png, texture_crops, with_defect

from defectscope.detector import known_defects, selection
from defectscope.detector.detector import Detector
from defectscope.detector.known_defect_files import MAX_KNOWN_DEFECTS, known_defect_paths
from defectscope.detector.known_defects import load_known_defects, soft_auroc
from defectscope.detector.ranking import auroc
from defectscope.errors import ConfigError


def _config(folder: Path, half_size_bank: float = 0.0, **auto: object) -> dict:
    """Auto mode with the known defects of ``folder``; one bank by default, the setting in
    which auto mode tries the one-bank half-size pass (`features.half_scale`)."""
    known = {"known_defects": str(folder), "min_known_defects": 4, **auto}
    features = {**AUTO_CONFIG.get("features", {}), "half_size_bank": half_size_bank}
    return {**AUTO_CONFIG, "features": features, "auto": {**AUTO_CONFIG["auto"], **known}}


@pytest.fixture(scope="module")
def defect_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("known")
    for i, image in enumerate(texture_crops(4, seed=21)):
        (folder / f"{i:02d}.png").write_bytes(png(with_defect(image, seed=i)[0]))
    return folder


# ---------------------------------------------------------------------------- soft AUROC
def test_soft_auroc_counts_how_far_apart_defects_and_good_images_are() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    narrow = np.array([1.0, 1.01, 1.02, 1.03, 1.04])
    wide = np.array([1.0, 1.01, 1.02, 2.0, 3.0])
    assert auroc(labels, narrow) == auroc(labels, wide) == 1.0
    assert soft_auroc(labels, wide) > soft_auroc(labels, narrow) + 0.2
    assert soft_auroc(labels, wide) > 0.95
    # The hard AUROC in the limit, whatever the scores' units.
    swapped = np.array([1.0, 2.0, 3.0, 1.5, 2.5])
    assert soft_auroc(labels, swapped, scale=1e-6) == pytest.approx(auroc(labels, swapped))
    assert soft_auroc(labels, 40 * swapped) == pytest.approx(soft_auroc(labels, swapped))
    assert soft_auroc(labels, np.array([0.0, 0.0, 0.0, 1.0, 1.0])) == pytest.approx(1.0)


# ------------------------------------------------------------------------- bad input
def test_missing_empty_or_unreadable_known_defects_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        known_defect_paths(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no images in"):
        known_defect_paths(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"a\.png: not a readable image") as info:
        known_defect_paths(broken)
    assert "\n" not in str(info.value)
    # A header that reads but pixels that do not: reported when decoded, by name.
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (broken / "a.png").write_bytes(png(noise)[:4000])
    with pytest.raises(ConfigError, match=r"a\.png"):
        load_known_defects(known_defect_paths(broken), lambda image: image)


def test_a_large_folder_is_read_up_to_the_cap_in_name_order(tmp_path: Path) -> None:
    tiny = png(np.zeros((8, 8, 3), np.uint8))
    for i in range(MAX_KNOWN_DEFECTS + 6):
        (tmp_path / f"{i:03d}.png").write_bytes(tiny)
    paths = known_defect_paths(tmp_path)
    assert len(paths) == MAX_KNOWN_DEFECTS
    assert paths == sorted(tmp_path.glob("*.png"))[:MAX_KNOWN_DEFECTS]


# -------------------------------------------------------------------------- selection
def test_candidates_are_judged_on_the_known_defects(monkeypatch, defect_folder: Path) -> None:
    monkeypatch.setitem(selection.CANDIDATES, "raw", BlindCandidate("raw", "none", 1, "blind"))
    detector = Detector(_config(defect_folder))
    result = detector.prepare(texture_crops(16, seed=4))
    rows = {row["name"]: row for row in result.candidates}
    assert result.chosen == "l2"
    assert result.reason.startswith("l2 ") and "the 4 known defects" in result.reason
    assert result.n_defects == 4 and result.defect_kinds == ["known"]
    # Whole images, no masks: judged on image scores alone.
    assert all(row["pixel_auroc"] is None for row in rows.values())
    assert rows["l2"]["image_auroc"] == 1.0 and 0.5 < rows["l2"]["objective"] <= 1.0
    assert rows["raw"]["objective"] < 0.7
    # The chosen candidate was also tried with the half-size pass, and not kept here.
    assert list(rows)[-1] == "l2+half_scale"
    assert rows["l2+half_scale"]["objective"] <= rows["l2"]["objective"] + selection.MARGIN
    assert detector.config.features.half_scale is False


def test_a_model_with_the_half_size_bank_does_not_try_the_one_bank_pass(
    defect_folder: Path,
) -> None:
    detector = Detector(_config(defect_folder, half_size_bank=0.5))
    result = detector.prepare(texture_crops(16, seed=4))
    assert result.defect_kinds == ["known"]
    assert not any(row["name"].endswith("+half_scale") for row in result.candidates)
    assert detector.config.features.half_scale is False


def test_fewer_known_defects_than_the_minimum_are_not_used(defect_folder: Path) -> None:
    detector = Detector(_config(defect_folder, min_known_defects=5))
    result = detector.prepare(texture_crops(16, seed=4))
    assert "4 known defects, fewer than auto.min_known_defects=5: not used" in result.reason
    assert result.defect_kinds != ["known"] and result.n_defects == 12
    assert not any(row["name"].endswith("+half_scale") for row in result.candidates)


def test_known_defects_no_candidate_separates_leave_the_choice_to_synthetic_ones(
    tmp_path: Path,
) -> None:
    # "Defects" that are good crops of the same texture: a handful that nothing separates
    # cannot rank candidates, so the fit is the one without them.
    for i, image in enumerate(texture_crops(4, seed=31)):
        (tmp_path / f"{i:02d}.png").write_bytes(png(image))
    images = texture_crops(16, seed=5)
    detector = Detector(_config(tmp_path)).fit(images)
    selected = detector.info.selection
    assert "4 known defects, separated at image AUROC" in selected["reason"]
    assert "below auto.min_known_separation=0.9: not used" in selected["reason"]
    assert selected["defect_kinds"] != ["known"] and selected["n_defects"] == 12
    assert not any(row["name"].endswith("+half_scale") for row in selected["candidates"])
    assert detector.config.features.half_scale is False
    blind = Detector({**AUTO_CONFIG, "auto": {**AUTO_CONFIG["auto"]}}).fit(images)
    assert selected["chosen"] == blind.info.selection["chosen"]
    assert torch.allclose(detector.scorer.bank, blind.scorer.bank, atol=1e-5)
    # The same folder decides when the bar is lower.
    lowered = Detector(_config(tmp_path, min_known_separation=0.0)).prepare(images)
    assert lowered.defect_kinds == ["known"]


@pytest.mark.parametrize("half_wins", [True, False])
def test_the_fit_takes_auto_modes_maps_with_or_without_the_half_size_pass(
    monkeypatch, defect_folder: Path, half_wins: bool
) -> None:
    real_row = known_defects.half_scale_row

    def decided(*args, **kwargs):  # type: ignore[no-untyped-def]
        row = real_row(*args, **kwargs)
        return {**row, "objective": 2.0 if half_wins else 0.0}

    monkeypatch.setattr(known_defects, "half_scale_row", decided)
    images = texture_crops(16, seed=5)
    detector = Detector(_config(defect_folder)).fit(images)
    selected = detector.info.selection
    assert selected["chosen"].endswith("+half_scale") is half_wins
    assert detector.config.features.half_scale is half_wins
    assert (detector.scorer.groups is not None) is half_wins
    # The same model as a fit told the outcome: auto mode's backbone maps, reused by the fit,
    # held exactly the passes the fit's features take.
    chosen = selected["chosen"].split("+")[0]
    told = {
        **FAST_CONFIG,
        "features": {
            **FAST_CONFIG["features"],
            "normalize": {"raw": "none", "l2": "l2"}[chosen],
            "half_scale": half_wins,
            "half_size_bank": 0.0,
        },
        "auto": {"enabled": False},
    }
    reference = Detector(told).fit(images)
    assert detector.scorer.bank.shape == reference.scorer.bank.shape
    assert torch.allclose(detector.scorer.bank, reference.scorer.bank, atol=1e-4)
    assert detector.threshold == pytest.approx(reference.threshold, rel=1e-4)


# -------------------------------------------------------------------------------- CLI
def test_fit_cli_takes_known_defects_and_refuses_bad_ones(
    tmp_path: Path, defect_folder: Path
) -> None:
    import yaml
    from typer.testing import CliRunner

    from defectscope.cli import app

    data = tmp_path / "good"
    data.mkdir()
    for i, image in enumerate(texture_crops(14, seed=6)):
        (data / f"{i:03d}.png").write_bytes(png(image))
    config = tmp_path / "config.yaml"
    auto = {**AUTO_CONFIG["auto"], "min_known_defects": 4}
    config.write_text(yaml.safe_dump({"detector": {**AUTO_CONFIG, "auto": auto}}))
    runner = CliRunner()
    model = tmp_path / "model"
    args = ["fit", str(data), "--out", str(model), "--config", str(config)]
    result = runner.invoke(app, [*args, "--defects", str(defect_folder)])
    assert result.exit_code == 0, result.output
    meta = json.loads(runner.invoke(app, ["inspect", str(model)]).output)
    assert meta["config"]["auto"]["known_defects"] == str(defect_folder)
    assert "4 known defects" in meta["selection"]["reason"]
    assert meta["selection"]["defect_kinds"] == ["known"]

    missing = run_cli(*args[:3], str(tmp_path / "other"), "--defects", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "nope: file or folder not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    off = run_cli(*args[:3], str(tmp_path / "other"), "--defects", str(defect_folder), "--no-auto")
    assert off.returncode == 2 and "need auto mode" in off.stderr
    assert not (tmp_path / "other").exists()
