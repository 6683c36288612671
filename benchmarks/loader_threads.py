"""Where the resize to the model's input runs: on the caller's thread (now) or in the image
loader's decoding threads (before), for predict one image at a time, predict in batches of 16
and the default fit.

    python benchmarks/loader_threads.py [--data ../shared/datasets/mvtec_ad/bottle]
                                        [--images 60] [--rounds 3] [--json out.json]

The resize is a torch operation; on another thread it starts a second intra-op pool that
competes with the model's for the same cores. Both ways run in one process, alternating, on
the same fitted model and images; only the loader differs. Prints each way's times and the
ratios, and writes JSON.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from suite import write_results
from timing_data import images_record, parse_timing_args

import defectscope.detector.detector as detector_module
import defectscope.detector.fitting as fitting_module
import defectscope.detector.selection as selection_module
from defectscope.data import loading
from defectscope.detector.detector import Detector
from defectscope.errors import ImageLoadError
from defectscope.experiment import compose

USERS = (detector_module, fitting_module, selection_module)


def prepare_in_threads(
    sources: Sequence[Any],
    batch_size: int,
    workers: int = 2,
    prepare: Callable[[np.ndarray], Any] | None = None,
    digest: bool = False,
) -> Iterator[list[loading.LoadedImage]]:
    """The former loader: decode, digest and ``prepare`` all in the threads, one batch ahead."""

    def load_and_prepare(index: int) -> loading.LoadedImage:
        name = loading.describe_source(sources[index])
        try:
            image = loading.load_image(sources[index])
        except ImageLoadError as exc:
            return loading.LoadedImage(index, name, None, exc)
        prepared = prepare(image) if prepare is not None else None
        hashed = loading.pixel_digest(image) if digest else None
        return loading.LoadedImage(index, name, image, None, prepared, hashed)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        ahead = [pool.submit(load_and_prepare, i) for i in range(min(2 * batch_size, len(sources)))]
        submitted = len(ahead)
        while ahead:
            batch = [future.result() for future in ahead[:batch_size]]
            ahead = ahead[batch_size:]
            while len(ahead) < 2 * batch_size and submitted < len(sources):
                ahead.append(pool.submit(load_and_prepare, submitted))
                submitted += 1
            yield batch


WAYS: dict[str, Any] = {"caller_thread": loading.iter_loaded, "loader_threads": prepare_in_threads}


def use(way: str) -> None:
    for module in USERS:
        module.iter_loaded = WAYS[way]  # type: ignore[attr-defined]


def predict_ms(detector: Detector, tests: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    detector.predict(tests, batch_size=batch_size)
    return (time.perf_counter() - start) * 1000.0 / len(tests)


def main() -> None:
    args, train, tests = parse_timing_args(__doc__.splitlines()[0], images=60, rounds=3)
    times: dict[str, dict[str, list[float]]] = {way: {} for way in WAYS}
    detector = Detector(compose(None, []).detector).fit(train)
    detector.predict(tests[:4], batch_size=1)  # warm-up
    for _ in range(args.rounds):
        for way in WAYS:
            use(way)
            for name, size in (("predict_ms_batch_1", 1), ("predict_ms_batch_16", 16)):
                times[way].setdefault(name, []).append(predict_ms(detector, tests, size))
    for _ in range(2):
        for way in WAYS:
            use(way)
            start = time.perf_counter()
            Detector(compose(None, []).detector).fit(train)
            times[way].setdefault("fit_s", []).append(time.perf_counter() - start)
    use("caller_thread")
    medians = {
        w: {k: round(statistics.median(v), 2) for k, v in t.items()} for w, t in times.items()
    }
    ratios = {
        key: round(medians["caller_thread"][key] / medians["loader_threads"][key], 3)
        for key in medians["caller_thread"]
    }
    for way, row in medians.items():
        print(f"{way:15s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    print("caller_thread / loader_threads: " + "  ".join(f"{k} {v}x" for k, v in ratios.items()))
    if args.json:
        record = {
            **images_record(args.data, train, tests),
            "medians": medians,
            "runs": {
                w: {k: [round(x, 2) for x in v] for k, v in t.items()} for w, t in times.items()
            },
            "ratios": ratios,
        }
        write_results(args.json, "benchmarks/loader_threads.py", record)


if __name__ == "__main__":
    main()
