"""Fitting from a few good images: views chosen by synthetic defects, one-image calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import FAST_CONFIG, texture_crops, with_defect

from defectscope.config import DetectorConfig
from defectscope.detector import few_shot
from defectscope.detector.detector import Detector
from defectscope.detector.few_shot import (
    VIEW_SETS,
    apply_view,
    calibration_method,
    view_origins,
)
from defectscope.detector.plan import FitPlan
from defectscope.errors import ConfigError, DefectscopeError

# Small and quick: one candidate view set, two folds.
FEW = {
    **FAST_CONFIG,
    "few_shot": {
        "enabled": True,
        "candidates": ["rot90"],
        "folds": 2,
        "defects_per_image": 3,
        "calibration_views": 4,
    },
}


def stripes(n: int, angles: list[float] | None = None, size: int = 128, seed: int = 0):
    """Images of parallel stripes at the given angles (degrees), with mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = []
    for i in range(n):
        angle = math.radians(angles[i % len(angles)] if angles else 0.0)
        phase = xx * math.cos(angle) + yy * math.sin(angle)
        gray = 128 + 90 * np.sign(np.sin(phase * 2 * math.pi / 12))
        gray = gray + rng.normal(0, 6, gray.shape)
        out.append(np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=-1))
    return out


def test_fit_from_one_image_predicts_saves_and_loads(tmp_path: Path) -> None:
    detector = Detector(FEW).fit(texture_crops(1))
    calibration = detector.calibration
    assert calibration is not None
    assert calibration.method == "halves"
    # Its halves, each also jittered twice, scored against the rest of the image.
    assert len(calibration.good_scores) == 2 * 3
    assert calibration.good_scores == detector.describe()["selection"]["few_shot"]["halves_scores"]
    assert math.isfinite(detector.threshold) and detector.threshold > 0
    assert math.isfinite(detector.pixel_threshold)
    assert detector.threshold >= max(calibration.good_scores) - 1e-6
    # Every patch of the one image is in the bank, not a 25 % coreset.
    assert detector.describe()["bank_size"] == detector.describe()["training"]["n_patches"]
    defective = [with_defect(image, seed=i)[0] for i, image in enumerate(texture_crops(3, seed=5))]
    bad = detector.predict(defective)
    assert all(p.is_anomalous for p in bad)
    assert min(p.score for p in bad) > detector.threshold
    path = detector.save(tmp_path / "model")
    loaded = Detector.load(path)
    assert loaded.threshold == pytest.approx(detector.threshold)
    assert loaded.describe()["selection"]["few_shot"]["calibration"] == "halves"
    again = loaded.predict(defective)
    assert [p.score for p in again] == pytest.approx([p.score for p in bad], rel=1e-5)


def test_rotations_are_chosen_for_a_product_seen_at_several_angles() -> None:
    # Stripes at 0 and 90 degrees in training, held-out images at the other angle: only a
    # bank with quarter turns explains a held-out image.
    detector = Detector(FEW).fit(stripes(4, [0, 90, 0, 90]))
    selection = detector.describe()["selection"]
    assert selection["chosen"] == "rot90", selection["reason"]
    assert selection["few_shot"]["views"] == list(VIEW_SETS["rot90"])
    assert "views: rot90" in selection["reason"]
    rows = {row["name"]: row for row in selection["candidates"]}
    assert rows["rot90"]["objective"] > rows["none"]["objective"] + 0.02
    # The bank holds four views of every image.
    training = detector.describe()["training"]
    assert training["n_patches"] == 4 * 4 * 16 * 16  # views x images x patches (128 px)
    assert detector.calibration is not None and detector.calibration.method == "leave_one_out"


def test_rotations_are_not_chosen_when_they_do_not_help() -> None:
    # Brick walls are upright (horizontal courses): turned views show vertical courses, which no
    # held-out crop has, so they cannot explain it better, and they help defects hide.
    detector = Detector(FEW).fit(texture_crops(4))
    selection = detector.describe()["selection"]
    assert selection["chosen"] == "none", selection["reason"]
    assert selection["few_shot"]["views"] == ["id"]
    assert "none kept" in selection["reason"]
    assert [row["name"] for row in selection["candidates"]] == ["none", "rot90"]


def test_views_calibration_scores_jittered_views_of_one_image() -> None:
    config = {**FEW, "few_shot": {**FEW["few_shot"], "calibration": "views"}}
    detector = Detector(config).fit(texture_crops(1))
    assert detector.calibration is not None and detector.calibration.method == "views"
    assert len(detector.calibration.good_scores) == 4  # calibration_views
    assert all(math.isfinite(v) and v > 0 for v in detector.calibration.good_scores)


def test_leave_one_out_from_a_few_images_scores_their_jittered_views() -> None:
    train, new = texture_crops(3, seed=11), texture_crops(8, seed=12)
    detector = Detector(FEW).fit(train)
    calibration = detector.calibration
    assert calibration is not None and calibration.method == "leave_one_out"
    assert calibration.tail_spread == 1.0  # the spread was measured on full-size fits only
    assert detector.engine.scorer.edge_profile is None  # nor a profile from three images
    # Four jittered views of each of the three images, each against the others' views only.
    assert len(calibration.good_scores) == 3 * 4
    in_bank = detector.predict(train)
    assert min(calibration.good_scores) > max(p.score for p in in_bank)
    # The highest of three plain leave-one-out scores is a threshold new good crops exceed
    # about 1 time in 4; the views' keeps them below it.
    assert not any(p.is_anomalous for p in detector.predict(new))
    defective = [with_defect(image, seed=i)[0] for i, image in enumerate(new[:3])]
    assert all(p.is_anomalous for p in detector.predict(defective))


