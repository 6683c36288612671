"""A second model at half the input size, added to the default one: what a bank per scale is worth.

    python benchmarks/two_scales.py [--json benchmarks/results/two_scales.json]
                                    [--categories a,b] [--weights 0.25,0.5,1]
                                    [--factor 0.5] [--base-half-bank]
                                    [--data-root DIR] [--synthetic-root DIR]

Per category: the default fit (auto mode), then a second fit on the same training images with the
configuration the first one chose, auto mode off, and the input at half its size (its own
coreset, bank and leave-one-out calibration, on its own coarser grid). Both score every test
image; for each weight w the image score is s_full / t_full + w * s_half / t_half and the map
m_full / p_full + w * m_half / p_half (t, p: each model's image and pixel thresholds), so each
model counts in units of its own good images. The stored threshold of the sum is the same
quantile of the two models' leave-one-out scores of the same training images, added the same
way: recall and false alarms use only good training images, as a fit would.
Weight 0 is the first model alone. This measured the design before it was built: the default
now has its own half-size bank (`features.half_size_bank`, on the input averaged 2x2), so both
fits here turn it off. With ``--base-half-bank`` the first fit keeps it (the default as built)
and ``--factor 0.25`` makes the second model a third, quarter-size scale.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import SHARED, by_metric, category_roots, write_results

from defectscope.data.datasets import load_mask, open_dataset
from defectscope.detector.detector import Detector
from defectscope.evaluation import metrics as M
from defectscope.experiment import compose

METRICS = ("image_auroc", "pixel_auroc", "aupro", "recall", "false_alarm_rate")


def scaled_input(size: tuple[int, int], multiple: int = 32, factor: float = 0.5) -> tuple[int, int]:
    """``factor`` of ``size``, each side a multiple of what the backbone takes (at least 64)."""
    return tuple(max(64, round(side * factor / multiple) * multiple) for side in size)  # type: ignore[return-value]


def scores_and_maps(
    detector: Detector, samples: list[Any]
) -> tuple[np.ndarray, list[np.ndarray], float]:
    """Image scores, maps at each image's size, and the predict time in ms per image."""
    start = time.perf_counter()
    predictions = detector.predict([s.path for s in samples])
    ms = (time.perf_counter() - start) * 1000.0 / max(1, len(samples))
    return np.array([p.score for p in predictions]), [p.anomaly_map for p in predictions], ms


def run_category(
    root: Path, weights: list[float], factor: float = 0.5, base_half_bank: bool = False
) -> dict[str, Any]:
    dataset = open_dataset(root)
    train = [s.path for s in dataset.train]
    test = list(dataset.test)
    start = time.perf_counter()
    # One bank: the default's own half-size bank is what this script measured before it existed.
    overrides = [] if base_half_bank else ["detector.features.half_size_bank=0"]
    full = Detector(compose(None, overrides).detector).fit(train)
    full_s = time.perf_counter() - start
    config = full.config.model_copy(deep=True)
    config.features.input_size = scaled_input(
        config.features.input_size, full.backbone_input_multiple(), factor
    )
    config.features.half_size_bank = 0.0
    config.auto.enabled = False
    start = time.perf_counter()
    half = Detector(config).fit(train)
    half_s = time.perf_counter() - start

    labels = np.array([s.label for s in test])
    full_scores, full_maps, full_ms = scores_and_maps(full, test)
    half_scores, half_maps, half_ms = scores_and_maps(half, test)
    has_masks = all(s.label == 0 or s.mask_path is not None for s in test)
    masks = (
        [
            np.asarray(load_mask(s, shape=m.shape), bool)
            for s, m in zip(test, full_maps, strict=True)
        ]
        if has_masks
        else None
    )
    assert full.calibration is not None and half.calibration is not None  # both are fitted
    good_full = np.asarray(full.calibration.good_scores)
    good_half = np.asarray(half.calibration.good_scores)
    if good_full.size != good_half.size:
        raise SystemExit(f"{root}: the two calibrations scored different training images")
    quantile = 1.0 - full.calibration.false_alarm_rate
    row: dict[str, Any] = {
        "input": list(full.config.features.input_size),
        "half_input": list(config.features.input_size),
        "chosen": (full.info.selection or {}).get("chosen"),
        "fit_s": {"default": round(full_s, 2), "half": round(half_s, 2)},
        "predict_ms_per_image": {"default": round(full_ms, 1), "half": round(half_ms, 1)},
        "half_alone_image_auroc": round(M.image_auroc(labels, half_scores), 4),
        "weights": {},
    }
    for weight in [0.0, *weights]:
        scores = full_scores / full.threshold + weight * half_scores / half.threshold
        good = good_full / full.threshold + weight * good_half / half.threshold
        decided = scores >= float(np.quantile(good, quantile, method="higher"))
        entry = {
            "image_auroc": M.image_auroc(labels, scores),
            "recall": float(decided[labels == 1].mean()),
            "false_alarm_rate": float(decided[labels == 0].mean()),
        }
        if masks is not None:
            maps = [
                a / full.pixel_threshold + weight * b / half.pixel_threshold
                for a, b in zip(full_maps, half_maps, strict=True)
            ]
            entry["pixel_auroc"] = M.pixel_auroc(masks, maps)
            entry["aupro"] = M.aupro(masks, maps)
        row["weights"][str(weight)] = {k: round(float(v), 4) for k, v in entry.items()}
        print(root.name, f"w={weight}", row["weights"][str(weight)], flush=True)
    return row


def summarize(rows: dict[str, dict], weight: str) -> dict[str, Any]:
    """Mean over categories and the worst category of each metric, for one weight."""
    return by_metric({name: row["weights"][weight] for name, row in rows.items()}, METRICS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--categories", default=None, help="comma-separated; default: all")
    parser.add_argument("--weights", default="0.25,0.5,1", help="weights of the half-size model")
    parser.add_argument("--factor", type=float, default=0.5, help="second model's input scale")
    parser.add_argument(
        "--base-half-bank", action="store_true", help="the first fit keeps its half-size bank"
    )
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument(
        "--synthetic-root", type=Path, default=Path.home() / ".cache" / "defectscope-bench"
    )
    args = parser.parse_args()
    names = args.categories.split(",") if args.categories else None
    weights = [float(w) for w in args.weights.split(",")]
    roots = category_roots(names, args.data_root, args.synthetic_root)
    rows = {
        name: run_category(root, weights, args.factor, args.base_half_bank)
        for name, root in roots.items()
    }
    summary = {w: summarize(rows, w) for w in rows[next(iter(rows))]["weights"]}
    for weight, metrics in summary.items():
        cells = [
            f"{m} {v['mean']:.3f} / {v['worst']:.3f} ({v['worst_category']})"
            for m, v in metrics.items()
        ]
        print(f"w={weight}: " + " | ".join(cells))
    write_results(args.json, "benchmarks/two_scales.py", {"categories": rows, "summary": summary})


if __name__ == "__main__":
    main()
