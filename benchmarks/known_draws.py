"""Known defects over several draws: how much a few real defective images help, draw by draw.

    python benchmarks/known_draws.py --known-defects 5 --draws 3 [--json FILE]
                                     [--categories a,b] [--data-root DIR] [--synthetic-root DIR]

One draw of known defects (`suite.py --known-defects`) says little: which five images a user
has decides what auto mode sees. Per category this fits the default once (it never sees test
images), then for each draw (seed 0 .. D-1) takes K defective test images out of the evaluation
(`suite.draw_known_defects`: each defect type in turn), fits with them as known defects, and
evaluates the default and that fit on the same remaining test images. The summary is the mean
over categories per draw and over draws, the worst category, and the largest loss of one
category in one draw: what a user risks by giving known defects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import (
    SHARED,
    _finite,
    category_roots,
    draw_known_defects,
    known_defect_folder,
    write_results,
)

QUALITY = ("image_auroc", "pixel_auroc", "aupro")


def _metrics(detector: Any, dataset: Any) -> dict[str, Any]:
    from defectscope.evaluation.runner import evaluate

    metrics = evaluate(detector, dataset).to_dict()["metrics"]
    return {k: _finite(metrics.get(k)) for k in (*QUALITY, "recall", "false_alarm_rate")}


def _chosen(detector: Any) -> str | None:
    return (detector.info.selection or {}).get("chosen")


def run_category(root: Path, count: int, draws: int, overrides: list[str]) -> dict[str, Any]:
    """The default fit and one known-defect fit per draw, each draw evaluated on its own
    remaining test images."""
    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.experiment import compose

    dataset = open_dataset(root)
    train = [s.path for s in dataset.train]
    start = time.perf_counter()
    default = Detector(compose(None, overrides).detector).fit(train)
    row: dict[str, Any] = {
        "default_choice": _chosen(default),
        "default_fit_s": round(time.perf_counter() - start, 2),
        "draws": [],
    }
    for seed in range(draws):
        known = draw_known_defects(dataset.test, count, seed)
        remaining = dataclasses.replace(dataset, test=[s for s in dataset.test if s not in known])
        with known_defect_folder(known) as folder:
            config = compose(None, [*overrides, f"detector.auto.known_defects={folder}"])
            start = time.perf_counter()
            informed = Detector(config.detector).fit(train)
            fit_s = time.perf_counter() - start
        row["draws"].append(
            {
                "seed": seed,
                "known": [s.defect_type for s in known],
                "choice": _chosen(informed),
                "reason": (informed.info.selection or {}).get("reason"),
                "candidates": [
                    {k: r.get(k) for k in ("name", "image_auroc", "objective")}
                    for r in (informed.info.selection or {}).get("candidates", [])
                ],
                "fit_s": round(fit_s, 2),
                "default": _metrics(default, remaining),
                "known_defects": _metrics(informed, remaining),
            }
        )
    return row


def summarize(rows: dict[str, dict], draws: int) -> dict[str, Any]:
    """Per draw and over draws: the mean over categories and the worst category of the default
    and of the known-defect fit, and the largest single loss per metric."""
    per_draw = []
    for d in range(draws):
        entry: dict[str, Any] = {}
        for side in ("default", "known_defects"):
            entry[side] = {}
            for key in QUALITY:
                values = {
                    n: r["draws"][d][side][key]
                    for n, r in rows.items()
                    if r["draws"][d][side][key] is not None
                }
                worst = min(values, key=lambda n: values[n])
                entry[side][key] = {
                    "mean": round(sum(values.values()) / len(values), 4),
                    "worst": {"category": worst, "value": values[worst]},
                }
        per_draw.append(entry)
    over: dict[str, Any] = {}
    for side in ("default", "known_defects"):
        over[side] = {
            key: round(sum(e[side][key]["mean"] for e in per_draw) / draws, 4) for key in QUALITY
        }
    largest_loss: dict[str, Any] = {}
    for key in QUALITY:
        losses = [
            (d["default"][key] - d["known_defects"][key], name, d["seed"])
            for name, r in rows.items()
            for d in r["draws"]
            if d["default"][key] is not None and d["known_defects"][key] is not None
        ]
        loss, name, seed = max(losses)
        largest_loss[key] = {"loss": round(loss, 4), "category": name, "seed": seed}
    return {"per_draw": per_draw, "mean_over_draws": over, "largest_loss": largest_loss}


def markdown(rows: dict[str, dict], draws: int) -> str:
    def cell(m: dict[str, Any]) -> str:
        return " / ".join("-" if m[k] is None else f"{m[k]:.3f}" for k in QUALITY)

    head = "| category | default choice | " + " | ".join(
        f"draw {d}: default | draw {d}: known (choice)" for d in range(draws)
    )
    lines = [head + " |", "|" + "---|" * (2 + 2 * draws)]
    for name, r in rows.items():
        cells = [name, str(r["default_choice"])]
        for d in r["draws"]:
            cells += [cell(d["default"]), f"{cell(d['known_defects'])} ({d['choice']})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--known-defects", type=int, default=5)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--categories", default=None, help="comma-separated subset")
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument(
        "--synthetic-root", type=Path, default=Path.home() / ".cache" / "defectscope-bench"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for both fits")
    args = parser.parse_args()
    if args.known_defects < 1 or args.draws < 1:
        raise SystemExit("--known-defects and --draws must be at least 1")
    names = args.categories.split(",") if args.categories else None
    roots = category_roots(names, args.data_root, args.synthetic_root)
    rows: dict[str, dict] = {}
    for name, root in roots.items():
        start = time.perf_counter()
        rows[name] = run_category(root, args.known_defects, args.draws, args.overrides)
        choices = [d["choice"] for d in rows[name]["draws"]]
        print(
            f"{name:14s} default {rows[name]['default_choice']} known {choices} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    summary = summarize(rows, args.draws)
    table = markdown(rows, args.draws)
    print(table)
    print(json.dumps({k: summary[k] for k in ("mean_over_draws", "largest_loss")}, indent=2))
    record = {
        "known_defects": args.known_defects,
        "draws": args.draws,
        "overrides": args.overrides,
        "categories": rows,
        "summary": summary,
        "table": table,
    }
    write_results(args.json, "benchmarks/known_draws.py", record)


if __name__ == "__main__":
    main()
