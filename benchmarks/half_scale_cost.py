"""What the half-size bank costs: the default fit and predict (two banks) against one bank.

    python benchmarks/half_scale_cost.py [--data ../shared/datasets/mvtec_ad/bottle]
                                         [--images 40] [--json out.json]

One process fits one bank (``features.half_size_bank=0``), then the default, then one bank
again (the spread of the two one-bank runs is the noise), each on every training image; then
predicts ``--images`` test images one at a time from their files (decoding included). Prints
the ratios of the default to one bank and writes JSON.
"""

from __future__ import annotations

import argparse
import time

from suite import write_results
from timing_data import images_record, parse_timing_args

from defectscope.detector.detector import Detector
from defectscope.experiment import compose

ONE_BANK = ["detector.features.half_size_bank=0"]
RUNS = [("one_bank", ONE_BANK), ("default", []), ("one_bank", ONE_BANK)]


def measure(train: list[str], tests: list[str], overrides: list[str]) -> dict:
    start = time.perf_counter()
    detector = Detector(compose(None, overrides).detector).fit(train)
    fit_s = time.perf_counter() - start
    detector.predict(tests[:2], batch_size=1)  # warm-up
    start = time.perf_counter()
    detector.predict(tests, batch_size=1)
    per_image_ms = (time.perf_counter() - start) * 1000.0 / len(tests)
    return {
        "fit_s": round(fit_s, 2),
        "predict_ms_per_image": round(per_image_ms, 1),
        "bank": list(detector.memory_bank.shape),
        "banks": {name: list(bank.shape) for name, bank in detector.memory_banks().items()},
        "timings": detector.info.timings if detector.info else {},
    }


def compare(
    args: argparse.Namespace,
    train: list[str],
    tests: list[str],
    runs: list[tuple[str, list[str]]],
    script: str,
) -> None:
    """Fit and predict once per run (the default between two baseline runs: their spread is
    the noise), print each and the default's ratios to the baselines' mean, write JSON."""
    rows = []
    for name, overrides in runs:
        row = {"name": name, **measure(train, tests, overrides)}
        print(f"{name:11s} fit {row['fit_s']:7.2f} s  predict {row['predict_ms_per_image']:6.1f} "
              f"ms/image  bank {row['bank']}", flush=True)  # fmt: skip
        rows.append(row)
    baseline = [r for r in rows if r["name"] != "default"]
    default = next(r for r in rows if r["name"] == "default")
    ratios = {
        key: round(default[key] / (sum(r[key] for r in baseline) / len(baseline)), 2)
        for key in ("fit_s", "predict_ms_per_image")
    }
    fit, predict = ratios["fit_s"], ratios["predict_ms_per_image"]
    print(f"default / {baseline[0]['name']}: fit {fit}x, predict {predict}x")
    if args.json:
        record = {**images_record(args.data, train, tests), "runs": rows, "ratios": ratios}
        write_results(args.json, script, record)


def main() -> None:
    args, train, tests = parse_timing_args(__doc__.splitlines()[0], images=40)
    compare(args, train, tests, RUNS, "benchmarks/half_scale_cost.py")


if __name__ == "__main__":
    main()
