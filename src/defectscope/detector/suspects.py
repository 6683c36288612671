"""Training images that score like defects: gross outliers among the fit's out-of-sample scores.

A folder of "good" images from a line often holds a few defective parts. Their leave-one-out
scores stand far above the rest, and thresholds taken as a 1 % quantile of them would rise with
them (of 200 images the second highest decides): on MVTec AD bottle, three defective images
among 209 good ones cut recall at the stored threshold from 1.00 to 0.10, six to 0.09. So the
thresholds come from the scores within a fence far above the good ones' spread, and the fit
names the images beyond it for a person to check. Their patches stay in the memory bank, where
they can hide defects like themselves; `fit.drop_suspects` fits once more without them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector

# The fence: this many interquartile ranges above the upper quartile. Good images of the
# benchmark's products reach at most 5.3 (two odd ones of screw's 320 more); defective bottle
# images among good ones 6.1-12.9.
OUTLIER_IQRS = 6.0
# Below this many scores the quartiles say too little to call one an outlier.
MIN_SCORES = 20
MAX_NAMED = 20


def outlier_fence(values: Sequence[float] | np.ndarray) -> float:
    """The score above which a good image is an outlier (inf: none can be)."""
    scores = np.asarray(values, dtype=np.float64)
    if scores.size < MIN_SCORES:
        return math.inf
    q1, q3 = np.percentile(scores, [25, 75])
    spread = float(q3 - q1)
    return float(q3) + OUTLIER_IQRS * spread if spread > 0 else math.inf


def without_outliers(values: Sequence[float] | np.ndarray) -> np.ndarray:
    scores = np.asarray(values, dtype=np.float64)
    return scores[scores <= outlier_fence(scores)]


def suspect_images(
    scores: Sequence[float], images: Sequence[tuple[int, str]]
) -> list[dict[str, Any]]:
    """The images beyond the fence, highest score first (at most `MAX_NAMED`), by name and
    training index; none where ``images`` (index, name) do not match the scores one by one
    (a calibration not made per image)."""
    if len(images) != len(scores):
        return []
    fence = outlier_fence(scores)
    found = sorted(
        ((float(s), i, n) for s, (i, n) in zip(scores, images, strict=True) if s > fence),
        reverse=True,
    )
    return [
        {"name": name, "index": index, "score": round(score, 4)}
        for score, index, name in found[:MAX_NAMED]
    ]


def calibration_images(shards: Sequence[Any]) -> list[tuple[int, str]]:
    """(training index, name) of each calibration image of a fit's shards, in the order of
    its scores."""
    by_id = {i: n for s in shards for i, n in zip(s.image_ids, s.names, strict=True)}
    return [(i, by_id.get(i) or f"image {i}") for s in shards for i in s.calibration_ids]


_T = TypeVar("_T")


class WithoutImages(Sequence[_T]):
    """``images`` less the training indices ``dropped``, without reading any image: a lazy
    sequence (decoded on access) stays lazy."""

    def __init__(self, images: Sequence[_T], dropped: set[int]) -> None:
        self._images = images
        self._kept = [i for i in range(len(images)) if i not in dropped]

    def __len__(self) -> int:
        return len(self._kept)

    def renumber(self, records: list[dict[str, Any]]) -> None:
        """Give suspect ``records`` of a fit on this sequence the indices of ``images``."""
        for record in records:
            if "index" in record:
                record["index"] = self._kept[int(record["index"])]

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[_T]: ...
    def __getitem__(self, index: int | slice) -> _T | Sequence[_T]:
        if isinstance(index, slice):
            return [self._images[i] for i in self._kept[index]]
        return self._images[self._kept[index]]


def dropped_indices(suspects: Sequence[dict[str, Any]]) -> set[int]:
    """The training indices of ``suspects`` (records without one, from older files, are not
    dropped)."""
    return {int(s["index"]) for s in suspects if "index" in s}


def fit_without_suspects(
    images: Sequence[_T],
    suspects: list[dict[str, Any]],
    fit: Callable[[Sequence[_T]], Detector],
) -> Detector | None:
    """``fit`` on ``images`` less ``suspects`` (`fit.drop_suspects`, local or Ray): the detector
    it returns, with them under ``training.dropped`` and its own suspects numbered as in
    ``images``; None where none can be dropped."""
    drop = dropped_indices(suspects)
    if not drop:
        return None
    kept = WithoutImages(images, drop)
    detector = fit(kept)
    kept.renumber(detector.info.training.suspects)
    detector.info.training.dropped = list(suspects)
    return detector