def test_augmentation_can_be_forced_and_large_sets_are_untouched() -> None:
    config = DetectorConfig.from_dict({**FEW, "few_shot": {"augmentation": "flips"}})
    assert config.few_shot.enabled  # the default, whatever the other tests' config says
    detector = Detector(config).fit(texture_crops(2))
    selection = detector.describe()["selection"]
    assert selection["chosen"] == "flips" and selection["candidates"] == []
    assert "as configured" in selection["reason"]
    # From auto.min_images on, the few-shot path is off: auto mode decides as before.
    config = DetectorConfig.from_dict({**FEW, "auto": {"enabled": False, "min_images": 3}})
    detector = Detector(config).fit(texture_crops(3))
    assert detector.describe()["selection"]["few_shot"] == {}
    assert detector.describe()["bank_size"] < detector.describe()["training"]["n_patches"]


def test_views_are_exact_turns_and_origins_follow_them() -> None:
    batch = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(apply_view(apply_view(batch, "r90"), "r270"), batch)
    assert torch.equal(apply_view(batch, "r180"), batch.flip(-1).flip(-2))
    assert torch.equal(apply_view(batch, "hflip"), batch.flip(-1))
    with pytest.raises(ValueError, match="square"):
        apply_view(torch.zeros(1, 1, 4, 6), "r90")
    with pytest.raises(ValueError, match="unknown view"):
        apply_view(batch, "zoom")
    # A mirrored view's left column came from the original's right edge.
    origins = view_origins("hflip", (64, 64), (8, 8)).view(8, 8, 2)
    assert origins[0, 0, 1] > 0.8 and origins[0, -1, 1] < -0.8


def test_bad_inputs_fail_clearly() -> None:
    with pytest.raises(DefectscopeError, match="at least one good image"):
        Detector(FEW).fit([])
    with pytest.raises(ConfigError, match=r"few_shot\.margin"):
        DetectorConfig.from_dict({"few_shot": {"margin": -0.1}})
    with pytest.raises(ConfigError, match=r"few_shot\.augmentation"):
        DetectorConfig.from_dict({"few_shot": {"augmentation": "rot17"}})
    with pytest.raises(ConfigError, match=r"few_shot\.candidates"):
        DetectorConfig.from_dict({"few_shot": {"candidates": ["none"]}})
    with pytest.raises(ConfigError, match=r"few_shot\.loo_min_images"):
        DetectorConfig.from_dict({"few_shot": {"loo_min_images": 1}})
    one_loo = DetectorConfig.from_dict({"few_shot": {"calibration": "leave_one_out"}})
    with pytest.raises(DefectscopeError, match="needs at least 2 good images"):
        calibration_method(one_loo.few_shot, 1)
    halves = DetectorConfig.from_dict({"few_shot": {"calibration": "halves"}})
    with pytest.raises(DefectscopeError, match="splits a single image"):
        calibration_method(halves.few_shot, 3)
    # Without the few-shot path, one image still cannot be calibrated by leave-one-out.
    off = DetectorConfig.from_dict({"few_shot": {"enabled": False}})
    with pytest.raises(DefectscopeError, match="at least 2 good images"):
        FitPlan.create(1, off)
    # Quarter turns of a non-square input are refused by name.
    wide = {**FEW, "features": {"input_size": [64, 128], "aspect": "stretch"}}
    wide["few_shot"] = {"augmentation": "rot90"}  # enabled by default
    with pytest.raises(DefectscopeError, match="square input"):
        Detector(wide).fit(texture_crops(1))


def is_row_of(rows: torch.Tensor, of: torch.Tensor) -> torch.Tensor:
    return (rows[:, None, :] == of[None, :, :]).all(dim=2).any(dim=1)


def test_comparison_banks_share_the_plain_rows_and_cap_the_added_views(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(few_shot, "CHECK_ROWS", 50)
    generator = torch.Generator().manual_seed(0)
    # Three images of 30 rows per view; image 1 is held out.
    rows = {view: torch.randn(3, 30, 4, generator=generator) for view in VIEW_SETS["rot45"]}
    origins: dict[str, torch.Tensor] = {}
    plain = few_shot._fold_bank(rows, origins, VIEW_SETS["none"], 1, 0, 3, seed=7)
    turned = few_shot._fold_bank(rows, origins, VIEW_SETS["rot45"], 1, 0, 3, seed=7)
    # The images as they are: the same 50 of their 60 rows in both banks, none held out.
    assert plain.shape == (50, 4)
    assert torch.equal(turned[:50], plain)
    allowed = torch.cat([rows["id"][0], rows["id"][2]])
    assert is_row_of(plain, allowed).all()
    # The seven added views: 50 rows together, drawn from those views only.
    assert turned.shape == (100, 4)
    added = torch.cat([rows[v][i] for v in VIEW_SETS["rot45"][1:] for i in (0, 2)])
    assert is_row_of(turned[50:], added).all()
