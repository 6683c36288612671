"""How many training images the threshold needs: thresholds from random samples of the
calibration scores, against the one from every training image.

    python benchmarks/calibration_sample.py [--categories bottle,screw,...] [--sizes 50,100,200,400]
        [--draws 200] [--json benchmarks/results/calibration_sample.json] [key=value overrides]

Each category is fitted once with the defaults, every training image in the calibration sample.
A leave-one-out score does not depend on which other images are in the sample (the bank is the
same), so the threshold a fit with ``calibration.max_images=m`` would store is the calibration
rule applied to m of those scores drawn at random (seeded): no refit per draw. Per sample size:
mean and spread of the threshold, and the recall and false-alarm rate it gives on the test split.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import SHARED, category_roots

REPO = Path(__file__).resolve().parents[1]


def sample_table(
    good_scores: np.ndarray,
    test_scores: np.ndarray,
    labels: np.ndarray,
    sizes: list[int],
    draws: int,
    false_alarm_rate: float,
) -> list[dict]:
    from defectscope.detector.calibration import calibrate

    rng = np.random.default_rng(0)
    rows = []
    for size in [*sizes, len(good_scores)]:
        if size > len(good_scores):
            continue
        n = 1 if size == len(good_scores) else draws
        thresholds, recalls, alarms = [], [], []
        for _ in range(n):
            sample = rng.choice(good_scores, size=size, replace=False)
            threshold = calibrate(sample, sample, false_alarm_rate, "sample").threshold
            flagged = test_scores >= threshold
            thresholds.append(threshold)
            recalls.append(flagged[labels == 1].mean())
            alarms.append(flagged[labels == 0].mean())
        rows.append(
            {
                "images": size,
                "all": size == len(good_scores),
                "threshold_mean": round(float(np.mean(thresholds)), 4),
                "threshold_std": round(float(np.std(thresholds)), 4),
                "recall_mean": round(float(np.mean(recalls)), 4),
                "false_alarm_mean": round(float(np.mean(alarms)), 4),
                "false_alarm_p90": round(float(np.quantile(alarms, 0.9)), 4),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--categories", default="bottle,screw,brick,coated_panel,gear")
    parser.add_argument("--sizes", default="50,100,200,400")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument(
        "--synthetic-root", type=Path, default=Path.home() / ".cache" / "defectscope-bench"
    )
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks/results/calibration_sample.json"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.evaluation.runner import evaluate
    from defectscope.experiment import compose

    sizes = [int(s) for s in args.sizes.split(",")]
    roots = category_roots(args.categories.split(","), args.data_root, args.synthetic_root)
    out: dict = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "categories": {},
    }
    for name, root in roots.items():
        overrides = [*args.overrides, "detector.calibration.max_images=100000"]
        detector = Detector(compose(None, overrides).detector)
        dataset = open_dataset(root)
        detector.fit([s.path for s in dataset.train])
        result = evaluate(detector, dataset)
        scores = np.array([r.score for r in result.records])
        labels = np.array([int(r.label) for r in result.records])
        good = np.asarray(detector.calibration.good_scores)
        rate = detector.calibration.false_alarm_rate
        rows = sample_table(good, scores, labels, sizes, args.draws, rate)
        out["categories"][name] = {"n_train": len(good), "n_test": len(scores), "rows": rows}
        print(name, f"({len(good)} training images)")
        for row in rows:
            print(
                f"  {row['images']:>5} images: threshold {row['threshold_mean']:.3f} "
                f"+- {row['threshold_std']:.3f}  recall {row['recall_mean']:.3f}  "
                f"false alarms {row['false_alarm_mean']:.3f} (p90 {row['false_alarm_p90']:.3f})"
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
