"""Latency and throughput of the default model on PyTorch vs onnxruntime vs OpenVINO (CPU).

    python benchmarks/runtimes.py [--model MODEL_DIR] [--repeats 10] [--out results.json]

Fits the default model on MVTec AD bottle (../shared/datasets/mvtec_ad/bottle) unless --model
names a saved one, exports it, and times at batch 1 and 16:
- ``score_batch``: model work only, from the preprocessed tensor;
- ``predict``: end to end from decoded RGB arrays (preprocess, model, maps back to original
  size, thresholds), the number a user sees.
Reports the median of ``--repeats`` runs after a warm-up, images/s, and the model file sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from defectscope import Detector
from defectscope.export import export_onnx, export_openvino, load_exported
from defectscope.export.graph import default_threads

BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mvtec_ad" / "bottle"


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: lazy init, allocator, oneDNN primitive cache
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="saved model folder (default: fit on bottle)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "runtimes_cpu.json"
    )
    args = parser.parse_args()

    if not (BOTTLE / "train" / "good").is_dir():
        print(f"MVTec AD bottle not found at {BOTTLE}; this benchmark needs it", file=sys.stderr)
        return 1
    threads = default_threads()
    torch.set_num_threads(threads)
    if args.model is not None:
        detector = Detector.load(args.model, device="cpu")
    else:
        print("fitting the default model on bottle ...", flush=True)
        detector = Detector({"device": "cpu"}).fit(
            sorted((BOTTLE / "train" / "good").glob("*.png"))
        )
    test = sorted((BOTTLE / "test").glob("*/*.png"))[: max(args.batches)]
    arrays = [np.array(Image.open(p).convert("RGB")) for p in test]

    work = Path(tempfile.mkdtemp(prefix="defectscope-bench-"))
    onnx_path = export_onnx(detector, work / "model.onnx")
    onnx16_path = export_onnx(detector, work / "model_fp16.onnx", precision="fp16")
    runtimes: dict[str, Detector] = {"torch": detector, "onnxruntime": load_exported(onnx_path)}
    sizes = {
        "safetensors (bank only)": detector.save(work / "torch").stat().st_size,
        "onnx fp32": onnx_path.stat().st_size,
        "onnx fp16": onnx16_path.stat().st_size,
    }
    try:
        xml = export_openvino(detector, work / "model.xml")
        runtimes["openvino"] = load_exported(xml, "openvino")
        sizes["openvino IR fp32"] = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    except Exception as exc:  # openvino missing or failing must not lose the other numbers
        print(f"openvino skipped: {exc}", file=sys.stderr)

    rows = []
    for batch in args.batches:
        images = (arrays * batch)[:batch]
        tensor = detector.preprocessor(images)
        for name, runtime in runtimes.items():
            model_s = median_seconds(lambda r=runtime, t=tensor: r.score_batch(t), args.repeats)
            e2e_s = median_seconds(
                lambda r=runtime, i=images, b=batch: r.predict(i, batch_size=b), args.repeats
            )
            rows.append(
                {
                    "runtime": name,
                    "batch": batch,
                    "model_ms_per_batch": round(model_s * 1000, 2),
                    "model_images_per_s": round(batch / model_s, 2),
                    "predict_ms_per_batch": round(e2e_s * 1000, 2),
                    "predict_images_per_s": round(batch / e2e_s, 2),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print(f"\nCPU threads: {threads}, input {detector.preprocessor.input_size}, "
          f"bank {detector.scorer.bank.shape[0]} x {detector.scorer.bank.shape[1]}")  # fmt: skip
    header = f"{'runtime':<12} {'batch':>5} {'model ms':>10} {'model img/s':>12} "
    header += f"{'predict ms':>11} {'predict img/s':>14} {'speedup':>8}"
    print(header)
    base = {r["batch"]: r["model_ms_per_batch"] for r in rows if r["runtime"] == "torch"}
    for r in rows:
        speedup = base[r["batch"]] / r["model_ms_per_batch"]
        print(
            f"{r['runtime']:<12} {r['batch']:>5} {r['model_ms_per_batch']:>10.1f} "
            f"{r['model_images_per_s']:>12.1f} {r['predict_ms_per_batch']:>11.1f} "
            f"{r['predict_images_per_s']:>14.1f} {speedup:>7.2f}x"
        )
    print("\nfile sizes:")
    for name, size in sizes.items():
        print(f"  {name:<26} {size / 1e6:8.2f} MB")

    result = {
        "cpu_threads": threads,
        "cpu": os.uname().machine,
        "torch": torch.__version__,
        "input_size": list(detector.preprocessor.input_size),
        "bank_shape": list(detector.scorer.bank.shape),
        "repeats": args.repeats,
        "rows": rows,
        "file_sizes_bytes": sizes,
    }
    for module in ("onnxruntime", "openvino"):
        with contextlib.suppress(ImportError):
            result[module] = __import__(module).__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
