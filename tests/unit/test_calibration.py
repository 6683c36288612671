"""Calibration: thresholds from good scores, the normalised score, robust scale, serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from defectscope.detector.calibration import (
    FIT_SOURCE,
    Calibration,
    calibrate,
    estimated_false_alarm_rate,
    robust_scale,
    small_sample_factor,
    threshold_rule,
)
from defectscope.errors import DefectscopeError


def make(threshold: float = 10.0, scale: float = 2.0, **kwargs: object) -> Calibration:
    base = {
        "threshold": threshold,
        "pixel_threshold": 12.0,
        "scale": scale,
        "method": "leave_one_out",
        "false_alarm_rate": 0.01,
    }
    return Calibration(**{**base, **kwargs})


# -------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.01, 100.0), (0.05, 96.0), (0.1, 91.0), (0.25, 76.0), (0.499, 51.0)],
)
def test_threshold_is_higher_quantile(rate: float, expected: float) -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 101.0))
    # 'higher': the sorted score at index ceil((n - 1) * (1 - rate)).
    assert expected == np.sort(scores)[math.ceil(99 * (1 - rate))]
    cal = calibrate(scores, scores * 2.0, rate, "holdout")
    assert cal.threshold == expected
    assert cal.pixel_threshold == 2.0 * expected
    assert cal.method == "holdout"
    assert cal.false_alarm_rate == rate
    assert cal.threshold_source == "good_quantile"


def test_threshold_is_an_observed_score_and_bounds_false_alarms() -> None:
    scores = np.random.default_rng(1).gamma(2.0, 1.5, size=37)
    for rate in (0.01, 0.03, 0.1, 0.2):
        cal = calibrate(scores, scores, rate, "in_sample")
        assert cal.threshold in scores
        # At most rate * n good images score strictly above the threshold.
        assert (scores > cal.threshold).sum() <= rate * len(scores)


def test_few_scores() -> None:
    cal = calibrate(np.array([3.0]), np.array([7.0]), 0.01, "in_sample")
    assert cal.threshold == 3.0 and cal.pixel_threshold == 7.0
    cal = calibrate(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]), 0.2, "in_sample")
    assert cal.threshold == 3.0  # 2 * 0.8 = 1.6 -> index 2


def test_tail_spread_widens_the_distance_above_the_median() -> None:
    scores = np.random.default_rng(7).permutation(np.arange(1.0, 101.0))  # median 50.5
    plain = calibrate(scores, scores * 2.0, 0.01, "leave_one_out")
    wide = calibrate(scores, scores * 2.0, 0.01, "leave_one_out", tail_spread=1.3)
    assert plain.threshold == 100.0 and plain.tail_spread == 1.0
    assert wide.threshold == pytest.approx(50.5 + 1.3 * (100.0 - 50.5))
    assert wide.pixel_threshold == pytest.approx(101.0 + 1.3 * (200.0 - 101.0))
    assert wide.tail_spread == 1.3
    # The unit a bank's scores are added in is the plain quantile: the spread moves only the
    # thresholds, never how two banks' scores are ranked.
    assert wide.quantile_thresholds() == (100.0, 200.0)
    assert plain.quantile_thresholds() == (plain.threshold, plain.pixel_threshold)
    # A score equal to the good images' maximum is no longer flagged; one well above it is.
    assert 100.0 < wide.threshold < 130.0


def test_too_few_scores_for_the_quantile_are_extrapolated_along_a_normal_tail() -> None:
    # The largest of n values sits at the 1 - 1/(n + 1) level: 1 % needs 99 values or more.
    assert small_sample_factor(99, 0.01) == 1.0 and small_sample_factor(500, 0.01) == 1.0
    assert small_sample_factor(40, 0.01) == pytest.approx(2.3263 / 1.9720, rel=1e-3)
    assert small_sample_factor(19, 0.05) == 1.0 and small_sample_factor(10, 0.05) > 1.0
    factors = [small_sample_factor(n, 0.01) for n in (2, 5, 10, 20, 40, 80)]
    assert factors == sorted(factors, reverse=True)
    scores = np.arange(1.0, 41.0)  # median 20.5, largest 40
    cal = calibrate(scores, scores, 0.01, "leave_one_out", tail_spread=1.3)
    expected = 20.5 + 1.3 * small_sample_factor(40, 0.01) * (40.0 - 20.5)
    assert cal.threshold == pytest.approx(expected)
    # The plain quantile (tail_spread 1) is never extrapolated.
    assert calibrate(scores, scores, 0.01, "holdout").threshold == 40.0


def test_estimated_false_alarm_rate_inverts_the_rule() -> None:
    scores = np.random.default_rng(9).gamma(3.0, 0.2, size=100)
    wide = calibrate(scores, scores, 0.01, "leave_one_out", tail_spread=1.2)
    # The stored threshold reads as the target (the largest rate the rule maps to it).
    assert estimated_false_alarm_rate(wide, wide.threshold) == pytest.approx(1 / 101, rel=1e-3)
    # Every good score lies below it, yet the rule reads the largest score as a few per cent.
    assert 0.01 < estimated_false_alarm_rate(wide, scores.max()) < 0.1
    grid = np.linspace(np.median(scores), 2 * wide.threshold, 50)
    rates = [estimated_false_alarm_rate(wide, t) for t in grid]
    assert rates == sorted(rates, reverse=True) and rates[0] == 0.5 and rates[-1] == 0.0
    # The plain quantile's estimate is the share of good scores at or above the threshold.
    plain = calibrate(scores, scores, 0.01, "holdout")
    median = float(np.median(scores))
    assert estimated_false_alarm_rate(plain, median) == (scores >= median).mean()


def test_equal_maps_and_scores_keep_one_threshold_under_the_spread() -> None:
    values = np.random.default_rng(8).gamma(3.0, 0.2, size=90)
    cal = calibrate(values, values.copy(), 0.01, "leave_one_out", tail_spread=1.3)
    assert cal.threshold == cal.pixel_threshold  # a drawn mask still means a flagged image


@pytest.mark.parametrize("spread", [0.9, 0.0, -1.0, float("nan"), float("inf")])
def test_tail_spread_below_one_or_not_finite_is_refused(spread: float) -> None:
    with pytest.raises(DefectscopeError, match="tail_spread"):
        calibrate(np.ones(10), np.ones(10), 0.01, "leave_one_out", tail_spread=spread)


def test_threshold_rule_reads_a_calibration_as_stored() -> None:
    scores = np.arange(1.0, 31.0)
    stored = calibrate(scores, scores, 0.02, "leave_one_out", tail_spread=1.2).to_dict()
    assert stored["threshold_source"] == FIT_SOURCE
    assert threshold_rule(stored) == "2% target on good images, leave_one_out, tail x1.2"
    assert threshold_rule({**stored, "tail_spread": 1.0}).endswith("leave_one_out")
    assert threshold_rule({**stored, "threshold_source": "user"}) == "user (not the fit's rule)"


def test_calibrate_stores_scores_as_floats() -> None:
    scores = np.array([1, 2, 3], dtype=np.float32)
    cal = calibrate(scores, np.array([4.0, 5.0, 6.0]), 0.1, "in_sample")
    assert cal.good_scores == [1.0, 2.0, 3.0]
    assert cal.good_pixel_maxima == [4.0, 5.0, 6.0]
    assert all(type(v) is float for v in cal.good_scores + cal.good_pixel_maxima)
    assert isinstance(cal.threshold, float) and isinstance(cal.scale, float)


def test_calibrate_needs_a_score() -> None:
    with pytest.raises(DefectscopeError, match="at least one good image"):
        calibrate(np.array([]), np.array([]), 0.01, "in_sample")


# -------------------------------------------------------------------- normalize


def test_normalize_threshold_is_half() -> None:
    cal = make(threshold=10.0, scale=2.0)
    assert float(cal.normalize(10.0)) == 0.5
    assert float(cal.normalize(12.0)) == pytest.approx(1.0 / (1.0 + math.exp(-1.0)))
    assert float(cal.normalize(6.0)) == pytest.approx(1.0 / (1.0 + math.exp(2.0)))


def test_normalize_threshold_override() -> None:
    cal = make(threshold=10.0, scale=2.0)
    assert float(cal.normalize(3.0, threshold=3.0)) == 0.5
    assert float(cal.normalize(10.0, threshold=3)) > 0.5


def test_normalize_shapes() -> None:
    cal = make()
    assert cal.normalize(1.0).shape == ()
    out = cal.normalize([[1.0, 2.0], [3.0, 4.0]])
    assert out.shape == (2, 2) and out.dtype == np.float64
    assert cal.normalize(np.array([], dtype=np.float32)).shape == (0,)


def test_normalize_monotone_and_bounded() -> None:
    cal = make(threshold=0.3, scale=0.05)
    scores = np.linspace(-5.0, 5.0, 2001)
    out = cal.normalize(scores)
    assert np.all(np.diff(out) >= 0)
    assert np.all((out >= 0.0) & (out <= 1.0))
    assert out[0] < 1e-20 and out[-1] > 1 - 1e-12


def test_normalize_no_overflow_for_huge_scores() -> None:
    cal = make(threshold=1.0, scale=1e-9)
    # z up to 1e39: exp(-z) would overflow without the clip.
    with np.errstate(all="raise"):
        out = cal.normalize(np.array([-1e30, -1e6, 1e6, 1e30]))
    assert out[0] < 1e-20 and out[1] < 1e-20
    assert out[2] == 1.0 and out[3] == 1.0


def test_normalize_extreme_values_stay_finite() -> None:
    cal = make(threshold=1.0, scale=1e-9)
    with np.errstate(all="ignore"):  # (1e308 - t) / 1e-9 is inf before the clip
        out = cal.normalize(np.array([-1e308, 1e308, np.inf, -np.inf]))
    assert np.all(np.isfinite(out))
    assert out.tolist()[1:3] == [1.0, 1.0]
    assert out[0] < 1e-20 and out[3] < 1e-20


def test_normalize_does_not_modify_input() -> None:
    cal = make()
    scores = np.array([1.0, 20.0])
    cal.normalize(scores)
    assert scores.tolist() == [1.0, 20.0]


# ----------------------------------------------------------------- robust_scale


def test_robust_scale_mad_is_normal_consistent() -> None:
    scores = np.random.default_rng(2).normal(5.0, 2.0, size=20000)
    assert robust_scale(scores) == pytest.approx(2.0, rel=0.05)


def test_robust_scale_hand_computed_mad() -> None:
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, |dev| 2,1,0,1,97 -> MAD 1
    assert robust_scale(scores) == pytest.approx(1.4826)


def test_robust_scale_ignores_outliers() -> None:
    base = np.random.default_rng(3).normal(0.0, 1.0, size=999)
    with_outlier = np.append(base, 1e6)
    assert robust_scale(with_outlier) == pytest.approx(robust_scale(base), rel=0.01)


def test_robust_scale_falls_back_to_std_when_mad_is_zero() -> None:
    scores = np.array([1.0, 1.0, 1.0, 1.0, 6.0])
    assert robust_scale(scores) == pytest.approx(float(scores.std()))  # 2.0


@pytest.mark.parametrize("value", [5.0, -3.0, 0.25])
def test_robust_scale_all_equal_uses_median(value: float) -> None:
    scale = robust_scale(np.full(10, value))
    assert scale == pytest.approx(abs(value) * 0.1)
    assert scale > 0


def test_robust_scale_all_zero_is_one() -> None:
    assert robust_scale(np.zeros(7)) == 1.0


def test_calibrate_equal_scores_positive_scale_and_finite_normalize() -> None:
    cal = calibrate(np.full(5, 0.0), np.full(5, 0.0), 0.01, "in_sample")
    assert cal.scale > 0
    assert float(cal.normalize(0.0)) == 0.5
    assert np.isfinite(cal.normalize(np.array([1e9, -1e9]))).all()


# -------------------------------------------------------------- with_thresholds


def test_with_thresholds_replaces_and_copies() -> None:
    cal = make(good_scores=[1.0, 2.0], good_pixel_maxima=[3.0])
    new = cal.with_thresholds(image=4.0, pixel=5)
    assert (new.threshold, new.pixel_threshold) == (4.0, 5.0)
    assert isinstance(new.pixel_threshold, float)
    assert new.threshold_source == "user"
    assert (new.scale, new.method, new.false_alarm_rate) == (cal.scale, cal.method, 0.01)
    assert new.good_scores == [1.0, 2.0] and new.good_scores is not cal.good_scores
    assert new.good_pixel_maxima == [3.0] and new.good_pixel_maxima is not cal.good_pixel_maxima
    assert (cal.threshold, cal.pixel_threshold, cal.threshold_source) == (
        10.0,
        12.0,
        "good_quantile",
    )


def test_with_thresholds_none_keeps_values() -> None:
    cal = make()
    new = cal.with_thresholds(pixel=1.5, source="f1_optimal")
    assert new.threshold == cal.threshold
    assert new.pixel_threshold == 1.5
    assert new.threshold_source == "f1_optimal"
    same = cal.with_thresholds()
    assert (same.threshold, same.pixel_threshold) == (cal.threshold, cal.pixel_threshold)


def test_with_thresholds_changes_normalize_centre() -> None:
    new = make(threshold=10.0).with_thresholds(image=4.0)
    assert float(new.normalize(4.0)) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image": float("nan")}, "image"),
        ({"image": float("inf")}, "image"),
        ({"pixel": float("-inf")}, "pixel"),
        ({"image": 1.0, "pixel": float("nan")}, "pixel"),
    ],
)
def test_with_thresholds_rejects_non_finite(kwargs: dict, name: str) -> None:
    with pytest.raises(DefectscopeError, match=f"{name} threshold must be a finite number"):
        make().with_thresholds(**kwargs)


# ------------------------------------------------------------------ serialisation


def test_stats() -> None:
    scores = list(np.arange(1.0, 101.0))
    stats = make(good_scores=scores).stats()
    assert stats["n"] == 100 and isinstance(stats["n"], int)
    assert stats["mean"] == pytest.approx(50.5)
    assert stats["std"] == pytest.approx(float(np.std(scores)))
    assert (stats["min"], stats["max"]) == (1.0, 100.0)
    assert stats["p50"] == pytest.approx(50.5)
    assert stats["p90"] == pytest.approx(90.1)
    assert stats["p95"] == pytest.approx(95.05)
    assert stats["p99"] == pytest.approx(99.01)


def test_stats_empty() -> None:
    assert make().stats() == {}


def test_dict_round_trip_with_stats() -> None:
    scores = np.random.default_rng(4).normal(1.0, 0.1, size=50)
    cal = calibrate(scores, scores + 0.5, 0.02, "leave_one_out").with_thresholds(
        image=1.3, source="user"
    )
    data = cal.to_dict()
    assert set(data) == {
        "threshold",
        "pixel_threshold",
        "scale",
        "method",
        "false_alarm_rate",
        "threshold_source",
        "good_scores",
        "good_pixel_maxima",
        "tail_spread",
        "stats",
    }
    assert data["stats"] == cal.stats()
    assert data["stats"]["n"] == 50
    text = json.dumps(data)  # JSON-able, as stored in the model file
    again = Calibration.from_dict(json.loads(text))
    assert again == cal
    assert again.to_dict() == data


def test_from_dict_does_not_mutate_input() -> None:
    data = make(good_scores=[1.0]).to_dict()
    copy = json.loads(json.dumps(data))
    Calibration.from_dict(data)
    assert data == copy


def test_from_dict_missing_field_raises_type_error() -> None:
    data = make().to_dict()
    del data["scale"]
    with pytest.raises(TypeError):
        Calibration.from_dict(data)


def test_from_dict_defaults_for_optional_fields() -> None:
    data = {
        "threshold": 1.0,
        "pixel_threshold": 2.0,
        "scale": 0.5,
        "method": "in_sample",
        "false_alarm_rate": 0.01,
    }
    cal = Calibration.from_dict(data)
    assert cal.threshold_source == "good_quantile"
    assert cal.good_scores == [] and cal.good_pixel_maxima == []
    assert cal.tail_spread == 1.0  # files from before the spread: the plain quantile
