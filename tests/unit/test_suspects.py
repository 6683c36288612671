"""Defective images among the good training images: named by the fit, left out of thresholds."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from _images import FAST_CONFIG, texture_crops
from PIL import Image

from defectscope.cli.model import print_fit_summary
from defectscope.detector.calibration import spread_quantile
from defectscope.detector.detector import Detector
from defectscope.detector.suspects import (
    MIN_SCORES,
    outlier_fence,
    suspect_images,
    without_outliers,
)


def _good_scores(n: int = 200, seed: int = 0) -> np.ndarray:
    return 1.2 + 0.05 * np.random.default_rng(seed).standard_normal(n)


def test_good_scores_have_no_outlier_and_gross_ones_do() -> None:
    scores = _good_scores()
    assert np.array_equal(without_outliers(scores), scores)
    planted = np.concatenate([scores, [2.5, 3.0, 4.0]])
    assert without_outliers(planted).size == scores.size
    assert outlier_fence(planted) < 2.5


def test_no_fence_for_few_scores_or_no_spread() -> None:
    few = np.concatenate([_good_scores(MIN_SCORES - 2), [9.0]])
    assert outlier_fence(few) == math.inf
    assert outlier_fence(np.ones(100)) == math.inf
    assert without_outliers(np.r_[np.ones(100), 5.0]).size == 101


def test_the_quantile_ignores_defective_images_among_the_good_ones() -> None:
    scores = _good_scores()
    planted = np.concatenate([scores, [2.5, 2.6, 2.7, 2.8, 2.9, 3.0]])
    for spread in (1.0, 1.2):
        assert spread_quantile(planted, 0.99, spread) == pytest.approx(
            spread_quantile(scores, 0.99, spread), rel=0.02
        )
    # Without the fence the six would decide the 1 % quantile of 206 scores.
    assert float(np.quantile(planted, 0.99)) > 2.5


def test_suspects_are_named_highest_first() -> None:
    scores = [*_good_scores(50), 3.0, 4.0]
    names = [f"good_{i}.png" for i in range(50)] + ["dent.png", "crack.png"]
    assert suspect_images(scores, names) == [
        {"name": "crack.png", "score": 4.0},
        {"name": "dent.png", "score": 3.0},
    ]
    assert suspect_images(list(_good_scores(50)), [f"{i}" for i in range(50)]) == []


def _painted(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A copy with a disc of 15 % of the side, white or a 4 px checkerboard: a gross defect."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    cy, cx = (int(rng.integers(s // 4, 3 * s // 4)) for s in (h, w))
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.15 * h) ** 2
    out = image.copy()
    checker = np.where(((yy // 4 + xx // 4) % 2 == 0)[..., None], 255, 0)
    out[disc] = 255 if kind == "white" else checker[disc]
    return out


def test_a_fit_names_defective_training_images_and_keeps_its_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {**FAST_CONFIG, "auto": {"enabled": False}}
    good = tmp_path / "good"
    good.mkdir()
    for i, image in enumerate(texture_crops(24, seed=3)):
        Image.fromarray(image).save(good / f"{i:02d}.png")
    paths = sorted(good.glob("*.png"))
    clean = Detector(config).fit(paths)
    assert clean.info.training.suspects == []

    defective = []
    kinds = ["white", "checker"]
    for i, (image, kind) in enumerate(zip(texture_crops(2, seed=9), kinds, strict=True)):
        path = tmp_path / f"defect_{i}.png"
        Image.fromarray(_painted(image, kind, seed=i)).save(path)
        defective.append(str(path))
    fitted = Detector(config).fit(paths + [Path(p) for p in defective])

    suspects = fitted.info.training.suspects
    assert sorted(s["name"] for s in suspects) == sorted(defective)
    assert all(s["score"] > fitted.threshold for s in suspects)
    # Two defective images among 26 would have decided the 1 % threshold.
    assert fitted.threshold <= 1.1 * clean.threshold
    # The fit's summary tells the user which files to check.
    print_fit_summary(fitted, tmp_path / "model")
    shown = " ".join(capsys.readouterr().out.split())
    assert "suspects" in shown and "defect_" in shown and "Check them" in shown
    # The record survives saving.
    fitted.save(tmp_path / "model")
    assert Detector.load(tmp_path / "model").info.training.suspects == suspects
