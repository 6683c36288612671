"""What the timing benchmarks share: a dataset folder's training and test images, and the
header of their JSON records (date, command, machine, data)."""

from __future__ import annotations

import argparse
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"


def train_and_test(data: Path, n_test: int) -> tuple[list[str], list[str]]:
    """The PNGs of ``data/train/good`` and the first ``n_test`` of ``data/test/*`` (sorted);
    exits with a message where there are no training images."""
    if not (data / "train" / "good").is_dir():
        raise SystemExit(f"no training images: {data / 'train' / 'good'} is not a folder")
    train = sorted(str(p) for p in (data / "train" / "good").glob("*.png"))
    tests = sorted(str(p) for p in (data / "test").glob("*/*.png"))[:n_test]
    return train, tests


def parse_timing_args(
    description: str, images: int, rounds: int | None = None
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """The timing benchmarks' command line (--data, --images, --json and, where the script
    repeats, --rounds) and the images it names (`train_and_test`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=images)
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    train, tests = train_and_test(args.data, args.images)
    return args, train, tests


def record_header(script: str, data: Path, train: list[str], tests: list[str]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": f"python benchmarks/{script}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "data": str(data),
        "n_train": len(train),
        "n_predict": len(tests),
    }
