"""Defective images among the good training images: named by the fit, left out of thresholds."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from _images import FAST_CONFIG, painted, texture_crops
from PIL import Image

from defectscope.cli.model import print_fit_summary
from defectscope.detector.calibration import spread_quantile
from defectscope.detector.detector import Detector
from defectscope.detector.suspects import (
    MIN_SCORES,
    WithoutImages,
    dropped_indices,
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
    images = list(enumerate(names))
    assert suspect_images(scores, images) == [
        {"name": "crack.png", "index": 51, "score": 4.0},
        {"name": "dent.png", "index": 50, "score": 3.0},
    ]
    assert suspect_images(list(_good_scores(50)), images[:50]) == []
    # Scores not made one per image (another calibration method) name nothing.
    assert suspect_images(scores, images[:10]) == []


class _Counting(Sequence[int]):
    """A lazy sequence that counts the items read."""

    def __init__(self, n: int) -> None:
        self.n, self.reads = n, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        self.reads += 1
        return 100 + index


def test_the_images_without_the_dropped_ones_stay_lazy_and_renumber_suspects() -> None:
    images = _Counting(6)
    kept = WithoutImages(images, {1, 4})
    assert images.reads == 0 and len(kept) == 4
    assert [kept[i] for i in range(4)] == [100, 102, 103, 105]
    assert kept[1:3] == [102, 103] and kept[-1] == 105
    records = [{"name": "b", "index": 2, "score": 3.0}, {"name": "old file", "score": 2.0}]
    kept.renumber(records)
    assert records[0]["index"] == 3 and "index" not in records[1]
    assert dropped_indices([{"index": 4}, {"name": "no index"}]) == {4}


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
        Image.fromarray(painted(image, kind, seed=i)).save(path)
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


def test_drop_suspects_fits_again_without_them_from_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from defectscope.cli import app

    config = {**FAST_CONFIG, "auto": {"enabled": False}}
    good = tmp_path / "good"
    good.mkdir()
    for i, image in enumerate(texture_crops(24, seed=3)):
        Image.fromarray(image).save(good / f"{i:02d}.png")
    clean = Detector(config).fit(sorted(good.glob("*.png")))
    for i, (image, kind) in enumerate(
        zip(texture_crops(2, seed=9), ["white", "checker"], strict=True)
    ):
        Image.fromarray(painted(image, kind, seed=i)).save(good / f"defect_{i}.png")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(json.dumps({"detector": config}))
    model = tmp_path / "model"
    runner = CliRunner()
    args = ["fit", str(good), "--out", str(model), "--config", str(config_file)]
    result = runner.invoke(app, [*args, "--drop-suspects"])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())
    assert "dropped" in shown and "fitted again without" in shown and "defect_0.png" in shown
    fitted = Detector.load(model)
    dropped = fitted.info.training.dropped
    assert sorted(Path(d["name"]).name for d in dropped) == ["defect_0.png", "defect_1.png"]
    assert sorted(d["index"] for d in dropped) == [24, 25]
    # The second fit saw exactly the good images: the clean fit's bank and thresholds.
    assert fitted.info.training.n_images == 24 and fitted.info.training.suspects == []
    assert fitted.threshold == pytest.approx(clean.threshold, rel=1e-6)
    assert np.array_equal(fitted.memory_bank.numpy(), clean.memory_bank.numpy())
    assert fitted.config.fit.drop_suspects is True
