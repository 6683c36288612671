"""Metrics: hand-computed cases, agreement with references, and refusal of bad input."""

from __future__ import annotations

import math
from bisect import bisect_right

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from defectscope.detector.ranking import auroc
from defectscope.evaluation.metrics import (
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    region_count,
    roc_curve_points,
    threshold_metrics,
)

# --------------------------------------------------------------------------- image AUROC


def test_image_auroc_perfect_reversed_and_tied():
    labels = [0, 0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.3, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.7, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5] * 5) == 0.5
    # one tie between classes counts one half: 5.5 of 6 pairs
    assert image_auroc([0, 0, 0, 1, 1], [0.1, 0.2, 0.5, 0.5, 0.9]) == pytest.approx(5.5 / 6)


def test_image_auroc_random_is_about_half_and_matches_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    scores = rng.random(4000)
    assert image_auroc(labels, scores) == pytest.approx(0.5, abs=0.04)
    tied = np.round(scores * 10)  # many ties
    assert image_auroc(labels, tied) == pytest.approx(roc_auc_score(labels, tied), abs=1e-12)


def test_image_auroc_accepts_bool_labels():
    assert image_auroc(np.array([False, True]), [0.0, 1.0]) == 1.0


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both good"),
        ([0, 0], [0.1, 0.2], "both good"),
        ([], [], "empty"),
        ([0, 1], [0.1], "2 labels but 1 scores"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 2], [0.1, 0.2], "0 \\(good\\) or 1"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
    ],
)
def test_image_auroc_rejects_bad_input(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


def test_roc_curve_points_shape_and_area():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    fpr, tpr, thresholds = roc_curve_points(labels, scores)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert thresholds[0] == np.inf
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(image_auroc(labels, scores), abs=1e-12)
    # each point is reproduced by score >= threshold
    i = len(thresholds) // 2
    predicted = scores >= thresholds[i]
    assert predicted[labels == 1].mean() == pytest.approx(tpr[i])
    assert predicted[labels == 0].mean() == pytest.approx(fpr[i])
    with pytest.raises(ValueError, match="both good"):
        roc_curve_points([1, 1], [0.2, 0.3])


# --------------------------------------------------------------------------- F1 and threshold


def test_f1_max_hand_computed():
    labels = [0, 0, 1, 1]
    scores = [0.1, 0.4, 0.35, 0.8]
    # thresholds 0.8: F1 2/3; 0.4: 1/2; 0.35: 4/5; 0.1: 2/3
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(0.8)
    assert threshold == 0.35
    assert threshold_metrics(labels, scores, threshold)["f1"] == pytest.approx(f1)


def test_f1_max_perfect_and_ties():
    f1, threshold = f1_max([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert (f1, threshold) == (1.0, 0.7)
    # a tie between a good and a defective image: both are flagged together
    f1, threshold = f1_max([0, 1], [0.5, 0.5])
    assert f1 == pytest.approx(2 / 3) and threshold == 0.5
    # all defective: flag everything
    assert f1_max([1, 1], [0.2, 0.3]) == (1.0, 0.2)


def test_f1_max_reproducible_on_random_data():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + labels, 1)
    f1, threshold = f1_max(labels, scores)
    assert threshold in scores
    assert threshold_metrics(labels, scores, threshold)["f1"] == pytest.approx(f1)
    brute = max(threshold_metrics(labels, scores, t)["f1"] for t in np.unique(scores))
    assert f1 == pytest.approx(brute)


def test_f1_max_without_defects_raises():
    with pytest.raises(ValueError, match="at least one defective"):
        f1_max([0, 0], [0.1, 0.2])


def test_threshold_metrics_counts_and_undefined_rates():
    labels = [0, 0, 0, 1, 1]
    out = threshold_metrics(labels, [0.1, 0.6, 0.2, 0.7, 0.3], 0.5)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (1, 1, 2, 1)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["precision"] == pytest.approx(1 / 2)
    assert out["recall"] == pytest.approx(1 / 2)
    assert out["false_alarm_rate"] == pytest.approx(1 / 3)
    same = threshold_metrics(labels, decisions=[False, True, False, True, False])
    assert same == out
    nothing_flagged = threshold_metrics([0, 1], [0.1, 0.2], 1.0)
    assert math.isnan(nothing_flagged["precision"])
    assert math.isnan(threshold_metrics([1, 1], [0.1, 0.2], 0.0)["false_alarm_rate"])
    with pytest.raises(ValueError, match="either scores and threshold"):
        threshold_metrics([0, 1], [0.1, 0.2])


# --------------------------------------------------------------------------- pixel AUROC


def _square_mask(shape=(16, 16), top=4, left=5, size=4):
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_pixel_auroc_perfect_inverted_and_sklearn():
    masks = [_square_mask(), np.zeros((16, 16), bool), _square_mask(top=9, left=1, size=3)]
    perfect = [m.astype(np.float32) for m in masks]
    assert pixel_auroc(masks, perfect) == 1.0
    assert pixel_auroc(masks, [1.0 - m for m in perfect]) == 0.0
    rng = np.random.default_rng(3)
    noisy = [np.round(m + rng.normal(0, 0.7, m.shape), 1).astype(np.float32) for m in perfect]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in noisy])
    )
    assert pixel_auroc(masks, noisy) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_more_positives_than_negatives():
    # exercises the branch that sorts the negatives
    mask = np.ones((8, 8), dtype=bool)
    mask[0, :3] = False
    amap = np.arange(64, dtype=np.float32).reshape(8, 8)
    expected = roc_auc_score(mask.ravel(), amap.ravel())
    assert pixel_auroc([mask], [amap]) == pytest.approx(expected)


