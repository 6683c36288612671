"""Anomaly-detection metrics on plain numpy arrays.

Conventions: label 0 is good, 1 is defective; a higher score means more anomalous; a score
``>= threshold`` is called anomalous.

Degenerate input:

* Malformed input raises ``ValueError`` with a message that says what is wrong: empty input,
  mismatched lengths or shapes, labels other than 0/1, NaN scores or maps.
* Image-level metrics that need both classes (``image_auroc``, ``roc_curve_points``) raise
  ``ValueError`` when only one class is present; ``f1_max`` raises when there is no defective
  image (F1 is undefined without positives).
* Pixel-level metrics return NaN when they are undefined for the data rather than wrong input:
  ``pixel_auroc`` without any defect pixel or without any normal pixel, ``aupro`` without any
  ground-truth region or without any normal pixel. A test set of good images only is a valid
  thing to evaluate; it simply has no localisation metrics.
* Precision, recall and false-alarm rate in ``threshold_metrics`` are NaN when their
  denominator is zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from defectscope.detector.ranking import mann_whitney_auc

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- validation


def _labels_and_scores(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray):
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D; got shapes {y.shape} and {s.shape}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if y.size != s.size:
        raise ValueError(f"got {y.size} labels but {s.size} scores")
    if y.dtype != np.bool_ and not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5].tolist()
        raise ValueError(f"labels must be 0 (good) or 1 (defective); found {bad}")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} score(s) are NaN")
    return y.astype(bool), s


def _require_both_classes(y: np.ndarray, metric: str) -> None:
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        only = "defective (1)" if positives else "good (0)"
        raise ValueError(
            f"{metric} needs both good (0) and defective (1) images; all {y.size} are {only}"
        )


def _masks_and_maps(
    masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    masks = list(masks)
    maps = list(maps)
    if not maps:
        raise ValueError("no anomaly maps given")
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} anomaly maps")
    out_masks, out_maps = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps, strict=True)):
        mask = np.asarray(mask)
        amap = np.asarray(amap)
        if amap.ndim != 2:
            raise ValueError(f"anomaly map {i} must be 2-D (H, W); got shape {amap.shape}")
        if mask.shape != amap.shape:
            raise ValueError(
                f"mask {i} has shape {mask.shape} but its anomaly map has shape {amap.shape}"
            )
        if not np.issubdtype(amap.dtype, np.floating):
            amap = amap.astype(np.float32)
        if np.isnan(amap).any():
            raise ValueError(f"anomaly map {i} contains NaN")
        out_masks.append(mask.astype(bool, copy=False))
        out_maps.append(amap)
    return out_masks, out_maps


def _common_float(maps: Sequence[np.ndarray]) -> np.dtype:
    # float32 maps stay float32: half the memory and faster sorts for 26M+ pixels.
    return np.result_type(np.float32, *[m.dtype for m in maps])


# --------------------------------------------------------------------------- image level


def image_auroc(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Area under the ROC curve of image scores; ties count one half.

    Raises ``ValueError`` when only one class is present.
    """
    y, s = _labels_and_scores(labels, scores)
    _require_both_classes(y, "image AUROC")
    return mann_whitney_auc(s[y], s[~y])


