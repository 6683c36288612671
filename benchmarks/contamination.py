"""Defective images among the good training images: what they cost and whether the fit names them.

    python benchmarks/contamination.py [--categories bottle,strips] [--counts 0,3,6]
        [--synthetic-root DIR] [--json benchmarks/results/contamination.json] [key=value ...]

A line's folder of "good" parts often holds a few defective ones. For each category and count
k, k defective test images (taken in turn from each defect type, seeded) join the training
images; the default fit runs on them and is evaluated on the rest of the test split: image
AUROC, recall and false-alarm rate at the stored threshold, and which training images the fit
named as suspects (`FitInfo.training.suspects`): how many of the k, and how many good ones;
with ``detector.fit.drop_suspects=true`` also which the fit dropped before fitting again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import SHARED, category_roots, draw_known_defects, write_results


def run(root: Path, count: int, overrides: list[str], seed: int) -> dict[str, Any]:
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.evaluation.metrics import image_auroc
    from defectscope.experiment import compose

    dataset = open_dataset(root)
    planted = draw_known_defects(list(dataset.test), count, seed) if count else []
    planted_paths = {str(s.path) for s in planted}
    test = [s for s in dataset.test if str(s.path) not in planted_paths]
    config = compose(None, overrides).detector
    started = time.perf_counter()
    detector = Detector(config).fit([s.path for s in dataset.train] + [s.path for s in planted])
    fit_s = time.perf_counter() - started
    scores = np.array([p.score for p in detector.predict([s.path for s in test])])
    labels = np.array([s.label for s in test])
    flagged = scores >= detector.threshold
    named = {s["name"] for s in detector.info.training.suspects}
    dropped = {s["name"] for s in detector.info.training.dropped}  # fit.drop_suspects
    return {
        "planted": count,
        "image_auroc": round(image_auroc(labels, scores), 4),
        "recall": round(float(flagged[labels == 1].mean()), 4),
        "false_alarm_rate": round(float(flagged[labels == 0].mean()), 4),
        "threshold": round(detector.threshold, 4),
        "suspects_planted": len(named & planted_paths),
        "suspects_good": len(named - planted_paths),
        "suspects": detector.info.training.suspects,
        "dropped_planted": len(dropped & planted_paths),
        "dropped_good": len(dropped - planted_paths),
        "fit_s": round(fit_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--categories", default="bottle")
    parser.add_argument("--counts", default="0,3,6")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument(
        "--synthetic-root", type=Path, default=Path.home() / ".cache" / "defectscope-bench"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    roots = category_roots(args.categories.split(","), args.data_root, args.synthetic_root)
    results: dict[str, list[dict[str, Any]]] = {}
    lines = [
        "| category | planted | image AUROC | recall | false alarms | named (planted / good) "
        "| dropped (planted / good) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, root in roots.items():
        for count in counts:
            row = run(root, count, args.overrides, args.seed)
            results.setdefault(name, []).append(row)
            line = (
                f"| {name} | {count} | {row['image_auroc']:.3f} | {row['recall']:.2f} | "
                f"{row['false_alarm_rate']:.2f} | {row['suspects_planted']} / "
                f"{row['suspects_good']} | {row['dropped_planted']} / {row['dropped_good']} |"
            )
            lines.append(line)
            print(line, flush=True)
    table = "\n".join(lines)
    print(table)
    write_results(args.json, "benchmarks/contamination.py", {"results": results, "table": table})


if __name__ == "__main__":
    main()