def test_pixel_auroc_undefined_without_defect_pixels():
    assert math.isnan(pixel_auroc([np.zeros((4, 4), bool)], [np.ones((4, 4), np.float32)]))
    assert math.isnan(pixel_auroc([np.ones((4, 4), bool)], [np.ones((4, 4), np.float32)]))


@pytest.mark.parametrize("metric", [pixel_auroc, aupro])
def test_pixel_metrics_reject_bad_input(metric):
    mask = _square_mask()
    good_map = np.zeros((16, 16), np.float32)
    with pytest.raises(ValueError, match="mask 0 has shape"):
        metric([mask], [np.zeros((16, 15), np.float32)])
    with pytest.raises(ValueError, match="1 masks but 2"):
        metric([mask], [good_map, good_map])
    with pytest.raises(ValueError, match="no anomaly maps"):
        metric([], [])
    with pytest.raises(ValueError, match="contains NaN"):
        metric([mask], [np.full((16, 16), np.nan, np.float32)])
    with pytest.raises(ValueError, match="2-D"):
        metric([np.zeros((2, 16, 16), bool)], [np.zeros((2, 16, 16), np.float32)])


# --------------------------------------------------------------------------- AUPRO


def _reference_aupro(masks, maps, fpr_limit=0.3):
    """Slow, literal version of MVTec AD's evaluation code (compute_pro + trapezoid)."""
    structure = np.ones((3, 3), dtype=int)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    regions = []
    normal = []
    for mask, amap in zip(masks, maps, strict=True):
        labeled, count = ndimage.label(mask, structure)
        regions += [amap[labeled == k] for k in range(1, count + 1)]
        normal.append(amap[labeled == 0])
    normal = np.concatenate(normal)
    fprs = [0.0]
    pros = [0.0]
    for t in thresholds:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    fprs.append(1.0)
    pros.append(1.0)
    x = np.array(fprs)
    y = np.array(pros)
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect_right(x, fpr_limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (
            x[ins] - x[ins - 1]
        )
        correction = 0.5 * (y_interp + y[ins - 1]) * (fpr_limit - x[ins - 1])
    keep = x <= fpr_limit
    x = x[keep]
    y = y[keep]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1]))) + correction
    return area / fpr_limit


def test_aupro_perfect_map_is_one_and_inverted_is_zero():
    masks = [_square_mask(), np.zeros((16, 16), bool), _square_mask(top=10, left=10, size=2)]
    perfect = [m.astype(np.float32) for m in masks]
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, [1.0 - m for m in perfect]) == pytest.approx(0.0)


def test_aupro_hand_computed():
    # one region (the pixel scored 2), normals scored 3, 1, 0:
    # curve (0,0) (1/3,0) (1/3,1) (2/3,1) (1,1)
    mask = np.array([[False, True, False, False]])
    amap = np.array([[3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    assert aupro([mask], [amap], fpr_limit=1.0) == pytest.approx(2 / 3)
    assert aupro([mask], [amap], fpr_limit=0.5) == pytest.approx((0.5 - 1 / 3) / 0.5)
    # interpolation inside a sloped segment: region pixel tied with the normal scored 3
    amap_tied = np.array([[3.0, 3.0, 1.0, 0.0]], dtype=np.float32)
    # curve (0,0) -> (1/3,1): at FPR 0.2, PRO 0.6; area 0.2 * 0.6 / 2
    assert aupro([mask], [amap_tied], fpr_limit=0.2) == pytest.approx(0.06 / 0.2)


def test_aupro_weights_regions_equally():
    # a big region fully found and a small region missed: PRO is 1/2, not the pixel share
    mask = np.zeros((20, 20), bool)
    mask[0:10, 0:10] = True
    mask[15, 15] = True
    amap = np.full((20, 20), 0.5, np.float32)
    amap[0:10, 0:10] = 1.0
    amap[15, 15] = 0.0  # below every normal pixel: never found before FPR 1
    assert aupro([mask], [amap], fpr_limit=0.3) == pytest.approx(0.5)
    # tied with the normals instead, it is found gradually: PRO rises from 1/2 to 1 over FPR
    amap[15, 15] = 0.5
    assert aupro([mask], [amap], fpr_limit=0.3) == pytest.approx((0.5 + 0.65) / 2)


def test_regions_are_eight_connected():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    assert region_count(mask) == 1
    mask[0, 4] = True
    assert region_count(mask) == 2


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_reference(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 5))
    shape = tuple(int(v) for v in rng.integers(6, 14, 2))
    masks = [rng.random(shape) < rng.uniform(0.0, 0.3) for _ in range(n)]
    masks[0][1:3, 1:4] = True  # at least one region
    if seed % 2:  # coarse values: many ties between and within classes
        maps = [rng.integers(0, 6, shape).astype(np.float32) + 2 * m for m in masks]
    else:
        maps = [(rng.random(shape) + rng.uniform(0, 1) * m).astype(np.float32) for m in masks]
    for limit in (0.3, 0.05, 1.0):
        expected = _reference_aupro(masks, maps, limit)
        assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_undefined_and_bad_limit():
    empty = [np.zeros((8, 8), bool)]
    assert math.isnan(aupro(empty, [np.ones((8, 8), np.float32)]))
    assert math.isnan(aupro([np.ones((8, 8), bool)], [np.ones((8, 8), np.float32)]))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([_square_mask()], [np.zeros((16, 16), np.float32)], fpr_limit=0.0)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro([_square_mask()], [np.zeros((16, 16), np.float32)], fpr_limit=1.5)


def test_the_detectors_auroc_matches_scikit_learn_with_ties_and_is_nan_for_one_class() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(size=500) + 0.7 * labels, 1)  # many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert np.isnan(auroc(np.zeros(5), np.arange(5.0)))
    assert np.isnan(auroc(np.ones(5, bool), np.arange(5.0)))
