"""Multi-category benchmark: fit and evaluate one configuration on every kind of product.

    python benchmarks/suite.py [--json benchmarks/results/suite.json] [--categories a,b]
                               [--data-root DIR] [--synthetic-root DIR] [key=value overrides]
    python benchmarks/suite.py --known-defects 5 [--hold-out-only] ...   # known defects

Categories: MVTec AD bottle and screw from ../shared (skipped when absent) and the synthetic
categories of benchmarks/categories.py (textures, grayscale surfaces, varying-size strips, tiny
spots on 1024 px images, large low-contrast regions, an object), built offline on first use.
Per category: image AUROC, pixel AUROC and AUPRO (where masks exist), F1-max, recall and
false-alarm rate at the stored threshold, the mean IoU of the masks drawn at the stored pixel
threshold with the true ones, fit time, predict ms/image. The summary row is the
mean over categories and the worst category: a change must be judged on those, never on one.
Protocol: ../shared/README.md (fit on train/good, evaluate on all of test/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets" / "mvtec_ad"
MVTEC = ("bottle", "screw")
METRICS = (
    "image_auroc",
    "pixel_auroc",
    "aupro",
    "f1_max",
    "recall",
    "false_alarm_rate",
    "mean_defect_iou",  # of the masks drawn at the stored pixel threshold
)

sys.path.insert(0, str(Path(__file__).resolve().parent))


def category_roots(names: list[str] | None, data_root: Path, synthetic_root: Path) -> dict:
    """name -> dataset folder, building the synthetic categories that are asked for."""
    from categories import CATEGORIES, build_category

    wanted = names or [*MVTEC, *CATEGORIES]
    roots: dict[str, Path] = {}
    for name in wanted:
        if name in MVTEC:
            folder = data_root / name
            if folder.is_dir():
                roots[name] = folder
            else:
                print(f"skipping {name}: {folder} not found", file=sys.stderr)
        elif name in CATEGORIES:
            roots[name] = build_category(name, synthetic_root)
        else:
            raise SystemExit(f"unknown category {name!r}")
    return roots


def draw_known_defects(test: list[Any], count: int, seed: int = 0) -> list[Any]:
    """``count`` defective test samples, taken in turn from each defect type (each type's
    order shuffled with ``seed``): a user's few known defects are rarely all of one kind."""
    import random

    by_type: dict[str, list[Any]] = {}
    for sample in test:
        if sample.label == 1:
            by_type.setdefault(sample.defect_type, []).append(sample)
    for name, samples in by_type.items():
        random.Random(f"{seed}-{name}").shuffle(samples)
    queues = [by_type[name] for name in sorted(by_type)]
    drawn: list[Any] = []
    while len(drawn) < count and any(queues):
        for queue in queues:
            if queue and len(drawn) < count:
                drawn.append(queue.pop())
    return drawn


@contextlib.contextmanager
def known_defect_folder(known: list[Any]) -> Iterator[str]:
    """A temporary folder of links to the ``known`` samples' images (named by defect type), as
    a user's ``--defects`` folder; removed afterwards, also when the fit fails."""
    with tempfile.TemporaryDirectory(prefix="known-defects-") as folder:
        for number, sample in enumerate(known):
            link = Path(folder) / f"{number:03d}_{sample.defect_type}{sample.path.suffix}"
            link.symlink_to(sample.path.resolve())
        yield folder


def run_category(
    root: Path,
    overrides: list[str],
    shots: int | None = None,
    seed: int = 0,
    known_defects: int = 0,
    use_known: bool = True,
) -> dict[str, Any]:
    """Fit on the training images (or ``shots`` of them, drawn with ``seed``) and evaluate.
    ``known_defects`` defective test images are taken out of the evaluation and, with
    ``use_known``, given to the fit (`detector.auto.known_defects`)."""
    import dataclasses
    import random

    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.evaluation.runner import evaluate
    from defectscope.experiment import compose

    dataset = open_dataset(root)
    known = draw_known_defects(dataset.test, known_defects, seed)
    dataset = dataclasses.replace(dataset, test=[s for s in dataset.test if s not in known])
    train = [s.path for s in dataset.train]
    if shots is not None:
        train = random.Random(seed).sample(train, shots)
    with known_defect_folder(known) as folder:
        if known and use_known:
            overrides = [*overrides, f"detector.auto.known_defects={folder}"]
        experiment = compose(None, overrides)
        start = time.perf_counter()
        detector = Detector(experiment.detector).fit(train)
        fit_s = time.perf_counter() - start
    result = evaluate(detector, dataset)
    metrics = result.to_dict()["metrics"]
    row: dict[str, Any] = {k: _finite(metrics.get(k)) for k in METRICS}
    row["fit_s"] = round(fit_s, 2)
    row["predict_ms_per_image"] = round(result.timings["ms_per_image"], 1)
    row["n_train"] = len(train)
    row["n_test"] = len(dataset.test)
    row["per_defect"] = {
        name: {k: _finite(v.get(k)) for k in ("image_auroc", "pixel_auroc")}
        for name, v in result.to_dict().get("per_defect", {}).items()
    }
    row["selection"] = (detector.info.selection or {}).get("chosen")
    row["known_defects"] = len(known) if use_known else 0
    row["candidates"] = [
        {k: r[k] for k in ("name", "image_auroc", "pixel_auroc", "objective") if k in r}
        for r in (detector.info.selection or {}).get("candidates", [])
    ]
    if shots is not None:
        row["calibration"] = detector.calibration.method
        row["thresholds"] = calibration_check(detector, train, result.records)
    return row


