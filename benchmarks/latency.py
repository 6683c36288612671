"""Latency of one image through the REST API next to the direct ``Detector.predict`` from bytes.

    python benchmarks/latency.py [--model models/bottle] [--n 200] [--threads 1] [--json FILE]

One ``defectscope serve`` worker on 127.0.0.1 (micro-batching on, the prediction log on, as
deployed); one client posts 512 x 512 PNGs (MVTec AD bottle test images, or generated ones) one
at a time. Each HTTP request alternates with a ``Detector.predict`` of the same PNG bytes
(decode included, batch 1) in a worker process of its own, so that load from other work on the
machine weighs on both sides alike; the report gives both p50s, their ratio and the server's own
timing fields (decode, inference, model, total) at p50, which tell where the difference goes.
Without ``--model`` the default model is fitted on bottle ``train/good`` into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from load_test import BOTTLE, ServerConfig, fit_default_model, percentile, pick_images, served


class DirectWorker:
    """``Detector.predict`` from bytes in a process of its own, in its own session like the
    server (the kernel shares the CPU between sessions first: an in-process predict would
    compete with this client's other work while the server did not)."""

    def __init__(self, model: Path, images: list[tuple[str, bytes]], workdir: Path) -> None:
        names = []
        for i, (_, data) in enumerate(images):
            path = workdir / f"image_{i}.png"
            path.write_bytes(data)
            names.append(str(path))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--direct-worker", str(model), *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def predict_ms(self, index: int) -> float:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{index}\n")
        self.process.stdin.flush()
        return float(self.process.stdout.readline())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def direct_worker(model: Path, paths: list[str]) -> None:
    from defectscope.detector.detector import Detector

    detector = Detector.load(model)
    images = [Path(p).read_bytes() for p in paths]
    for line in sys.stdin:
        data = images[int(line)]
        t0 = time.perf_counter()
        detector.predict(data)
        print((time.perf_counter() - t0) * 1000.0, flush=True)


def alternate(url: str, images: list[tuple[str, bytes]], direct: DirectWorker, n: int) -> dict:
    import httpx

    for i in range(3):  # warm-up: first calls pay for allocation and kernel choice
        direct.predict_ms(i % len(images))
    http_ms, direct_ms = [], []
    server: dict[str, list[float]] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for _, data in images[:3]:
            http.post("/v1/predict", files={"file": ("x.png", data, "image/png")})
        for i in range(n):
            name, data = images[i % len(images)]
            direct_ms.append(direct.predict_ms(i % len(images)))
            t1 = time.perf_counter()
            response = http.post("/v1/predict", files={"file": (name, data, "image/png")})
            t2 = time.perf_counter()
            response.raise_for_status()
            for key, value in response.json()["timing_ms"].items():
                server.setdefault(key, []).append(value)
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
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads of both sides (default: all); 1 on a machine busy with other work",
    )
    parser.add_argument("--direct-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.direct_worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        direct_worker(Path(args.direct_worker[0]), args.direct_worker[1:])
        return {}
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server inherits it
    data = args.data if args.data.is_dir() else None
    images = pick_images(args.images, data)
    with tempfile.TemporaryDirectory(prefix="defectscope-latency-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            model = workdir / "model"
            fit_default_model(model, data)
        direct = DirectWorker(model, images, workdir)
        config = ServerConfig(
            "latency", workers=1, batch_max_size=8, batch_max_wait_ms=5.0, users=1
        )
        with served(model, config, workdir) as url:
            try:
                result = alternate(url, images, direct, args.n)
            finally:
                direct.close()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "threads": args.threads or "all",
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        **result,
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
