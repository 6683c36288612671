"""Latency of one image through the REST API next to the direct ``Detector.predict`` from bytes.

    python benchmarks/latency.py [--model models/bottle] [--n 200] [--json FILE]

One ``defectscope serve`` worker on 127.0.0.1 (micro-batching on, the prediction log on, as
deployed); one client posts 512 x 512 PNGs (MVTec AD bottle test images, or generated ones) one
at a time. Each HTTP request alternates with an in-process ``Detector.predict`` of the same PNG
bytes (decode included, batch 1), so that load from other work on the machine weighs on both
sides alike; the report gives both p50s, their ratio and the server's own timing fields (decode,
inference, model, total) at p50, which tell where the difference goes.
Without ``--model`` the default model is fitted on bottle ``train/good`` into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from load_test import BOTTLE, ServerConfig, fit_default_model, percentile, pick_images, served


def alternate(url: str, images: list[tuple[str, bytes]], detector, n: int) -> dict:
    import httpx

    for _, data in images[:3]:  # warm-up: first calls pay for allocation and kernel choice
        detector.predict(data)
    http_ms, direct_ms = [], []
    server: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for _, data in images[:3]:
            http.post("/v1/predict", files={"file": ("x.png", data, "image/png")})
        for i in range(n):
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            detector.predict(data)
            t1 = time.perf_counter()
            response = http.post("/v1/predict", files={"file": (name, data, "image/png")})
            t2 = time.perf_counter()
            response.raise_for_status()
            for key, value in response.json()["timing_ms"].items():
                server.setdefault(key, []).append(value)
            direct_ms.append((t1 - t0) * 1000.0)
            http_ms.append((t2 - t1) * 1000.0)
    ratios = [h / d for h, d in zip(http_ms, direct_ms, strict=True)]
    return {
        "n": n,
        "http_p50_ms": round(percentile(http_ms, 50), 2),
        "http_p95_ms": round(percentile(http_ms, 95), 2),
        "direct_p50_ms": round(percentile(direct_ms, 50), 2),
        "direct_p95_ms": round(percentile(direct_ms, 95), 2),
        "overhead_p50_ms": round(percentile(http_ms, 50) - percentile(direct_ms, 50), 2),
        "ratio_p50": round(percentile(http_ms, 50) / percentile(direct_ms, 50), 3),
        "ratio_median_of_pairs": round(statistics.median(ratios), 3),
        # The server's own account of each request (p50): what the route spent where.
        "server_p50_ms": {key: round(percentile(v, 50), 2) for key, v in server.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path, default=BOTTLE)
    parser.add_argument("--n", type=int, default=200, help="HTTP/direct pairs")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data = args.data if args.data.is_dir() else None
    images = pick_images(args.images, data)
    with tempfile.TemporaryDirectory(prefix="defectscope-latency-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            model = workdir / "model"
            fit_default_model(model, data)
        from defectscope.detector.detector import Detector

        detector = Detector.load(model)
        config = ServerConfig(
            "latency", workers=1, batch_max_size=8, batch_max_wait_ms=5.0, users=1
        )
        with served(model, config, workdir) as url:
            result = alternate(url, images, detector, args.n)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": sys.version},
        **result,
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
