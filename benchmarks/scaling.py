"""How fit time, fit memory, bank size, predict latency and quality grow with the training set.

    python benchmarks/scaling.py --n 200,2000 [--data ../shared/datasets/mvtec_ad/bottle]
        [--json benchmarks/results/scaling.json] [--knn torch,faiss_ivf,faiss_hnsw]
        [key=value detector overrides, e.g. detector.fit.chunk_images=64]

N training images come from bottle's train/good: image k is good image k % 209; copies after
the first pass are deterministic augmentations of it: one of its 8 dihedral views (rotations by
90 degrees, mirror) and ``defectscope.data.augment`` brightness and contrast within +-10%,
seeded by the image's position. Bases are decoded once at 512 px and copies generated lazily,
one fit chunk at a time, so the input set itself costs little
memory. Each N is fitted in a fresh process (peak RSS is per process) with the default config
plus the overrides, then evaluated on bottle's test split: image/pixel AUROC, predict latency at
batch 1, and for every ``--knn`` backend the recall@1 of its nearest neighbours against exact
search (test-image patches as queries) with the AUROCs and latency under that backend.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "scaling.json"
BASE_SIDE = 512


class AugmentedCopies(Sequence):
    """``n`` training images built on access from decoded base images (a lazy Sequence)."""

    def __init__(self, bases: list[np.ndarray], n: int, seed: int = 0) -> None:
        from defectscope.data.augment import Augmentation

        self.bases = bases
        self.n = n
        self.augmentation = Augmentation.from_dict(
            {
                "seed": seed,
                "ops": [
                    {"name": "brightness", "factor": [0.9, 1.1]},
                    {"name": "contrast", "factor": [0.9, 1.1]},
                ],
            }
        )

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not 0 <= index < self.n:
            raise IndexError(index)
        copy, base = divmod(index, len(self.bases))
        if copy == 0:
            return self.bases[base]
        # A dihedral view (a bottle seen from above is still a good bottle) plus a seeded
        # photometric change: cheap enough not to dominate the fit it feeds.
        image = np.rot90(self.bases[base], k=copy % 4)
        if (copy // 4) % 2:
            image = image[:, ::-1]
        image, _ = self.augmentation.apply(np.ascontiguousarray(image), key=f"{base}/{copy}")
        return image


def load_bases(paths: list[Path]) -> list[np.ndarray]:
    from PIL import Image

    from defectscope.data.io import load_image

    out = []
    for path in paths:
        image = Image.fromarray(load_image(path))
        out.append(np.array(image.resize((BASE_SIDE, BASE_SIDE), Image.BILINEAR)))
    return out


class StageMemory:
    """Peak RSS per fit stage (the fit's progress callback names the stage), sampled at 20 Hz."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.stage = "features"
        self.peaks: dict[str, float] = {}
        self.last_report = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def progress(self, stage: str, done: int, total: int) -> None:
        self.stage = stage
        now = time.perf_counter()
        if now - self.last_report > 30 or done == total:
            self.last_report = now
            print(f"  {stage} {done}/{total}", file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = self.process.memory_info().rss / 2**20
            self.peaks[self.stage] = round(max(self.peaks.get(self.stage, 0.0), rss), 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def latency_ms(detector, images: list[np.ndarray], repeats: int = 2) -> dict:
    detector.predict(images[0])  # warm-up (also builds an approximate index)
    times = []
    for _ in range(repeats):
        for image in images:
            start = time.perf_counter()
            detector.predict(image, batch_size=1)
            times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {
        "median": round(statistics.median(times), 2),
        "p90": round(times[int(0.9 * (len(times) - 1))], 2),
    }


@torch.inference_mode()
def recall_at_1(detector, images: list[np.ndarray]) -> float:
    """Share of test patches whose nearest bank row under the current backend is the exact one."""
    from defectscope.detector.knn import TorchKnn

    exact = TorchKnn(detector.scorer.bank)
    hits = total = 0
    for image in images:
        embeddings = detector.embed(detector.preprocessor([image]))
        queries, _, idx = detector.scorer.patch_distances(embeddings)
        _, exact_idx = exact.search(queries, 1)
        hits += int((idx[:, 0] == exact_idx[:, 0]).sum())
        total += idx.shape[0]
    return hits / max(1, total)


def use_backend(detector, backend: str) -> None:
    detector.config.scoring.knn_backend = backend
    detector.scorer.config = detector.config.scoring
    detector.scorer._index = None  # rebuilt from the bank on next use


def quality(detector, dataset) -> dict:
    from defectscope.evaluation.runner import evaluate

    metrics = evaluate(detector, dataset, max_overlays=0).to_dict()["metrics"]
    return {k: metrics.get(k) for k in ("image_auroc", "pixel_auroc", "aupro")}


def run_one(
    data: Path, n: int, overrides: list[str], knn: list[str], latency_images: int, threads: int
) -> dict:
    from defectscope.data.datasets import open_dataset
    from defectscope.data.io import load_image
    from defectscope.detector.detector import Detector
    from defectscope.experiment import compose

    if threads:
        torch.set_num_threads(threads)
        try:
            import faiss

            faiss.omp_set_num_threads(threads)
        except ImportError:
            pass
    config = compose(None, overrides).detector
    dataset = open_dataset(data)
    bases = load_bases([s.path for s in dataset.train])
    images = AugmentedCopies(bases, n)
    rss_before = peak_rss_mib()
    sampler = StageMemory()
    start = time.perf_counter()
    detector = Detector(config).fit(images, progress=sampler.progress)
    fit_wall = time.perf_counter() - start
    rss_fit = peak_rss_mib()
    sampler.stop()
    del images, bases

    test_images = [load_image(s.path) for s in dataset.test[:latency_images]]
    result = {
        "n_images": n,
        "fit": {
            "wall_s": round(fit_wall, 2),
            **detector.info.timings,
            "chunks": detector.info.training.n_chunks,
            "n_patches": detector.info.training.n_patches,
            "n_candidates": detector.info.training.n_candidates,
            "n_calibration": detector.info.training.n_calibration,
        },
        "bank_size": detector.info.bank_size,
        "peak_rss_mib": {
            "before_fit": round(rss_before, 1),
            "after_fit": round(rss_fit, 1),
            "by_stage": sampler.peaks,
        },
        "backends": {},
    }
    print(f"N={n}: fitted in {fit_wall:.1f} s, {rss_fit:.0f} MiB", file=sys.stderr, flush=True)
    for backend in knn:
        use_backend(detector, backend)
        try:
            t0 = time.perf_counter()
            _ = detector.scorer.index
            build_s = time.perf_counter() - t0
            result["backends"][backend] = {
                "index_build_s": round(build_s, 3),
                "recall_at_1": round(recall_at_1(detector, test_images[:8]), 4),
                "latency_batch1_ms": latency_ms(detector, test_images),
                **quality(detector, dataset),
            }
        except Exception as exc:  # one backend failing must not lose the others' numbers
            result["backends"][backend] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"N={n} {backend}: {result['backends'][backend]}", file=sys.stderr, flush=True)
    result["peak_rss_mib"]["overall"] = round(peak_rss_mib(), 1)
    return result


def _child(queue, *args) -> None:
    try:
        queue.put(run_one(*args))
    except BaseException as exc:  # reported by the parent, which goes on with the next N
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'N':>6} {'fit s':>8} {'feat s':>8} {'coreset s':>9} {'calib s':>8} {'RSS MiB':>8} "
        f"{'bank':>6} {'backend':>12} {'recall@1':>8} {'ms/img':>7} {'img AUROC':>9} "
        f"{'px AUROC':>8}"
    )
    print(header)
    for row in rows:
        if "error" in row:
            print(f"{row['n_images']:>6} failed: {row['error']}")
            continue
        fit = row["fit"]
        for backend, b in row["backends"].items():
            if "error" in b:
                print(f"{row['n_images']:>6} {backend:>12} failed: {b['error']}")
                continue
            print(
                f"{row['n_images']:>6} {fit['wall_s']:>8.1f} {fit['features_s']:>8.1f} "
                f"{fit['coreset_s']:>9.1f} {fit['calibration_s']:>8.1f} "
                f"{row['peak_rss_mib']['after_fit']:>8.0f} {row['bank_size']:>6} {backend:>12} "
                f"{b['recall_at_1']:>8.4f} {b['latency_batch1_ms']['median']:>7.1f} "
                f"{b['image_auroc']:>9.4f} {b['pixel_auroc']:>8.4f}"
            )


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--n", type=int_list, default=[200, 2000], help="training sizes, e.g. 200,2000,20000"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write results here")
    parser.add_argument(
        "--knn",
        type=lambda text: text.split(","),
        default=["torch"],
        help="kNN backends to evaluate on each bank, e.g. torch,faiss_ivf,faiss_hnsw",
    )
    parser.add_argument("--latency-images", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: all); 1 is faster on a machine busy with other work",
    )
    parser.add_argument("overrides", nargs="*", help="detector overrides, key=value")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"dataset not found: {args.data}")
    from defectscope.config import ScoringConfig

    for backend in args.knn:
        if backend not in ScoringConfig.model_fields["knn_backend"].annotation.__args__:
            sys.exit(f"unknown kNN backend {backend!r}")
    context = multiprocessing.get_context("spawn")
    rows = []
    for n in args.n:
        queue = context.Queue()
        child = context.Process(
            target=_child,
            args=(queue, args.data, n, args.overrides, args.knn, args.latency_images, args.threads),
        )
        child.start()
        row = queue.get()
        child.join()
        rows.append({"n_images": n, **row})
        print(json.dumps(rows[-1]), flush=True)
    stamp = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads or torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "data": str(args.data),
        "overrides": args.overrides,
    }
    print_table(rows)
    # Runs of other N already in the file stay (e.g. a later --n 20000 joins 200 and 2000);
    # each run carries its own date and machine.
    previous = json.loads(args.json.read_text()).get("runs", []) if args.json.is_file() else []
    runs = {run["n_images"]: run for run in previous}
    runs.update({row["n_images"]: {**stamp, **row} for row in rows})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"runs": [runs[n] for n in sorted(runs)]}, indent=2))


if __name__ == "__main__":
    main()