def calibration_check(detector: Any, train: list[Path], records: list[Any]) -> dict[str, Any]:
    """Recall and false-alarm rate on the test split at the threshold of each few-shot
    calibration: the fit's own, 'views' (jittered training views scored against the same
    bank; the bank does not depend on the calibration) and, from one image, 'halves'."""
    import numpy as np

    from defectscope.data.io import load_image
    from defectscope.detector.calibration import calibrate
    from defectscope.detector.few_shot import jittered_views

    config = detector.config
    preprocessor = detector.preprocessor
    scores = []
    for i, path in enumerate(train):
        batch = preprocessor([load_image(path)])
        views = torch.cat(jittered_views(batch, config.few_shot.calibration_views, i))
        scores.append(detector.score_batch(views)[1].float().cpu().numpy())
    good = np.concatenate(scores)
    rate = config.calibration.false_alarm_rate
    thresholds = {
        detector.calibration.method: detector.threshold,
        "views": calibrate(good, good, rate, "views").threshold,
    }
    selection = detector.describe().get("selection") or {}
    halves = selection.get("few_shot", {}).get("halves_scores")
    if halves:
        thresholds["halves"] = calibrate(np.array(halves), np.array(halves), rate, "h").threshold
    out: dict[str, Any] = {}
    for name, threshold in thresholds.items():
        bad = [r.score >= threshold for r in records if r.label]
        alarms = [r.score >= threshold for r in records if not r.label]
        out[name] = {
            "threshold": round(float(threshold), 4),
            "recall": round(sum(bad) / max(1, len(bad)), 4),
            "false_alarm_rate": round(sum(alarms) / max(1, len(alarms)), 4),
        }
    return out


def shots_main(roots: dict[str, Path], shots: list[int], args: argparse.Namespace) -> None:
    """k-shot results: mean and spread over seeded draws of k training images."""
    out: dict[str, dict] = {}
    for name, root in roots.items():
        for k in shots:
            runs = [run_category(root, args.overrides, k, seed) for seed in range(args.seeds)]
            summary: dict[str, Any] = {}
            for key in METRICS:
                values = [r[key] for r in runs if r.get(key) is not None]
                if values:
                    summary[key] = round(sum(values) / len(values), 4)
                    summary[key + "_range"] = [min(values), max(values)]
            methods = {m for r in runs for m in r.get("thresholds", {})}
            summary["calibrations"] = {
                m: {
                    key: round(sum(r["thresholds"][m][key] for r in runs) / len(runs), 4)
                    for key in ("recall", "false_alarm_rate")
                }
                for m in sorted(methods)
                if all(m in r.get("thresholds", {}) for r in runs)
            }
            summary["views_chosen"] = [r.get("selection") for r in runs]
            out[f"{name}@{k}"] = {"runs": runs, **summary}
            print(
                f"{name:10s} {k}-shot image {summary.get('image_auroc')} "
                f"{summary.get('image_auroc_range')} pixel {summary.get('pixel_auroc')} "
                f"recall {summary.get('recall')} fa {summary.get('false_alarm_rate')} "
                f"{summary['views_chosen']} {summary['calibrations']}",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python", "benchmarks/suite.py", *sys.argv[1:]]),
            "shots": out,
        }
        args.json.write_text(json.dumps(doc, indent=2))


