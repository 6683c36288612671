"""Fit and evaluate on a full MVTec AD category; print quality, fit time, latency, memory.

    python benchmarks/bottle.py [--data ../shared/datasets/mvtec_ad/bottle] [--json out.json]
                                [key=value overrides, e.g. detector.coreset.ratio=0.05]

Protocol (shared/README.md): fit on train/good, evaluate on all of test/, maps at mask size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def latency(detector, images, batch_size: int, repeats: int) -> dict:
    """Per-image latency from decoded arrays (model + maps at original size)."""
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    batches = [b for b in batches if len(b) == batch_size] or batches
    detector.predict(batches[0], batch_size=batch_size)  # warm-up
    per_image = []
    for _ in range(repeats):
        for batch in batches:
            start = time.perf_counter()
            detector.predict(batch, batch_size=batch_size)
            per_image.append((time.perf_counter() - start) * 1000.0 / len(batch))
    per_image.sort()
    return {
        "batch_size": batch_size,
        "ms_per_image_median": round(statistics.median(per_image), 2),
        "ms_per_image_p90": round(per_image[int(0.9 * (len(per_image) - 1))], 2),
        "images_per_s": round(1000.0 / statistics.median(per_image), 2),
        "n": len(per_image),
    }


def run_benchmark(
    data: Path, overrides: list[str], latency_images: int = 32, keep: Path | None = None
) -> dict:
    from defectscope.data.datasets import open_dataset
    from defectscope.data.io import load_image
    from defectscope.detector.detector import Detector
    from defectscope.evaluation.runner import evaluate
    from defectscope.experiment import compose

    experiment = compose(None, overrides)
    dataset = open_dataset(data)
    train = [s.path for s in dataset.train]

    start = time.perf_counter()
    detector = Detector(experiment.detector).fit(train)
    fit_wall = time.perf_counter() - start
    fit_rss = peak_rss_mib()

    metrics = evaluate(detector, dataset).to_dict()["metrics"]

    images = [load_image(s.path) for s in dataset.test[:latency_images]]
    lat1 = latency(detector, images, 1, repeats=2)
    lat16 = latency(detector, images, 16, repeats=3)

    model_file = detector.save(keep or Path("/tmp/defectscope_bench_model"))
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": str(detector.device),
        },
        "data": str(data),
        "n_train": len(train),
        "n_test": len(dataset.test),
        "overrides": overrides,
        "config": {
            "backbone": detector.features.backbone.name,
            "layers": detector.features.backbone.layers,
            "input_size": list(detector.config.features.input_size),
            "coreset": detector.config.coreset.model_dump(),
            "k": detector.config.scoring.k,
            "reduction": detector.config.scoring.reduction,
        },
        "quality": {k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
        "at_stored_threshold": {
            k: metrics.get(k)
            for k in ("threshold", "accuracy", "precision", "recall", "false_alarm_rate")
        },
        "fit": {
            "wall_s": round(fit_wall, 2),
            **detector.info.timings,
            "bank_size": detector.info.bank_size,
            "n_patches": detector.info.training.n_patches,
        },
        "predict_batch1": lat1,
        "predict_batch16": lat16,
        "peak_rss_mib": {"after_fit": round(fit_rss, 1), "overall": round(peak_rss_mib(), 1)},
        "model_file_mib": round(model_file.stat().st_size / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--latency-images", type=int, default=32)
    parser.add_argument("--keep", type=Path, default=None, help="also save the model here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        sys.exit(f"dataset not found: {args.data}")
    out = run_benchmark(args.data, args.overrides, args.latency_images, args.keep)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
