"""Thresholds and the normalised score, from good images only.

The image threshold is the (1 - false_alarm_rate) quantile of out-of-sample scores of good
images; the pixel threshold is the same quantile of their anomaly-map maxima, so that a good
image's mask is empty as often as its decision is "good". Leave-one-out scores spread less above
their median than new good images' scores do (a training image's own bank rows get stand-ins),
so for them the quantile's distance above the median is widened by ``tail_spread``, and
extrapolated along a normal tail where there are too few images for the quantile to exist.

The normalised score is a logistic map of the raw score that sends the threshold to 0.5, with a
slope set by the spread of good scores, so 0.5 means the same thing for every model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from defectscope.detector.suspects import without_outliers
from defectscope.errors import DefectscopeError

# `Calibration.threshold_source` of thresholds set by the fit's own rule (not by a person).
FIT_SOURCE = "good_quantile"


@dataclass
class Calibration:
    threshold: float
    pixel_threshold: float
    scale: float
    method: str
    false_alarm_rate: float
    threshold_source: str = FIT_SOURCE
    good_scores: list[float] = field(default_factory=list)
    good_pixel_maxima: list[float] = field(default_factory=list)
    tail_spread: float = 1.0  # files written before it existed used the plain quantile

    def quantile_thresholds(self) -> tuple[float, float]:
        """(image, pixel) quantiles of the good values without the tail spread: the unit in
        which a bank's scores are added to another's (the spread moves thresholds, not the
        ranking). The stored thresholds where there are no stored values."""
        if not self.good_scores or self.tail_spread == 1.0:
            return self.threshold, self.pixel_threshold
        q = 1.0 - self.false_alarm_rate
        maxima = self.good_pixel_maxima
        pixel = spread_quantile(maxima, q, 1.0) if maxima else self.pixel_threshold
        return spread_quantile(self.good_scores, q, 1.0), pixel

    def normalize(self, scores: np.ndarray | float, threshold: float | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else float(threshold)
        with np.errstate(over="ignore"):  # extreme overrides overflow to +-inf, clipped below
            z = (np.asarray(scores, dtype=np.float64) - t) / self.scale
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def stats(self) -> dict[str, float]:
        scores = np.asarray(self.good_scores, dtype=np.float64)
        if scores.size == 0:
            return {}
        q = np.quantile(scores, [0.5, 0.9, 0.95, 0.99])
        return {
            "n": int(scores.size),
            "mean": float(scores.mean()),
            "std": float(scores.std()),
            "min": float(scores.min()),
            "max": float(scores.max()),
            "p50": float(q[0]),
            "p90": float(q[1]),
            "p95": float(q[2]),
            "p99": float(q[3]),
        }

    def with_thresholds(
        self, image: float | None = None, pixel: float | None = None, source: str = "user"
    ) -> Calibration:
        for name, value in (("image", image), ("pixel", pixel)):
            if value is not None and not np.isfinite(value):
                raise DefectscopeError(f"{name} threshold must be a finite number, not {value}")
        return Calibration(
            threshold=self.threshold if image is None else float(image),
            pixel_threshold=self.pixel_threshold if pixel is None else float(pixel),
            scale=self.scale,
            method=self.method,
            false_alarm_rate=self.false_alarm_rate,
            threshold_source=source,
            good_scores=list(self.good_scores),
            good_pixel_maxima=list(self.good_pixel_maxima),
            tail_spread=self.tail_spread,
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stats"] = self.stats()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        data = {k: v for k, v in data.items() if k != "stats"}
        return cls(**data)


def threshold_rule(calibration: Mapping[str, Any]) -> str:
    """Where a stored threshold came from, in words, from `Calibration.to_dict` (or a model's
    description of it): the fit's rule with its target and spread, or who set it instead."""
    source = calibration.get("threshold_source", FIT_SOURCE)
    if source != FIT_SOURCE:
        return f"{source} (not the fit's rule)"
    rule = f"{calibration.get('false_alarm_rate', 0):.0%} target on good images"
    rule += f", {calibration.get('method')}"
    spread = calibration.get("tail_spread", 1.0)
    return rule + (f", tail x{spread:g}" if spread != 1.0 else "")