def summarize(rows: dict[str, dict]) -> dict[str, dict]:
    """Mean over categories and the worst category, per metric (lower is worse, except the
    false-alarm rate and times, where higher is worse)."""
    out: dict[str, dict] = {"mean": {}, "worst": {}}
    for key in (*METRICS, "fit_s", "predict_ms_per_image"):
        values = {n: r[key] for n, r in rows.items() if r.get(key) is not None}
        if not values:
            continue
        out["mean"][key] = round(sum(values.values()) / len(values), 4)
        higher_is_worse = key in ("false_alarm_rate", "fit_s", "predict_ms_per_image")
        pick = max if higher_is_worse else min
        name = pick(values, key=lambda n: values[n])
        out["worst"][key] = {"category": name, "value": values[name]}
    return out


def by_metric(rows: dict[str, dict], metrics: tuple[str, ...]) -> dict[str, dict]:
    """`summarize`'s mean and worst category, one entry per metric of ``metrics`` that some
    category has: ``{"mean", "worst", "worst_category"}``."""
    summary = summarize(rows)
    return {
        key: {
            "mean": summary["mean"][key],
            "worst": summary["worst"][key]["value"],
            "worst_category": summary["worst"][key]["category"],
        }
        for key in metrics
        if key in summary["mean"]
    }


def markdown(rows: dict[str, dict], summary: dict[str, dict]) -> str:
    head = (
        "| category | image AUROC | pixel AUROC | AUPRO | F1-max | recall | false alarms "
        "| mask IoU | fit s | ms/image |"
    )
    lines = [head, "|" + "---|" * 10]

    def cell(value: Any) -> str:
        return (
            "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        )

    for name, r in rows.items():
        values = [r.get(k) for k in (*METRICS, "fit_s", "predict_ms_per_image")]
        lines.append(f"| {name} | " + " | ".join(cell(v) for v in values) + " |")
    mean = summary["mean"]
    lines.append(
        "| **mean** | "
        + " | ".join(cell(mean.get(k)) for k in (*METRICS, "fit_s", "predict_ms_per_image"))
        + " |"
    )
    worst = summary["worst"]
    lines.append(
        "| **worst** | "
        + " | ".join(
            f"{cell(worst[k]['value'])} ({worst[k]['category']})" if k in worst else "-"
            for k in (*METRICS, "fit_s", "predict_ms_per_image")
        )
        + " |"
    )
    return "\n".join(lines)


def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return round(float(value), 4)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--categories", default=None, help="comma-separated subset")
    parser.add_argument("--data-root", type=Path, default=SHARED)
    parser.add_argument(
        "--synthetic-root", type=Path, default=Path.home() / ".cache" / "defectscope-bench"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--shots",
        default=None,
        help="k-shot instead: comma-separated k (e.g. 2,4,8), each the mean of --seeds draws",
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--known-defects",
        type=int,
        default=0,
        help="take K defective test images (in turn from each defect type) out of the "
        "evaluation and give them to the fit as known defects",
    )
    parser.add_argument(
        "--hold-out-only",
        action="store_true",
        help="with --known-defects: take them out of the evaluation but do not give them to "
        "the fit (the baseline on the same test images)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. detector.features.normalize=none"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.categories.split(",") if args.categories else None
    roots = category_roots(names, args.data_root, args.synthetic_root)
    if args.shots:
        shots_main(roots, [int(k) for k in args.shots.split(",")], args)
        return
    rows: dict[str, dict] = {}
    for name, root in roots.items():
        start = time.perf_counter()
        rows[name] = run_category(
            root,
            args.overrides,
            known_defects=args.known_defects,
            use_known=not args.hold_out_only,
        )
        r = rows[name]
        print(
            f"{name:14s} image {r['image_auroc']} pixel {r['pixel_auroc']} aupro {r['aupro']} "
            f"recall {r['recall']} fa {r['false_alarm_rate']} fit {r['fit_s']} s "
            f"({time.perf_counter() - start:.0f} s) {r['selection'] or ''}",
            flush=True,
        )
    summary = summarize(rows)
    table = markdown(rows, summary)
    print(table)
    record = {
        "overrides": args.overrides,
        "known_defects": args.known_defects,
        "known_defects_used": args.known_defects > 0 and not args.hold_out_only,
        "categories": rows,
        "summary": summary,
        "table": table,
    }
    write_results(args.json, "benchmarks/suite.py", record)


def write_results(path: Path | None, script: str, record: dict[str, Any]) -> None:
    """``record`` with the date, the command and the machine, as JSON at ``path`` (if any)."""
    if path is None:
        return
    out = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", script, *sys.argv[1:]]),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        **record,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
