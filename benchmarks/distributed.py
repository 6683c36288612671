"""Local fit vs Ray fit with N local workers on the same config; wall times and agreement.

    python benchmarks/distributed.py [--data ../shared/datasets/mvtec_ad/bottle] [--workers 2]
        [--chunk-images K] [--json benchmarks/results/distributed.json] [key=value overrides]

Both fits use the same config, including ``detector.fit.chunk_images`` (default:
ceil(n_train / workers), so the plan has one chunk per worker; a plan of one chunk cannot be
spread). The Ray cluster's start-up is timed separately and excluded from the Ray fit time; the
Ray fit time includes starting the actors and building their backbones. Agreement: max absolute
difference of bank rows, max relative difference of the thresholds and of the scores of every
test image.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "distributed.json"


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def run_benchmark(
    data: Path,
    workers: int,
    chunk_images: int | None,
    overrides: list[str],
    ray_first: bool = False,
) -> dict:
    import numpy as np
    import ray

    from defectscope.data.datasets import open_dataset
    from defectscope.detector.detector import Detector
    from defectscope.distributed.fit import fit_with_ray
    from defectscope.experiment import compose

    dataset = open_dataset(data)
    train = [sample.path for sample in dataset.train]
    chunk = chunk_images or math.ceil(len(train) / workers)
    config = compose(None, [*overrides, f"detector.fit.chunk_images={chunk}"]).detector

    def fit_locally() -> tuple[Detector, float]:
        start = time.perf_counter()
        detector = Detector(config).fit(train)
        return detector, time.perf_counter() - start

    def fit_on_ray() -> tuple[Detector, float, float]:
        start = time.perf_counter()
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        cluster_s = time.perf_counter() - start
        try:
            start = time.perf_counter()
            detector = fit_with_ray(config, train, workers=workers)
            return detector, time.perf_counter() - start, cluster_s
        finally:
            ray.shutdown()

    # The second fit reads the images from the page cache: --ray-first checks that order effect.
    if ray_first:
        distributed, ray_s, cluster_s = fit_on_ray()
        local, local_s = fit_locally()
    else:
        local, local_s = fit_locally()
        distributed, ray_s, cluster_s = fit_on_ray()

    test = [sample.path for sample in dataset.test]
    ours = np.array([p.score for p in distributed.predict(test)])
    theirs = np.array([p.score for p in local.predict(test)])
    score_rel = np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1e-12)
    same_shape = tuple(distributed.memory_bank.shape) == tuple(local.memory_bank.shape)
    bank_diff = (
        float((distributed.memory_bank - local.memory_bank).abs().max()) if same_shape else None
    )
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "note": "shared machine when run by the engineer: re-run on a quiet one",
        },
        "data": str(data),
        "n_train": len(train),
        "n_test": len(test),
        "workers": workers,
        "chunk_images": chunk,
        "n_chunks": distributed.info.training.n_chunks,
        "overrides": overrides,
        "order": "ray first" if ray_first else "local first",
        "local_fit_s": round(local_s, 2),
        "ray_fit_s": round(ray_s, 2),
        "ray_over_local": round(ray_s / local_s, 3),
        "ray_cluster_start_s": round(cluster_s, 2),
        "agreement": {
            "bank_shape_equal": same_shape,
            "bank_max_abs_diff": bank_diff,
            "threshold_rel_diff": relative(distributed.threshold, local.threshold),
            "pixel_threshold_rel_diff": relative(
                distributed.pixel_threshold, local.pixel_threshold
            ),
            "test_score_max_rel_diff": float(score_rel.max()),
            "decisions_equal": bool(
                all(
                    (a >= distributed.threshold) == (b >= local.threshold)
                    for a, b in zip(ours, theirs, strict=True)
                )
            ),
        },
        "timings": {"local": local.info.timings, "ray": distributed.info.timings},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-images", type=int, default=None)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--ray-first", action="store_true", help="Run the Ray fit first.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. detector.device=cpu")
    args = parser.parse_args()
    result = run_benchmark(
        args.data, args.workers, args.chunk_images, args.overrides, args.ray_first
    )
    print(
        f"local fit {result['local_fit_s']:.1f} s | Ray fit ({args.workers} workers) "
        f"{result['ray_fit_s']:.1f} s | ratio {result['ray_over_local']:.2f} | cluster start "
        f"{result['ray_cluster_start_s']:.1f} s (excluded)"
    )
    agreement = result["agreement"]
    print(
        f"agreement: bank max |diff| {agreement['bank_max_abs_diff']}, threshold rel diff "
        f"{agreement['threshold_rel_diff']:.2e}, test scores max rel diff "
        f"{agreement['test_score_max_rel_diff']:.2e}, decisions equal "
        f"{agreement['decisions_equal']}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