def robust_scale(scores: np.ndarray) -> float:
    """Spread of good scores: MAD (normal-consistent), falling back to std, then to the median."""
    median = float(np.median(scores))
    mad = float(np.median(np.abs(scores - median))) * 1.4826
    for candidate in (mad, float(scores.std()), abs(median) * 0.1):
        if candidate > 1e-12:
            return candidate
    return 1.0


def small_sample_factor(n: int, rate: float) -> float:
    """How much further above the median the (1 - rate) level lies than the largest of ``n``
    values, for a normal tail: with fewer than 1 / rate - 1 values the quantile is the largest
    one, which a new value exceeds about 1 / (n + 1) of the time, not ``rate``."""
    level = 1.0 / (n + 1)
    if level <= rate:
        return 1.0
    normal = NormalDist()
    return normal.inv_cdf(1.0 - rate) / normal.inv_cdf(1.0 - level)


def spread_quantile(values: np.ndarray | list[float], q: float, tail_spread: float) -> float:
    """The q quantile of ``values`` within the outlier fence (`suspects`; rounded up to an
    observed value), its distance above the median multiplied by ``tail_spread`` and, for too
    few values to reach q, by `small_sample_factor` (``tail_spread`` 1: the quantile itself)."""
    # Gross outliers (defective images among the good ones) would move the quantile with them.
    values = without_outliers(values)
    quantile = float(np.quantile(values, q, method="higher"))
    if tail_spread == 1.0:
        return quantile
    median = float(np.median(values))
    factor = tail_spread * small_sample_factor(values.size, 1.0 - q)
    return median + factor * (quantile - median)


def false_alarm_rate(good_scores: Sequence[float] | np.ndarray, threshold: float) -> float:
    """Share of good calibration scores a threshold would flag (score >= threshold, as predict)."""
    scores = np.asarray(good_scores, dtype=np.float64)
    return float((scores >= threshold).mean()) if scores.size else 0.0


def estimated_false_alarm_rate(calibration: Calibration, threshold: float) -> float:
    """The false-alarm rate for which the fit's rule would have put the image threshold at
    ``threshold``: the share of good scores at or above it for the plain quantile; through the
    tail spread otherwise, so that the stored threshold reads as its target, not as 0."""
    scores = np.asarray(calibration.good_scores, dtype=np.float64)
    share = false_alarm_rate(scores, threshold)
    if calibration.tail_spread == 1.0 or scores.size == 0:
        return share

    def rule(rate: float) -> float:
        return spread_quantile(scores, 1.0 - rate, calibration.tail_spread)

    low, high = 1e-6, 0.5  # the rule is non-increasing in the rate
    if threshold >= rule(low):
        return 0.0
    if threshold <= rule(high):
        return share  # in the body of the scores the rule is their quantile
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (low, middle) if rule(middle) <= threshold else (middle, high)
    return max(high, share)


def calibrate(
    good_scores: np.ndarray,
    good_pixel_maxima: np.ndarray,
    false_alarm_rate: float,
    method: str,
    tail_spread: float = 1.0,
) -> Calibration:
    scores = np.asarray(good_scores, dtype=np.float64)
    maxima = np.asarray(good_pixel_maxima, dtype=np.float64)
    if scores.size == 0:
        raise DefectscopeError("calibration needs at least one good image")
    if not (math.isfinite(tail_spread) and tail_spread >= 1.0):
        raise DefectscopeError(f"tail_spread must be a number >= 1, not {tail_spread}")
    q = 1.0 - false_alarm_rate
    return Calibration(
        threshold=spread_quantile(scores, q, tail_spread),
        pixel_threshold=spread_quantile(maxima, q, tail_spread),
        scale=robust_scale(scores),
        method=method,
        false_alarm_rate=false_alarm_rate,
        good_scores=[float(s) for s in scores],
        good_pixel_maxima=[float(m) for m in maxima],
        tail_spread=float(tail_spread),
    )
