"""How far fit, predict and evaluate are from their floor: decoding the images and running the
backbone's feature layers once.

    python benchmarks/floor.py [--data ../shared/datasets/mvtec_ad/bottle] [--repeats 3]
        [--only fit,fit_fixed,predict,predict_no_images,evaluate] [--device auto]
        [--json benchmarks/results/floor.json]

Every measurement is a whole process, start-up included. The floor is a plain script (this file
with ``--floor``): decode the images with PIL in two threads, resize and normalise them with
torch as the model's preprocessing does, and run the backbone's feature layers, nothing else.
It is run twice per pair: with the timm model as built (the plain backbone cost, the ratio
reported) and with the project's inference rewrites (BatchNorm folded, "same" padding without
a copy; ``ratio_to_rewritten``), which the commands themselves use. Each command runs right
after its floor runs over the same images (training images for fit, test images for predict
and evaluate), pair after pair, so that load from other work on the machine hits both alike;
the ratio reported is the median over the pairs. On CUDA when present (``--device auto``).

Commands: ``fit`` (defaults: auto mode), ``fit_fixed`` (``--no-auto``), ``predict`` (JSONL, CSV
and the heatmap, overlay and mask PNGs), ``predict_no_images`` (``--no-images``) and
``evaluate``.
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

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "floor.json"
COMMANDS = ("fit", "fit_fixed", "predict", "predict_no_images", "evaluate")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def floor_run(
    folder: Path, size: tuple[int, int], device: str, batch_size: int, rewrite: bool
) -> None:
    """The floor itself (run in a fresh process): decode, resize, backbone feature layers."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from defectscope.config import BackboneConfig
    from defectscope.features.backbones import create_backbone

    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
    if device not in ("auto", "cpu"):
        target = torch.device(device)
    backbone = create_backbone(BackboneConfig(), rewrite=rewrite).to(target).eval()
    mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 3, 1, 1)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)

    def decode(path: Path) -> torch.Tensor:
        array = np.array(Image.open(path).convert("RGB"))
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        return F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True)[0]

    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack(list(pool.map(decode, paths[start : start + batch_size])))
            maps = backbone(((batch - mean) / std).to(target))
            if target.type == "cuda":
                torch.cuda.synchronize()
            del maps
    print(f"floor: {len(paths)} images")


def timed(command: list[str]) -> float:
    """Wall seconds of one whole process; its output is kept only when it fails."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}"
        )
    return seconds


def input_size(model: Path) -> tuple[int, int]:
    """The network input size a fitted model resizes to (read from its metadata)."""
    from defectscope.detector.model_file import read_model_file, resolve_model_path

    _, meta = read_model_file(resolve_model_path(model))
    height, width = meta["preprocessing"]["input_size"]
    return int(height), int(width)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--repeats", type=int, default=3, help="floor/command pairs each")
    parser.add_argument("--only", default=",".join(COMMANDS), help="comma-separated commands")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 256), help=argparse.SUPPRESS)
    parser.add_argument("--rewrite", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor is not None:
        floor_run(args.floor, tuple(args.size), args.device, args.batch_size, args.rewrite)
        return {}
    wanted = [c for c in args.only.split(",") if c]
    unknown = set(wanted) - set(COMMANDS)
    if unknown:
        sys.exit(f"unknown commands {sorted(unknown)}; choose from {COMMANDS}")
    if not (args.data / "train").is_dir():
        sys.exit(f"dataset not found: {args.data}")
    cli = [shutil.which("defectscope") or "defectscope"]
    work = Path(tempfile.mkdtemp(prefix="defectscope-floor-"))
    model = work / "model"
    device = ["--device", args.device]
    try:
        # A model for predict and evaluate, and the input size the floor resizes to.
        timed([*cli, "fit", str(args.data), "-o", str(model), *device])
        size = input_size(model)
        train, test = args.data / "train", args.data / "test"

        def floor(folder: Path) -> list[str]:
            sizes = [str(s) for s in size]
            return [sys.executable, __file__, "--floor", str(folder), "--size", *sizes]

        floor_args = [*device, "--batch-size", str(args.batch_size)]
        commands = {
            "fit": (train, [*cli, "fit", str(args.data), "-o", str(work / "m1"), "--overwrite"]),
            "fit_fixed": (
                train,
                [*cli, "fit", str(args.data), "-o", str(work / "m2"), "--overwrite", "--no-auto"],
            ),
            "predict": (test, [*cli, "predict", str(model), str(test), "-o", str(work / "p1")]),
            "predict_no_images": (
                test,
                [*cli, "predict", str(model), str(test), "-o", str(work / "p2"), "--no-images"],
            ),
            "evaluate": (
                test,
                [*cli, "evaluate", str(model), str(args.data), "-r", str(work / "r")],
            ),
        }
        results: dict[str, dict] = {}
        for name in wanted:
            folder, command = commands[name]
            command = command + device
            pairs = []
            for _ in range(args.repeats):
                floor_s = timed(floor(folder) + floor_args)
                rewritten_s = timed([*floor(folder), *floor_args, "--rewrite"])
                command_s = timed(command)
                pairs.append(
                    {
                        "floor_s": round(floor_s, 2),
                        "floor_rewritten_s": round(rewritten_s, 2),
                        "command_s": round(command_s, 2),
                    }
                )
                for out in ("p1", "p2", "r"):
                    shutil.rmtree(work / out, ignore_errors=True)
            ratios = [p["command_s"] / p["floor_s"] for p in pairs]
            rewritten = [p["command_s"] / p["floor_rewritten_s"] for p in pairs]
            results[name] = {
                "images": "train" if folder == train else "test",
                "floor_s": statistics.median(p["floor_s"] for p in pairs),
                "floor_rewritten_s": statistics.median(p["floor_rewritten_s"] for p in pairs),
                "command_s": statistics.median(p["command_s"] for p in pairs),
                "ratio": round(statistics.median(ratios), 2),
                "ratio_to_rewritten": round(statistics.median(rewritten), 2),
                "pairs": pairs,
            }
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "data": str(args.data),
        "input_size": list(size),
        "device": args.device,
        "repeats": args.repeats,
        "results": results,
    }
    print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    return report


def print_table(results: dict[str, dict]) -> None:
    print("| command | images | floor s (plain) | floor s (rewritten) | command s | ratio |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(
            f"| {name} | {row['images']} | {row['floor_s']:.1f} | "
            f"{row['floor_rewritten_s']:.1f} | {row['command_s']:.1f} | {row['ratio']:.2f}x "
            f"({row['ratio_to_rewritten']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
