"""What the coreset ratio and method do to quality and speed on a full category.

    python benchmarks/coreset_table.py [--data PATH] [--json out.json] [--ratios 0.01 0.02 ...]

Runs benchmarks/bottle.py's measurement once per (method, ratio) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bottle import DEFAULT_DATA, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.25])
    parser.add_argument("--methods", nargs="+", default=["sharded", "greedy"])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            overrides = [
                *args.overrides,
                f"detector.coreset.method={method}",
                f"detector.coreset.ratio={ratio}",
                # The ratio itself, not the default bank-size cap (10 000 rows).
                "detector.coreset.max_size=null",
            ]
            result = run_benchmark(args.data, overrides, latency_images=16)
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    **result["quality"],
                    "bank": result["fit"]["bank_size"],
                    "coreset_s": result["fit"]["coreset_s"],
                    "fit_s": result["fit"]["wall_s"],
                    "ms_b1": result["predict_batch1"]["ms_per_image_median"],
                    "ms_b16": result["predict_batch16"]["ms_per_image_median"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    header = (
        "| method | ratio | bank | image AUROC | pixel AUROC | AUPRO | coreset s | fit s "
        "| ms/img b1 | ms/img b16 |"
    )
    lines = [header, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['bank']} | {r['image_auroc']:.4f} | "
            f"{r['pixel_auroc']:.4f} | {r['aupro']:.4f} | {r['coreset_s']:.1f} | {r['fit_s']:.1f} "
            f"| {r['ms_b1']:.1f} | {r['ms_b16']:.1f} |"
        )
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
