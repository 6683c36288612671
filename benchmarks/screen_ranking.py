"""How the exact nearest-neighbour search ranks its bfloat16 screen: a top-k over each whole
row (before) against group minima ranked as int16 (`knn_screen.smallest_columns`, now), with
the float32 search as the reference, on the default model's real bank and patch queries.

    python benchmarks/screen_ranking.py [--data ../shared/datasets/mvtec_ad/bottle]
                                        [--images 20] [--rounds 5] [--json out.json]

Fits the default model once, embeds ``--images`` test images at full size, then searches each
image's patches against the full-size bank (k = 1, as the default scores) in the three ways,
alternating, ``--rounds`` times. Every way must return the same neighbours (checked). Prints
milliseconds per image (median over rounds) and the ratios, and writes JSON.
"""

from __future__ import annotations

import statistics
import time

import torch
from suite import write_results
from timing_data import images_record, parse_timing_args

from defectscope.data.io import load_image
from defectscope.detector import knn_screen
from defectscope.detector.detector import Detector
from defectscope.detector.knn import TorchKnn
from defectscope.experiment import compose

NOW = knn_screen.smallest_columns


def whole_row_top_k(block: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The former ranking: a bfloat16 top-k over every column of the row."""
    return block.topk(n, dim=1, largest=False, sorted=True)


WAYS = {
    "float32": (False, NOW),
    "screen_row_top_k": (True, whole_row_top_k),
    "screen_groups": (True, NOW),
}


def main() -> None:
    args, train, tests = parse_timing_args(__doc__.splitlines()[0], images=20, rounds=5)
    detector = Detector(compose(None, []).detector).fit(train)
    if not knn_screen.screen_supported(detector.memory_bank.device):
        raise SystemExit("this CPU has no fast bfloat16 (AVX512-BF16 or AMX): the screen is off")
    parts, preprocessor = detector.feature_parts(), detector._fitted_preprocessor
    with torch.inference_mode():
        queries = []
        for path in tests:
            embedded = parts.embed(preprocessor([load_image(path)]))
            queries.append(embedded.permute(0, 2, 3, 1).reshape(-1, embedded.shape[1]))
    bank = detector.memory_bank
    indexes = {way: TorchKnn(bank, screen=screen) for way, (screen, _) in WAYS.items()}
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    found: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for way, (_, ranking) in WAYS.items():
                knn_screen.smallest_columns = ranking  # type: ignore[assignment]
                start = time.perf_counter()
                found[way] = [indexes[way].search(q, 1)[1] for q in queries]
                times[way].append((time.perf_counter() - start) * 1000.0 / len(queries))
    knn_screen.smallest_columns = NOW
    same = all(
        torch.equal(a, b) for way in WAYS for a, b in zip(found[way], found["float32"], strict=True)
    )
    medians = {way: round(statistics.median(values), 2) for way, values in times.items()}
    ratios = {way: round(medians[way] / medians["screen_row_top_k"], 3) for way in WAYS}
    for way in WAYS:
        print(f"{way:17s} {medians[way]:7.2f} ms per image  ({ratios[way]}x the row top-k)")
    print(
        f"bank {list(bank.shape)}, {queries[0].shape[0]} queries per image; same neighbours: {same}"
    )
    if not same:
        raise SystemExit("the ways disagree: the screen is not exact")
    if args.json:
        record = {
            **images_record(args.data, train, tests),
            "bank": list(bank.shape),
            "queries_per_image": int(queries[0].shape[0]),
            "ms_per_image": medians,
            "runs": {way: [round(x, 2) for x in values] for way, values in times.items()},
            "ratios_to_row_top_k": ratios,
            "same_neighbours": same,
        }
        write_results(args.json, "benchmarks/screen_ranking.py", record)


if __name__ == "__main__":
    main()
