"""What the timing benchmarks share: their command line, a dataset folder's training and test
images, and the fields of their JSON records that name those images."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


def images_record(data: Path, train: list[str], tests: list[str]) -> dict[str, Any]:
    """The fields of a timing record that say which images it timed (`suite.write_results`
    adds the date, the command and the machine)."""
    return {"data": str(data), "n_train": len(train), "n_predict": len(tests)}
