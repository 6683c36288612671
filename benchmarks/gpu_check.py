"""GPU path check: fit, evaluate and time on CUDA; parity of CUDA vs CPU scores; fp16.

    python benchmarks/gpu_check.py --data PATH [--json out.json]

Run on a machine with a GPU (in this project: the lent H100/H200, see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bottle import latency


def timed_fit(config: dict, train: list) -> tuple:
    from defectscope.detector.detector import Detector

    torch.cuda.synchronize()
    start = time.perf_counter()
    detector = Detector(config).fit(train)
    torch.cuda.synchronize()
    return detector, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from defectscope.data.datasets import open_dataset
    from defectscope.data.io import load_image
    from defectscope.detector.detector import Detector
    from defectscope.evaluation.runner import evaluate

    out: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "cpu_threads": torch.get_num_threads(),
    }
    dataset = open_dataset(args.data)
    train = [s.path for s in dataset.train]
    test_images = [load_image(s.path) for s in dataset.test]

    def section(name: str, fn) -> None:
        try:
            out[name] = fn()
        except Exception as exc:  # keep going: every section is reported
            out[name] = {"error": repr(exc), "trace": traceback.format_exc()[-2000:]}
        print(name, json.dumps(out[name])[:800], flush=True)

    state: dict = {}

    def fit_cuda() -> dict:
        timed_fit({"device": "cuda"}, train[:32])  # warm-up (cuDNN autotune, allocator)
        detector, wall = timed_fit({"device": "cuda"}, train)
        state["cuda"] = detector
        return {
            "wall_s": round(wall, 3),
            **detector.info.timings,
            "bank": detector.info.bank_size,
        }

    def evaluate_cuda() -> dict:
        metrics = evaluate(state["cuda"], dataset).to_dict()["metrics"]
        return {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")}

    def latency_cuda() -> dict:
        detector = state["cuda"]
        return {f"batch{b}": latency(detector, test_images[:64], b, repeats=3) for b in (1, 16, 64)}

    def parity_cpu_vs_cuda() -> dict:
        path = state["cuda"].save("/tmp/gpu_model")
        cpu = Detector.load(path, device="cpu")
        gpu = Detector.load(path, device="cuda")
        a = cpu.predict(test_images, batch_size=16)
        b = gpu.predict(test_images, batch_size=16)
        sa = np.array([p.score for p in a])
        sb = np.array([p.score for p in b])
        map_diff = max(
            float(np.abs(x.anomaly_map - y.anomaly_map).max()) for x, y in zip(a, b, strict=True)
        )
        return {
            "max_rel_score_diff": float(np.max(np.abs(sa - sb) / np.abs(sa))),
            "max_abs_map_diff": map_diff,
            "map_scale": float(np.mean([p.anomaly_map.max() for p in a])),
            "decisions_identical": bool(
                all(x.is_anomalous == y.is_anomalous for x, y in zip(a, b, strict=True))
            ),
        }

    def half_precision() -> dict:
        detector, wall = timed_fit({"device": "cuda", "half_precision": True}, train)
        metrics = evaluate(detector, dataset).to_dict()["metrics"]
        fp32 = np.array([p.score for p in state["cuda"].predict(test_images, batch_size=16)])
        fp16 = np.array(
            [
                p.score
                for p in Detector.load(detector.save("/tmp/gpu_model_fp16"), device="cuda").predict(
                    test_images, batch_size=16
                )
            ]
        )
        return {
            "fit_wall_s": round(wall, 3),
            **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")},
            "latency_batch16": latency(detector, test_images[:64], 16, repeats=3),
            "score_corr_with_fp32": float(np.corrcoef(fp32, fp16)[0, 1]),
        }

    section("fit_cuda", fit_cuda)
    section("evaluate_cuda", evaluate_cuda)
    section("latency_cuda", latency_cuda)
    section("parity_cpu_vs_cuda", parity_cpu_vs_cuda)
    section("half_precision", half_precision)
    out["peak_gpu_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
