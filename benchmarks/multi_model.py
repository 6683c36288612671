"""Many models in one server: memory per model with and without a shared backbone, and the
latency of the first request to a cold model next to a warm one.

    python benchmarks/multi_model.py [--model models/bottle] [--n 6] [--json FILE]

One ``defectscope serve --models DIR`` worker serves N copies of one model (the default
configuration, fitted on bottle ``train/good`` unless ``--model`` is given). For each of
"shared" (the default) and "not shared" (``DEFECTSCOPE_SHARE_BACKBONES=false``) it loads the
models one after the other by scoring an image with each, records the server's RSS after
each load, and times each model's first (cold: load + score) and second (warm) request. The
report says how many such models fit in 2 GiB at the measured cost per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from load_test import HOST, fit_default_model, free_port, pick_images, wait_ready

MIB = 1024 * 1024
BUDGET_MIB = 2048


def rss_mib(pid: int) -> float:
    """Resident memory of the server and its children (the uvicorn worker), MiB."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        total += child.memory_info().rss
    return total / MIB


def measure(models_dir: Path, names: list[str], image: bytes, share: bool, work: Path) -> dict:
    port = free_port()
    env = {
        **os.environ,
        "DEFECTSCOPE_PREDICTION_LOG_URL": "none",
        "DEFECTSCOPE_SHARE_BACKBONES": "true" if share else "false",
    }
    env.pop("DEFECTSCOPE_API_KEY", None)
    command = [sys.executable, "-c", "from defectscope.cli import main; main()", "serve"]
    command += ["--models", str(models_dir), "--default-model", names[0]]
    command += ["--host", HOST, "--port", str(port)]
    log_path = work / f"serve_{'shared' if share else 'own'}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://{HOST}:{port}"
    try:
        wait_ready(url, process, log_path, workers=1)
        rows = []
        with httpx.Client(base_url=url, timeout=300) as http:
            files = {"file": ("image.png", image)}
            http.post("/v1/predict", files=files).raise_for_status()  # the default, warm
            start_rss = rss_mib(process.pid)
            for name in names:
                timings = []
                for _ in range(2):
                    started = time.perf_counter()
                    http.post(f"/v1/models/{name}/predict", files=files).raise_for_status()
                    timings.append((time.perf_counter() - started) * 1000.0)
                rows.append(
                    {
                        "model": name,
                        "rss_mib": round(rss_mib(process.pid), 1),
                        "first_ms": round(timings[0], 1),
                        "warm_ms": round(timings[1], 1),
                    }
                )
            listed = http.get("/v1/models").json()
    finally:
        process.terminate()
        process.wait(timeout=30)
    # The default model was loaded at start-up: its first request above was not cold.
    cold = rows[1:]
    per_model = (rows[-1]["rss_mib"] - rows[0]["rss_mib"]) / max(1, len(rows) - 1)
    return {
        "share_backbones": share,
        "rss_after_default_mib": round(start_rss, 1),
        "rss_per_extra_model_mib": round(per_model, 1),
        "models_in_2gib": int(1 + (BUDGET_MIB - rows[0]["rss_mib"]) // max(per_model, 1e-6)),
        "first_request_ms_median": round(statistics.median(r["first_ms"] for r in cold), 1),
        "warm_request_ms_median": round(statistics.median(r["warm_ms"] for r in cold), 1),
        "estimated_bytes": {m["name"]: m["memory_bytes"] for m in listed["models"]},
        "loads": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="A model folder (default: fit one on bottle).")
    parser.add_argument("--data", type=Path, help="Dataset to fit on and take an image from.")
    parser.add_argument("--n", type=int, default=6, help="Models to serve (copies).")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/multi_model.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="defectscope-multi-"))
    try:
        fitted: dict = {}
        model = args.model
        if model is None:
            model = work / "fitted"
            fitted = fit_default_model(model, args.data)
        models_dir = work / "models"
        names = [f"m{i}" for i in range(args.n)]
        for name in names:
            (models_dir / name).mkdir(parents=True)
            shutil.copy(model / "model.safetensors", models_dir / name / "model.safetensors")
        image = pick_images(1, args.data)[0][1]
        runs = [measure(models_dir, names, image, share, work) for share in (True, False)]
        report = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "model_file_mib": round((model / "model.safetensors").stat().st_size / MIB, 2),
            **fitted,
            "n_models": args.n,
            "runs": runs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        for run in runs:
            print(
                f"share={run['share_backbones']}: +{run['rss_per_extra_model_mib']} MiB per "
                f"model, {run['models_in_2gib']} in 2 GiB; first request "
                f"{run['first_request_ms_median']} ms, warm {run['warm_request_ms_median']} ms"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
