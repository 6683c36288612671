"""Teaching a fitted detector from good images without a refit (`detector.teaching`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _images import texture_crops, with_defect

from defectscope.detector.calibration import calibrate, false_alarm_rate, spread_quantile
from defectscope.detector.detector import Detector
from defectscope.detector.teaching import (
    EXTRA_KEYS,
    bank_fingerprint,
    calibrated_thresholds,
    extend_bank,
    lineage,
    model_extras,
    save_model,
)
from defectscope.errors import DefectscopeError


@pytest.fixture(scope="module")
def odd_image() -> np.ndarray:
    # A good part the training set never showed: a painted blemish, scored far above the rest.
    return with_defect(texture_crops(1, seed=61)[0], seed=3)[0]


def test_taught_image_scores_low_and_the_old_detector_is_untouched(fitted, odd_image):
    bank_before = fitted.memory_bank.clone()
    before = fitted.predict(odd_image)[0].score
    result = extend_bank(fitted, [odd_image])
    taught = result.detector
    assert taught is not fitted and torch.equal(fitted.memory_bank, bank_before)
    assert fitted.predict(odd_image)[0].score == pytest.approx(before)
    after = taught.predict(odd_image)[0].score
    assert after < 0.2 * before
    n_patches = result.bank_rows_added
    assert result.bank_rows == fitted.memory_bank.shape[0] + n_patches > 0
    assert torch.equal(taught.memory_bank[: bank_before.shape[0]], bank_before)
    assert taught.info.bank_size == result.bank_rows and fitted.info.bank_size != result.bank_rows
    # Other images still score as before or lower (a bigger bank only shortens distances).
    other = texture_crops(2, seed=62)
    old_scores = [p.score for p in fitted.predict(other)]
    new_scores = [p.score for p in taught.predict(other)]
    assert all(n <= o + 1e-5 for n, o in zip(new_scores, old_scores, strict=True))


def test_calibration_rule_is_reapplied_unless_a_person_set_the_threshold(fitted, odd_image):
    calibration = fitted.calibration
    result = extend_bank(fitted, [odd_image])
    taught = result.detector.calibration
    # The taught image's leave-one-out score joins the good scores; the fit's rule is rerun.
    assert len(taught.good_scores) == len(calibration.good_scores) + 1
    assert taught.good_scores[-1] == pytest.approx(result.taught_scores[0])
    expected = calibrate(
        np.asarray(taught.good_scores),
        np.asarray(taught.good_pixel_maxima),
        calibration.false_alarm_rate,
        calibration.method,
        calibration.tail_spread,
    )
    assert taught.tail_spread == calibration.tail_spread == 1.2
    assert taught.threshold == pytest.approx(expected.threshold)
    assert result.calibrated_threshold == pytest.approx(expected.threshold)
    assert taught.threshold_source == "good_quantile"

    manual = copy.deepcopy(fitted)
    manual.set_thresholds(0.5, source="ui")
    kept = extend_bank(manual, [odd_image]).detector
    assert kept.threshold == 0.5 and kept.calibration.threshold_source == "ui"


def test_bank_cap_is_kept_with_the_coreset(fitted_copy, odd_image):
    cap = fitted_copy.memory_bank.shape[0] + 10
    fitted_copy.config.coreset.max_size = cap
    result = extend_bank(fitted_copy, [odd_image, texture_crops(1, seed=63)[0]])
    assert result.bank_rows == cap and result.detector.memory_bank.shape[0] == cap
    assert 0 < result.bank_rows_added <= cap


def test_saved_with_lineage_and_reloaded(fitted, odd_image, tmp_path):
    result = extend_bank(fitted, [odd_image])
    extras = {
        "lineage": lineage(
            fitted, result, parent_version="1", prediction_ids=[7], created_by="ann"
        ),
        "calibrated_threshold": result.calibrated_threshold,
    }
    save_model(result.detector, tmp_path / "v2", extras)
    loaded = Detector.load(tmp_path / "v2")
    assert torch.equal(loaded.memory_bank.cpu(), result.detector.memory_bank.cpu())
    assert loaded.predict(odd_image)[0].score == pytest.approx(
        result.detector.predict(odd_image)[0].score, rel=1e-5
    )
    stored = model_extras(tmp_path / "v2")
    assert stored["lineage"]["parent_fingerprint"] == bank_fingerprint(fitted)
    assert stored["lineage"]["prediction_ids"] == [7] and stored["lineage"]["created_by"] == "ann"
    assert stored["lineage"]["bank_rows_added"] == result.bank_rows_added
    assert set(stored) <= set(EXTRA_KEYS)
    with pytest.raises(DefectscopeError, match="unknown model metadata"):
        save_model(result.detector, tmp_path / "v3", {"other": 1})


def test_refusals_and_helpers(fitted, odd_image):
    with pytest.raises(DefectscopeError, match="nothing to teach"):
        extend_bank(fitted, [])
    with pytest.raises(DefectscopeError, match="fitted"):
        extend_bank(Detector(fitted.config.to_dict()), [odd_image])
    assert false_alarm_rate([1.0, 2.0, 3.0, 4.0], 3.0) == 0.5
    assert false_alarm_rate([], 1.0) == 0.0
    rule = calibrated_thresholds(fitted.calibration)
    calibration = fitted.calibration
    q = 1 - calibration.false_alarm_rate
    assert rule[0] == pytest.approx(
        spread_quantile(calibration.good_scores, q, calibration.tail_spread)
    )
