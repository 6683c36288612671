"""The half-size bank (defectscope.detector.scales): how the two scales add up, what a fit,
a model file and teaching do with it, and what is refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _images import FAST_CONFIG, texture_crops, with_defect
from _models import rewritten_model

from defectscope.config import DetectorConfig
from defectscope.detector.calibration import Calibration, calibrate, small_sample_factor
from defectscope.detector.detector import Detector
from defectscope.detector.scales import (
    ScaleSet,
    half_scale_config,
    uses_half_scale,
)
from defectscope.detector.teaching import extend_bank
from defectscope.errors import ModelFileError


def _calibration(scores: list[float], maxima: list[float]) -> Calibration:
    return calibrate(np.array(scores), np.array(maxima), 0.1, "leave_one_out")


# ------------------------------------------------------------------------- the arithmetic


def test_each_scale_counts_in_units_of_its_own_thresholds() -> None:
    full = _calibration([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0])
    half = _calibration([10.0, 30.0, 20.0, 40.0], [1.0, 1.0, 1.0, 1.0])
    scales = ScaleSet.from_calibrations(full, half, 0.5)
    assert scales.image_weights == (1 / 4.0, 0.5 / 40.0)
    assert scales.map_weights == (1 / 8.0, 0.5 / 1.0)
    maps, scores = scales.combine(
        [torch.full((1, 2, 2), 8.0), torch.full((1, 2, 2), 2.0)],
        [torch.tensor([4.0]), torch.tensor([40.0])],
    )
    assert torch.allclose(maps, torch.full((1, 2, 2), 1.0 + 1.0))
    assert torch.allclose(scores, torch.tensor([1.0 + 0.5]))
    # The thresholds of the sum: the same quantile of the same images' paired values.
    summed = scales.calibration(full, half)
    paired = [1 / 4 + 0.5 / 4, 2 / 4 + 0.5 * 30 / 40, 3 / 4 + 0.5 * 20 / 40, 1 + 0.5]
    assert summed.good_scores == pytest.approx(paired)
    assert summed.threshold == pytest.approx(max(paired))
    assert summed.good_pixel_maxima == pytest.approx([m / 8 + 0.5 for m in (2, 4, 6, 8)])
    assert summed.method == "leave_one_out" and summed.false_alarm_rate == 0.1


def test_the_tail_spread_moves_the_thresholds_of_the_sum_not_the_units() -> None:
    scores, maxima = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0]
    full = calibrate(np.array(scores), np.array(maxima), 0.1, "leave_one_out", 1.5)
    half = calibrate(np.array(scores) * 10, np.array(maxima), 0.1, "leave_one_out", 1.5)
    scales = ScaleSet.from_calibrations(full, half, 0.5)
    # Units are the plain quantiles, so the two banks rank images as without the spread.
    assert scales.image_weights == (1 / 4.0, 0.5 / 40.0)
    assert scales.map_weights == (1 / 8.0, 0.5 / 8.0)
    summed = scales.calibration(full, half)
    paired = np.array(scores) / 4 + 0.5 * np.array(scores) / 4
    assert summed.tail_spread == 1.5
    median = float(np.median(paired))
    spread = 1.5 * small_sample_factor(4, 0.1)  # four images cannot reach the 90 % level
    assert summed.threshold == pytest.approx(median + spread * (paired.max() - median))


def test_scales_calibrated_on_different_images_are_refused() -> None:
    full = _calibration([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    half = _calibration([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="different images"):
        ScaleSet.from_calibrations(full, half, 0.5).calibration(full, half)


def test_a_scale_whose_good_images_all_score_zero_counts_as_it_is() -> None:
    zero = _calibration([0.0, 0.0], [0.0, 0.0])
    scales = ScaleSet.from_calibrations(zero, zero, 0.5)
    assert scales.image_weights == (1.0, 0.5) and scales.map_weights == (1.0, 0.5)


@pytest.mark.parametrize(
    "saved",
    [
        None,
        {},
        {"half_weight": 0.5, "image_weights": [1.0], "map_weights": [1.0, 1.0]},
        {"half_weight": 0.5, "image_weights": [1.0, -1.0], "map_weights": [1.0, 1.0]},
        {"half_weight": 0.5, "image_weights": [1.0, math.nan], "map_weights": [1.0, 1.0]},
        {"half_weight": "x", "image_weights": [1.0, 1.0], "map_weights": [1.0, 1.0]},
        {"half_weight": 0.5, "image_weights": "ab", "map_weights": [1.0, 1.0]},
    ],
)
def test_malformed_scale_weights_are_refused(saved: object) -> None:
    with pytest.raises(ModelFileError, match="two scales"):
        ScaleSet.from_dict(saved, "m.safetensors")


def test_scale_weights_read_back() -> None:
    scales = ScaleSet(0.5, (0.25, 0.0125), (0.125, 0.5))
    assert ScaleSet.from_dict(scales.to_dict()) == scales


# ------------------------------------------------------------------------ configuration


def test_the_half_size_bank_is_added_where_it_was_measured() -> None:
    config = DetectorConfig.from_dict(FAST_CONFIG)
    assert uses_half_scale(config, 16)
    off = DetectorConfig.from_dict({**FAST_CONFIG, "features": {"half_size_bank": 0}})
    assert not uses_half_scale(off, 16)
    one_bank_pass = DetectorConfig.from_dict({**FAST_CONFIG, "features": {"half_scale": True}})
    assert not uses_half_scale(one_bank_pass, 16)
    few_shot = DetectorConfig.from_dict({**FAST_CONFIG, "few_shot": {"enabled": True}})
    assert not uses_half_scale(few_shot, 4), "few-shot fits keep one bank"
    assert not uses_half_scale(half_scale_config(config), 16), "no bank at a quarter size"


def test_half_scale_config_pools_the_same_input_and_chooses_nothing() -> None:
    config = DetectorConfig.from_dict(
        {**FAST_CONFIG, "auto": {"enabled": True}, "scoring": {"smoothing_sigma": 3.0}}
    )
    half = half_scale_config(config)
    assert half.features.input_size == config.features.input_size
    assert half.features.input_pooling == 2 and half.features.half_size_bank == 0
    assert not half.auto.enabled
    assert half.scoring.smoothing_sigma == 6.0
    assert config.features.input_pooling == 1, "the full-size config is not changed"
    # A quarter of the patches, a quarter of the bank's lower bound: the same share of them.
    assert half.coreset.min_size is None
    default_half = half_scale_config(DetectorConfig())
    assert default_half.coreset.min_size == 1_250 and DetectorConfig().coreset.min_size == 5_000


# ------------------------------------------------------------------------ a fitted model


def test_prediction_is_the_sum_of_both_banks_in_units(fitted: Detector) -> None:
    half = fitted.half_scale
    assert half is not None and fitted.info.scales is not None
    images = [with_defect(texture_crops(1, seed=21)[0])[0], *texture_crops(2, seed=22)]
    batch = fitted.feature_parts().preprocessor(images)
    with torch.inference_mode():
        full_maps, full_scores = fitted.scorer(fitted.embed(batch))  # type: ignore[misc]
        pooled = F.avg_pool2d(batch, 2, ceil_mode=True)
        # The half-size bank's features are those of the input averaged over 2x2 pixels.
        half_embeddings = half.parts.features(pooled)
        assert torch.allclose(half.parts.embed(batch), half_embeddings, atol=1e-5)
        half_maps, half_scores = half.scorer(half_embeddings)
    t_full, p_full = fitted.info.scales["thresholds"]["full"]
    t_half, p_half = fitted.info.scales["thresholds"]["half"]
    maps, scores = fitted.score_batch(batch)
    expected = full_scores / t_full + 0.5 * half_scores / t_half
    assert torch.allclose(scores, expected, rtol=1e-5)
    assert torch.allclose(maps, full_maps / p_full + 0.5 * half_maps / p_half, rtol=1e-4)
    # Maps at the input size from a grid half as fine.
    assert maps.shape[-2:] == half_maps.shape[-2:] == batch.shape[-2:]
    full_grid = fitted.feature_parts().grid_size()
    assert half.parts.grid_size() == tuple(-(-side // 2) for side in full_grid)
    assert fitted.describe()["scales"]["half_grid_size"] == list(half.parts.grid_size())


def test_a_drawn_mask_means_a_flagged_image(fitted: Detector) -> None:
    # With the maximum as image score, both thresholds are one quantile of one set of sums.
    assert fitted.pixel_threshold == pytest.approx(fitted.threshold)
    images = [with_defect(image, seed=i)[0] for i, image in enumerate(texture_crops(4, seed=3))]
    for prediction in fitted.predict(images + texture_crops(4, seed=4)):
        assert not prediction.mask.any() or prediction.is_anomalous


def test_saved_model_keeps_both_banks(fitted: Detector, texture_model_dir: Path) -> None:
    loaded = Detector.load(texture_model_dir)
    assert loaded.half_scale is not None
    assert loaded.half_scale.scales == fitted.half_scale.scales  # type: ignore[union-attr]
    for name, bank in fitted.memory_banks().items():
        assert torch.equal(loaded.memory_banks()[name], bank), name
    images = texture_crops(2, seed=31)
    for a, b in zip(loaded.predict(images), fitted.predict(images), strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-6)
        assert np.allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-6)


def _without_half_bank(meta: dict, tensors: dict) -> None:
    del tensors["memory_bank_half"]


def _narrow_half_bank(meta: dict, tensors: dict) -> None:
    tensors["memory_bank_half"] = tensors["memory_bank_half"][:, :5].contiguous()


def _nan_half_bank(meta: dict, tensors: dict) -> None:
    tensors["memory_bank_half"][0, 0] = float("nan")


def _bad_weights(meta: dict, tensors: dict) -> None:
    meta["scales"]["map_weights"] = [1.0, 0.0]


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_without_half_bank, "half-size memory bank shape None"),
        (_narrow_half_bank, "half-size memory bank shape"),
        (_nan_half_bank, "half-size memory bank holds NaN"),
        (_bad_weights, "two scales are invalid"),
    ],
)
def test_damaged_half_size_bank_is_refused(
    texture_model_dir: Path, tmp_path: Path, edit: object, words: str
) -> None:
    path = rewritten_model(texture_model_dir, tmp_path / "model", edit)  # type: ignore[arg-type]
    with pytest.raises(ModelFileError, match=words):
        Detector.load(path)


def test_a_zero_weight_fits_one_bank(tmp_path: Path) -> None:
    config = {**FAST_CONFIG, "features": {**FAST_CONFIG["features"], "half_size_bank": 0}}
    detector = Detector(config).fit(texture_crops(8, seed=41))
    assert detector.half_scale is None and detector.info.scales is None
    assert set(detector.memory_banks()) == {"memory_bank"}
    loaded = Detector.load(detector.save(tmp_path / "m"))
    assert loaded.half_scale is None and "scales" not in loaded.describe()


def test_teaching_adds_the_images_to_both_banks(fitted: Detector) -> None:
    before = {name: bank.shape[0] for name, bank in fitted.memory_banks().items()}
    result = extend_bank(fitted, texture_crops(2, seed=51))
    taught = result.detector
    after = {name: bank.shape[0] for name, bank in taught.memory_banks().items()}
    # 2 images of a 16x16 grid at full size, of 8x8 at half size (the cap is far away).
    assert after["memory_bank"] == before["memory_bank"] + 2 * 16 * 16
    assert after["memory_bank_half"] == before["memory_bank_half"] + 2 * 8 * 8
    assert taught.half_scale.scales == fitted.half_scale.scales  # type: ignore[union-attr]
    assert taught.info.scales["half_bank_size"] == after["memory_bank_half"]  # type: ignore[index]
    # The taught images' scores join the good scores in the units of the sum.
    assert len(taught.calibration.good_scores) == len(fitted.calibration.good_scores) + 2  # type: ignore[union-attr]
    assert all(0.0 < s < 3.0 for s in result.taught_scores)
    assert fitted.memory_banks()["memory_bank_half"].shape[0] == before["memory_bank_half"]


@pytest.mark.parametrize(
    "features",
    [
        {"half_size_bank": -0.5},
        {"half_size_bank": 5},
        {"half_size_bank": "x"},
        {"input_pooling": 3},
    ],
)
def test_bad_half_size_settings_are_refused_with_the_field_name(features: dict) -> None:
    from defectscope.errors import ConfigError

    with pytest.raises(ConfigError, match=next(iter(features))):
        DetectorConfig.from_dict({"features": features})
