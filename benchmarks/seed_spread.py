"""Mean and worst category of suite runs that differ only in a seed, side by side.

    python benchmarks/suite.py --json /tmp/a0.json detector.coreset.seed=0     # and 1, 2
    python benchmarks/suite.py --json /tmp/b0.json detector.coreset.seed=0 \
        detector.coreset.min_size=null                                          # and 1, 2
    python benchmarks/seed_spread.py --run after=/tmp/a0.json,/tmp/a1.json,/tmp/a2.json \\
        --run before=/tmp/b0.json,/tmp/b1.json,/tmp/b2.json --json benchmarks/results/x.json

One suite run is one draw of the coreset (and of what auto mode compares on it): on a product
with few training images its worst category can move by 0.1 between draws, so a change is judged
on the spread over seeds, not on one run. Per run (label) and seed: the mean and the worst
category of image AUROC, pixel AUROC, AUPRO, recall and false alarms, over the categories every
file holds; per category the values of each seed and auto mode's choices; then the mean over
seeds of the mean and of the worst.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import by_metric

METRICS = ("image_auroc", "pixel_auroc", "aupro", "recall", "false_alarm_rate")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed and over seeds, the mean and worst of each metric over the shared categories."""
    categories = [c for c in runs[0] if all(c in r for r in runs)]
    per_seed = [by_metric({c: run[c] for c in categories}, METRICS) for run in runs]
    over = {
        metric: {
            stat: round(float(np.mean([s[metric][stat] for s in per_seed])), 4)
            for stat in ("mean", "worst")
        }
        for metric in per_seed[0]
    }
    over["image_auroc"]["lowest_worst"] = min(s["image_auroc"]["worst"] for s in per_seed)
    categories_out = {
        c: {
            **{m: [run[c].get(m) for run in runs] for m in METRICS},
            "selection": [run[c].get("selection") for run in runs],
            "fit_s": [run[c].get("fit_s") for run in runs],
            "predict_ms_per_image": [run[c].get("predict_ms_per_image") for run in runs],
        }
        for c in categories
    }
    return {"categories": categories_out, "per_seed": per_seed, "over_seeds": over}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        help="LABEL=suite1.json,suite2.json,... (one file per seed, in seed order)",
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    for spec in args.run:
        label, _, files = spec.partition("=")
        if not files:
            parser.error(f"--run {spec!r}: expected LABEL=file1.json,file2.json")
        runs = [json.loads(Path(f).read_text())["categories"] for f in files.split(",")]
        out[label] = {"files": files.split(","), **summarize(runs)}
        print(f"{label}:")
        for seed, row in enumerate(out[label]["per_seed"]):
            cells = "  ".join(
                f"{m} {v['mean']:.3f} (worst {v['worst']:.3f} {v['worst_category']})"
                for m, v in row.items()
            )
            print(f"  seed {seed}: {cells}")
        over = out[label]["over_seeds"]
        print("  over seeds: " + "  ".join(f"{m} {v}" for m, v in over.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