def roc_curve_points(
    labels: Sequence | np.ndarray, scores: Sequence | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` of the ROC curve, starting at (0, 0), for plotting.

    ``thresholds[i]`` is the score cut giving ``(fpr[i], tpr[i])`` with ``score >= threshold``;
    the first threshold is ``+inf``. Raises ``ValueError`` when only one class is present.
    """
    y, s = _labels_and_scores(labels, scores)
    _require_both_classes(y, "a ROC curve")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # One point per distinct score: the last index of each block of ties.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[ends]
    fp = np.cumsum(~y_sorted)[ends]
    fpr = np.r_[0.0, fp / fp[-1]]
    tpr = np.r_[0.0, tp / tp[-1]]
    thresholds = np.r_[np.inf, s_sorted[ends]]
    return fpr, tpr, thresholds


def f1_max(labels: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold that reaches it.

    The threshold is one of the scores, so ``scores >= threshold`` reproduces the F1 exactly;
    among equally good thresholds the highest is returned. Raises ``ValueError`` when there is
    no defective image.
    """
    y, s = _labels_and_scores(labels, scores)
    positives = int(y.sum())
    if positives == 0:
        raise ValueError(f"F1 needs at least one defective (1) image; all {y.size} are good (0)")
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[ends]
    predicted = ends + 1
    f1 = 2.0 * tp / (predicted + positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(s_sorted[ends[best]])


def threshold_metrics(
    labels: Sequence | np.ndarray,
    scores: Sequence | np.ndarray | None = None,
    threshold: float | None = None,
    *,
    decisions: Sequence | np.ndarray | None = None,
) -> dict[str, float]:
    """Confusion counts and rates of one decision rule.

    Give either ``scores`` and ``threshold`` (anomalous when ``score >= threshold``) or the
    boolean ``decisions`` directly. Rates whose denominator is zero are NaN.
    """
    if decisions is None:
        if scores is None or threshold is None:
            raise ValueError("give either scores and threshold, or decisions")
        y, s = _labels_and_scores(labels, scores)
        if math.isnan(float(threshold)):
            raise ValueError("threshold is NaN")
        predicted = s >= float(threshold)
    else:
        y, d = _labels_and_scores(labels, np.asarray(decisions, dtype=np.float64))
        predicted = d != 0
    tp = int(np.sum(predicted & y))
    fp = int(np.sum(predicted & ~y))
    fn = int(np.sum(~predicted & y))
    tn = int(np.sum(~predicted & ~y))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / y.size,
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "false_alarm_rate": _ratio(fp, fp + tn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator) / denominator if denominator else float("nan")


# --------------------------------------------------------------------------- pixel level


def pixel_auroc(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> float:
    """AUROC over all pixels of all images (exact, ties count one half).

    ``masks`` are boolean ground truths (all False for good images), ``maps`` the anomaly maps
    of the same shapes. NaN when there is no defect pixel or no normal pixel.
    """
    masks, maps = _masks_and_maps(masks, maps)
    dtype = _common_float(maps)
    positives = np.concatenate([m[k] for m, k in zip(maps, masks, strict=True)]).astype(dtype)
    negatives = np.concatenate([m[~k] for m, k in zip(maps, masks, strict=True)]).astype(dtype)
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    return mann_whitney_auc(positives, negatives)


def aupro(masks: Sequence[np.ndarray], maps: Sequence[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD).

    Regions are the 8-connected components of each ground-truth mask. For every threshold
    the PRO is the mean, over all regions of all images, of the fraction of the region at or
    above the threshold; the FPR is the fraction of all normal pixels (of all images) at or
    above it. The area under PRO(FPR) from 0 to ``fpr_limit`` (interpolated at the limit) is
    divided by ``fpr_limit``, so a perfect map scores 1.

    Exact: it gives the same curve as MVTec's official evaluation code (every distinct score
    is a threshold), but sorts only the top ``fpr_limit`` share of the normal pixels.
    NaN when there is no ground-truth region or no normal pixel.
    """
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    masks, maps = _masks_and_maps(masks, maps)
    dtype = _common_float(maps)

    normal_parts, region_values, region_weights = [], [], []
    n_regions = 0
    for mask, amap in zip(masks, maps, strict=True):
        if not mask.any():
            normal_parts.append(amap.ravel())
            continue
        labeled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        inside = labeled > 0
        normal_parts.append(amap[~inside])
        ids = labeled[inside]
        # Each pixel carries 1/size of its region, so summing pixels over a threshold gives
        # the region's overlap fraction.
        region_weights.append(1.0 / np.bincount(ids)[ids])
        region_values.append(amap[inside])
        n_regions += count
    normals = np.concatenate(normal_parts).astype(dtype, copy=False)
    if n_regions == 0 or normals.size == 0:
        return float("nan")

    # Only thresholds with FPR up to the first one reaching the limit matter: take the top
    # k normal pixels (plus all ties of the k-th) instead of sorting all of them.
    n_normal = normals.size
    k = min(n_normal, math.ceil(fpr_limit * n_normal) + 1)
    kth = np.partition(normals, n_normal - k)[n_normal - k]
    top = np.sort(normals[normals >= kth])[::-1]
    del normals
    starts = np.flatnonzero(np.r_[True, top[1:] != top[:-1]])
    values = top[starts]  # distinct normal scores, descending
    counts_ge = np.r_[starts[1:], top.size]  # normal pixels >= each value
    fpr = counts_ge / n_normal

    d_values = np.concatenate(region_values).astype(dtype, copy=False)
    d_weights = np.concatenate(region_weights)
    order = np.argsort(d_values, kind="stable")
    d_values = d_values[order]
    suffix = np.r_[np.cumsum(d_weights[order][::-1])[::-1], 0.0] / n_regions
    pro_ge = suffix[np.searchsorted(d_values, values, side="left")]
    pro_gt = suffix[np.searchsorted(d_values, values, side="right")]

    # Between two distinct normal scores only PRO moves (vertical steps, no area), so the curve's
    # area is a sum of segments, one per distinct normal score v: from (FPR above v, PRO above v)
    # to (FPR at v, PRO at v). Ties between normal and defect scores land in the same segment.
    x0 = np.r_[0.0, fpr[:-1]]
    x1 = fpr
    y0 = pro_gt
    y1 = pro_ge
    full = x1 <= fpr_limit
    area = float(np.sum((x1[full] - x0[full]) * (y0[full] + y1[full]) / 2.0))
    crossing = np.flatnonzero((x0 < fpr_limit) & (x1 > fpr_limit))
    if crossing.size:
        i = int(crossing[0])
        y_lim = y0[i] + (y1[i] - y0[i]) * (fpr_limit - x0[i]) / (x1[i] - x0[i])
        area += (fpr_limit - x0[i]) * (y0[i] + y_lim) / 2.0
    return float(area / fpr_limit)


def region_count(mask: np.ndarray) -> int:
    """Number of 8-connected defect regions in a ground-truth mask."""
    return int(ndimage.label(np.asarray(mask, dtype=bool), structure=_EIGHT_CONNECTED)[1])
