"""Run a detector over a dataset's test split and compute every metric.

The runner is duck-typed: the dataset needs ``.test`` (samples with ``.path``, ``.label``,
``.defect_type``, ``.mask_path``); the detector needs ``predict(paths)``, ``threshold`` and
optionally ``pixel_threshold``, ``config.batch_size`` and ``describe()``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from defectscope.evaluation import metrics as M
from defectscope.evaluation.result import (
    NAN,
    DefectTypeMetrics,
    EvaluationResult,
    ImageRecord,
    Overlay,
    jsonable,
)

GOOD = "good"
# Pixel metrics need every map at once; above this many pixels the maps are subsampled
# (100M float32 pixels is ~400 MiB, and pixel AUROC plus AUPRO on it take ~10 s).
DEFAULT_MAX_METRIC_PIXELS = 100_000_000
# Longest side of the images kept for the report's overlay grid.
OVERLAY_SIDE = 512

ProgressCallback = Callable[[int, int], None]


@dataclass
class _PixelEntry:
    index: int  # into the records
    anomaly_map: np.ndarray
    ground_truth: np.ndarray


def evaluate(
    detector: Any,
    dataset: Any,
    *,
    batch_size: int | None = None,
    progress: ProgressCallback | None = None,
    max_overlays: int = 16,
    fpr_limit: float = 0.3,
    max_metric_pixels: int = DEFAULT_MAX_METRIC_PIXELS,
) -> EvaluationResult:
    """Predict every image of ``dataset.test`` and compute image and pixel metrics.

    ``progress(done, total)`` is called after each batch. Pixel metrics use only good images
    and defective images that have a mask; they are NaN (with a note) when no mask exists.
    Only ``max_overlays`` images' maps are kept in the result, for the report.
    """
    samples = list(getattr(dataset, "test", None) or [])
    if not samples:
        from defectscope.errors import DatasetError

        raise DatasetError("the dataset's test split is empty: nothing to evaluate")
    batch_size = _batch_size(detector, batch_size)
    total = len(samples)
    notes: list[str] = []

    records: list[ImageRecord] = []
    pixel_entries: list[_PixelEntry] = []
    overlay_pool = _OverlayPool(max_overlays)
    timing_sums: dict[str, float] = {}
    subsampled = 0
    threshold = _float_attr(detector, "threshold")
    pixel_threshold = _float_attr(detector, "pixel_threshold")
    predict_seconds = 0.0
    started = time.perf_counter()

    for start in range(0, total, batch_size):
        batch = samples[start : start + batch_size]
        tic = time.perf_counter()
        predictions = list(detector.predict([s.path for s in batch]))
        predict_seconds += time.perf_counter() - tic
        if len(predictions) != len(batch):
            raise RuntimeError(
                f"detector returned {len(predictions)} predictions for {len(batch)} images"
            )
        for sample, prediction in zip(batch, predictions, strict=True):
            index = len(records)
            amap = np.asarray(prediction.anomaly_map, dtype=np.float32)
            if amap.ndim != 2:
                raise ValueError(f"{sample.path}: anomaly map has shape {amap.shape}, not (H, W)")
            if pixel_threshold is None:
                pixel_threshold = _finite_or_none(getattr(prediction, "pixel_threshold", None))
            if threshold is None:
                threshold = _finite_or_none(getattr(prediction, "threshold", None))
            predicted = _fit_mask(np.asarray(prediction.mask, dtype=bool), amap.shape)
            label = int(sample.label)
            has_mask = label == 0 or sample.mask_path is not None
            truth = _load_mask(sample, amap.shape) if has_mask else None
            records.append(_record(sample, prediction, predicted, truth))
            for key, value in (getattr(prediction, "timings", None) or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    timing_sums[key] = timing_sums.get(key, 0.0) + float(value)
            if truth is not None:
                step = _subsample_step(amap.shape, total, max_metric_pixels)
                subsampled += step > 1
                pixel_entries.append(
                    _PixelEntry(
                        index,
                        np.ascontiguousarray(amap[::step, ::step]),
                        np.ascontiguousarray(truth[::step, ::step]),
                    )
                )
            overlay_pool.offer(index, records[index], amap, predicted, truth)
        if progress is not None:
            progress(min(start + len(batch), total), total)

    loop_seconds = time.perf_counter() - started
    if subsampled:
        notes.append(
            f"pixel metrics computed on subsampled maps for {subsampled} image(s) to stay "
            f"under {max_metric_pixels:,} pixels"
        )
    metrics_tic = time.perf_counter()
    overall = _overall_metrics(records, pixel_entries, fpr_limit, notes)
    per_defect = _per_defect_metrics(records, pixel_entries, fpr_limit, notes)
    del pixel_entries
    metrics_seconds = time.perf_counter() - metrics_tic

    n = len(records)
    timings = {
        "total_s": loop_seconds + metrics_seconds,
        "predict_s": predict_seconds,
        "ms_per_image": 1000.0 * predict_seconds / n,
        "images_per_s": n / predict_seconds if predict_seconds > 0 else NAN,
        "load_masks_and_bookkeeping_s": loop_seconds - predict_seconds,
        "metrics_s": metrics_seconds,
        "batch_size": batch_size,
    }
    for key, value in sorted(timing_sums.items()):
        timings[f"mean_{key}"] = value / n

    return EvaluationResult(
        threshold=NAN if threshold is None else threshold,
        pixel_threshold=NAN if pixel_threshold is None else pixel_threshold,
        fpr_limit=fpr_limit,
        per_defect=per_defect,
        records=records,
        timings=timings,
        context=_context(detector, dataset, n),
        notes=notes,
        overlays=overlay_pool.build(samples),
        **overall,
    )


# --------------------------------------------------------------------------- per image


def _record(sample: Any, prediction: Any, predicted: np.ndarray, truth: np.ndarray | None):
    label = int(sample.label)
    iou = NAN
    defect_area = NAN
    if truth is not None:
        defect_area = float(truth.mean())
        if label == 1:
            union = np.logical_or(predicted, truth).sum()
            iou = float(np.logical_and(predicted, truth).sum() / union) if union else NAN
    return ImageRecord(
        source=str(sample.path),
        defect_type=str(sample.defect_type),
        label=label,
        score=float(prediction.score),
        normalized_score=float(getattr(prediction, "normalized_score", NAN)),
        is_anomalous=bool(prediction.is_anomalous),
        has_mask=truth is not None,
        defect_area=defect_area,
        predicted_area=float(predicted.mean()) if predicted.size else NAN,
        iou=iou,
    )


def _load_mask(sample: Any, shape: tuple[int, int]) -> np.ndarray:
    load_mask: Callable[..., np.ndarray] | None
    try:
        from defectscope.data.datasets import load_mask
    except ImportError:  # the datasets module is optional for duck-typed datasets
        load_mask = None
    if load_mask is not None:
        mask = np.asarray(load_mask(sample, shape=shape), dtype=bool)
    elif int(sample.label) == 0 or sample.mask_path is None:
        mask = np.zeros(shape, dtype=bool)
    else:
        from PIL import Image

        with Image.open(sample.mask_path) as image:
            mask = np.asarray(image.convert("L")) > 0
    return _fit_mask(mask, shape)


def _fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from defectscope.visualize import resize_mask

    return resize_mask(mask, shape) if mask.shape != tuple(shape) else mask


def _subsample_step(shape: tuple[int, int], n_images: int, budget: int) -> int:
    pixels = shape[0] * shape[1] * n_images
    return 1 if pixels <= budget else math.ceil(math.sqrt(pixels / budget))


# --------------------------------------------------------------------------- metrics


def _overall_metrics(
    records: list[ImageRecord], pixels: list[_PixelEntry], fpr_limit: float, notes: list[str]
) -> dict[str, Any]:
    labels = np.array([r.label for r in records], dtype=int)
    scores = np.array([r.score for r in records], dtype=np.float64)
    decisions = np.array([r.is_anomalous for r in records], dtype=bool)
    n_good = int((labels == 0).sum())
    n_bad = int((labels == 1).sum())

    auroc = _safe(M.image_auroc, labels, scores, notes=notes, what="image AUROC")
    if n_bad:
        f1, f1_threshold = M.f1_max(labels, scores)
    else:
        f1, f1_threshold = NAN, NAN
    at_threshold = M.threshold_metrics(labels, decisions=decisions)
    if n_good == 0:
        notes.append("the test split has no good images: false-alarm rate and AUROC undefined")
    if n_bad == 0:
        notes.append("the test split has no defective images: recall and F1 undefined")

    with_masks = [e for e in pixels if records[e.index].label == 1]
    missing = sum(1 for r in records if r.label == 1 and not r.has_mask)
    if n_bad and not with_masks:
        notes.append("no ground-truth masks: pixel AUROC and AUPRO not computed")
        pixel_auroc = aupro = NAN
    else:
        if missing:
            notes.append(
                f"{missing} defective image(s) without a mask are left out of pixel metrics"
            )
        pixel_auroc, aupro = _pixel_metrics(pixels, fpr_limit)
    ious = [r.iou for r in records if r.label == 1 and math.isfinite(r.iou)]
    return {
        "image_auroc": auroc,
        "pixel_auroc": pixel_auroc,
        "aupro": aupro,
        "f1_max": f1,
        "f1_threshold": f1_threshold,
        "accuracy": at_threshold["accuracy"],
        "precision": at_threshold["precision"],
        "recall": at_threshold["recall"],
        "false_alarm_rate": at_threshold["false_alarm_rate"],
        "confusion": {k: at_threshold[k] for k in ("tp", "fp", "tn", "fn")},
        "mean_defect_iou": float(np.mean(ious)) if ious else NAN,
    }


def _per_defect_metrics(
    records: list[ImageRecord], pixels: list[_PixelEntry], fpr_limit: float, notes: list[str]
) -> dict[str, DefectTypeMetrics]:
    good = [i for i, r in enumerate(records) if r.label == 0]
    types = sorted({r.defect_type for r in records if r.label == 1})
    out: dict[str, DefectTypeMetrics] = {}
    if good:
        out[GOOD] = DefectTypeMetrics(
            defect_type=GOOD,
            count=len(good),
            mean_score=float(np.mean([records[i].score for i in good])),
            with_mask=len(good),
            flagged_rate=float(np.mean([records[i].is_anomalous for i in good])),
        )
    good_pixels = [e for e in pixels if records[e.index].label == 0]
    for defect_type in types:
        members = [
            i for i, r in enumerate(records) if r.label == 1 and r.defect_type == defect_type
        ]
        row = DefectTypeMetrics(
            defect_type=defect_type,
            count=len(members),
            mean_score=float(np.mean([records[i].score for i in members])),
            with_mask=sum(records[i].has_mask for i in members),
            flagged_rate=float(np.mean([records[i].is_anomalous for i in members])),
        )
        if good:
            subset = good + members
            row.image_auroc = M.image_auroc(
                [records[i].label for i in subset], [records[i].score for i in subset]
            )
            type_pixels = [
                e
                for e in pixels
                if records[e.index].label == 1 and records[e.index].defect_type == defect_type
            ]
            if type_pixels:
                row.pixel_auroc, row.aupro = _pixel_metrics(good_pixels + type_pixels, fpr_limit)
        out[defect_type] = row
    if types and not good:
        notes.append("per-defect AUROC needs good test images; none were found")
    return out


def _pixel_metrics(entries: Sequence[_PixelEntry], fpr_limit: float) -> tuple[float, float]:
    if not entries:
        return NAN, NAN
    masks = [e.ground_truth for e in entries]
    maps = [e.anomaly_map for e in entries]
    return M.pixel_auroc(masks, maps), M.aupro(masks, maps, fpr_limit=fpr_limit)


def _safe(fn: Callable[..., float], *args: Any, notes: list[str], what: str) -> float:
    try:
        return fn(*args)
    except ValueError as exc:
        notes.append(f"{what} not computed: {exc}")
        return NAN


# --------------------------------------------------------------------------- overlays


class _OverlayPool:
    """Keeps, while streaming, the few candidates for each kind of interesting image.

    Kinds: highest-scored defects (are they found where they are?), lowest-scored defects
    (the misses), highest-scored good images (the false alarms).
    """

    KINDS = (
        ("highest-scored defect", 1, -1.0),
        ("lowest-scored defect", 1, 1.0),
        ("highest-scored good", 0, -1.0),
    )

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.ranked: dict[str, list[tuple[float, int]]] = {kind: [] for kind, _, _ in self.KINDS}
        self.data: dict[int, tuple[ImageRecord, np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def offer(
        self,
        index: int,
        record: ImageRecord,
        amap: np.ndarray,
        predicted: np.ndarray,
        truth: np.ndarray | None,
    ) -> None:
        if not self.limit:
            return
        wanted = False
        for kind, label, sign in self.KINDS:
            if record.label != label:
                continue
            ranked = self.ranked[kind]
            ranked.append((sign * record.score, index))
            ranked.sort()
            if len(ranked) > self.limit:
                ranked.pop()
            wanted |= any(i == index for _, i in ranked)
        if wanted:
            self.data[index] = (record, *_shrink(amap, predicted, truth))
        keep = {i for ranked in self.ranked.values() for _, i in ranked}
        for stale in set(self.data) - keep:
            del self.data[stale]

    def build(self, samples: Sequence[Any]) -> list[Overlay]:
        if not self.limit:
            return []
        base, extra = divmod(self.limit, len(self.KINDS))
        quotas = [base + (1 if k < extra else 0) for k in range(len(self.KINDS))]
        chosen: list[tuple[str, int]] = []
        taken: set[int] = set()
        queues = [[i for _, i in self.ranked[kind]] for kind, _, _ in self.KINDS]
        for (kind, _, _), queue, quota in zip(self.KINDS, queues, quotas, strict=True):
            picked = [i for i in queue if i not in taken][:quota]
            taken.update(picked)
            chosen.extend((kind, i) for i in picked)
        # Hand unused quota to the kinds that still have candidates.
        for (kind, _, _), queue in zip(self.KINDS, queues, strict=True):
            for i in queue:
                if len(chosen) >= self.limit:
                    break
                if i not in taken:
                    taken.add(i)
                    chosen.append((kind, i))
        order = {kind: k for k, (kind, _, _) in enumerate(self.KINDS)}
        chosen.sort(key=lambda item: (order[item[0]], queues[order[item[0]]].index(item[1])))
        return [self._overlay(kind, i, samples[i]) for kind, i in chosen]

    def _overlay(self, kind: str, index: int, sample: Any) -> Overlay:
        from defectscope.data.io import load_image

        record, amap, predicted, truth = self.data[index]
        try:
            image = _resize_image(load_image(sample.path), amap.shape)
        except Exception:  # the report still shows the map if the image vanished
            image = np.zeros((*amap.shape, 3), dtype=np.uint8)
        return Overlay(
            source=record.source,
            defect_type=record.defect_type,
            label=record.label,
            score=record.score,
            reason=kind,
            image=image,
            anomaly_map=amap,
            predicted_mask=predicted,
            ground_truth=truth,
        )


def _shrink(amap: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None):
    from defectscope.visualize import resize_map, resize_mask

    height, width = amap.shape
    scale = min(1.0, OVERLAY_SIDE / max(height, width))
    shape = (max(1, round(height * scale)), max(1, round(width * scale)))
    small_truth = None if truth is None else resize_mask(truth, shape).copy()
    return resize_map(amap, shape).copy(), resize_mask(predicted, shape).copy(), small_truth


def _resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == tuple(shape):
        return image
    from PIL import Image

    resized = Image.fromarray(image).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized)


# --------------------------------------------------------------------------- context


def _batch_size(detector: Any, batch_size: int | None) -> int:
    if batch_size is None:
        batch_size = getattr(getattr(detector, "config", None), "batch_size", None) or 16
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    return batch_size


def _float_attr(obj: Any, name: str) -> float | None:
    return _finite_or_none(getattr(obj, name, None))


def _finite_or_none(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _context(detector: Any, dataset: Any, n_images: int) -> dict[str, Any]:
    from defectscope.version import __version__

    context: dict[str, Any] = {
        "defectscope_version": __version__,
        "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "test_images": n_images,
    }
    describe = getattr(detector, "describe", None)
    if callable(describe):
        try:
            context["detector"] = jsonable(describe())
        except Exception as exc:  # a broken describe() must not lose a finished evaluation
            context["detector"] = {"error": f"describe() failed: {exc}"}
    summary = getattr(dataset, "summary", None)
    if callable(summary):
        try:
            context["dataset"] = jsonable(summary())
        except Exception as exc:
            context["dataset"] = {"error": f"summary() failed: {exc}"}
    else:
        context["dataset"] = jsonable(
            {
                "name": getattr(dataset, "name", None),
                "root": str(getattr(dataset, "root", "")) or None,
                "layout": getattr(dataset, "layout", None),
            }
        )
    return context
