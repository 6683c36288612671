"""Load test of the REST API on localhost (issue 3, part 8).

Starts ``defectscope serve`` on a free 127.0.0.1 port for each configuration (1 and 2 workers,
micro-batching on and off, and 78 concurrent users), measures a sequential single-request
baseline, then a bounded closed-loop load (N users, each posting the next image as soon as its
previous answer arrived, for a fixed time), and reports throughput and p50/p95/p99 latency. The
API overhead at p50 is the HTTP latency minus the direct in-process ``Detector.predict`` latency
on the same (decoded) images, measured alternately right after the sequential baseline.

    python benchmarks/load_test.py --json benchmarks/results/load_cpu.json
    python benchmarks/load_test.py --model models/bottle --duration 10 --users 8
    python benchmarks/load_test.py --engine locust ...   # Locust (benchmarks/locustfile.py)

Images: MVTec AD bottle test images from ``../shared/datasets/mvtec_ad/bottle`` (relative to the
repository's parent) when present, else generated brick-texture images. Without ``--model`` the
default model is fitted on bottle ``train/good`` (or on generated images) into a temporary
folder. All traffic goes to 127.0.0.1; every run is bounded in time and request count, and every
server started here is stopped before the script returns.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
HOST = "127.0.0.1"
# Hard caps so that no setting of the options turns this into an unbounded flood.
MAX_DURATION_S = 300.0
MAX_USERS = 200
MAX_REQUESTS_PER_RUN = 100_000


@dataclass
class ServerConfig:
    name: str
    workers: int
    batch_max_size: int
    batch_max_wait_ms: float
    users: int


@dataclass
class Stats:
    n: int
    n_errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    statuses: dict[str, int] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    # Linear interpolation between closest ranks, as numpy's default.
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(latencies_ms: list[float], statuses: list[int], seconds: float) -> Stats:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    ok = [lat for lat, status in zip(latencies_ms, statuses, strict=True) if status == 200]
    return Stats(
        n=len(ok),
        n_errors=len(statuses) - len(ok),
        seconds=round(seconds, 3),
        throughput_rps=round(len(ok) / seconds, 3) if seconds > 0 else 0.0,
        p50_ms=round(percentile(ok, 50), 2),
        p95_ms=round(percentile(ok, 95), 2),
        p99_ms=round(percentile(ok, 99), 2),
        mean_ms=round(statistics.fmean(ok), 2) if ok else float("nan"),
        statuses=counts,
    )


# ------------------------------------------------------------------------------ images
def pick_images(n: int, data: Path | None = None, seed: int = 0) -> list[tuple[str, bytes]]:
    """``n`` (name, encoded file) pairs: bottle test images (all defect types) or generated."""
    data = BOTTLE if data is None else data
    test = data / "test"
    if test.is_dir():
        files = sorted(p for p in test.rglob("*") if p.suffix.lower() in (".png", ".jpg"))
        random.Random(seed).shuffle(files)
        return [(str(p.relative_to(test)), p.read_bytes()) for p in files[:n]]
    return generated_images(n, seed)


def generated_images(n: int, seed: int = 0, size: int = 512) -> list[tuple[str, bytes]]:
    import numpy as np
    from PIL import Image
    from skimage import data as skdata

    texture = skdata.brick()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        y = int(rng.integers(0, texture.shape[0] - size + 1))
        x = int(rng.integers(0, texture.shape[1] - size + 1))
        crop = np.repeat(texture[y : y + size, x : x + size, None], 3, axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(crop).save(buffer, format="PNG")
        out.append((f"texture_{i:03d}.png", buffer.getvalue()))
    return out


# ------------------------------------------------------------------------------- model
def fit_default_model(out: Path, data: Path | None) -> dict:
    from defectscope.detector.detector import Detector

    data = BOTTLE if data is None else data
    started = time.perf_counter()
    if (data / "train" / "good").is_dir():
        detector = Detector().fit(sorted((data / "train" / "good").glob("*.png")))
        source = str(data / "train" / "good")
    else:
        detector = Detector().fit([encoded for _, encoded in generated_images(32, seed=99)])
        source = "generated brick texture (32 images)"
    detector.save(out)
    return {"fitted_on": source, "fit_s": round(time.perf_counter() - started, 1)}


def direct_latencies(model: Path, images: list[tuple[str, bytes]], repeats: int) -> dict:
    """In-process decode and ``Detector.predict`` per image, batch 1, as the server runs it."""
    from defectscope.data.io import load_image
    from defectscope.export.runtimes import load_detector

    detector = load_detector(model, "auto", None)
    decoded = [load_image(data) for _, data in images]
    for image in decoded[:2]:  # warm-up: first calls pay for allocation and kernel choice
        detector.predict([image], batch_size=1)
    decode_ms, predict_ms = [], []
    for _ in range(repeats):
        for (_, data), image in zip(images, decoded, strict=True):
            t0 = time.perf_counter()
            load_image(data)
            t1 = time.perf_counter()
            detector.predict([image], batch_size=1)
            t2 = time.perf_counter()
            decode_ms.append((t1 - t0) * 1000.0)
            predict_ms.append((t2 - t1) * 1000.0)
    return {
        "n": len(predict_ms),
        "predict_p50_ms": round(percentile(predict_ms, 50), 2),
        "predict_p95_ms": round(percentile(predict_ms, 95), 2),
        "decode_p50_ms": round(percentile(decode_ms, 50), 2),
        "decode_plus_predict_p50_ms": round(
            percentile([a + b for a, b in zip(decode_ms, predict_ms, strict=True)], 50), 2
        ),
    }


# ------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(model: Path, config: ServerConfig, workdir: Path) -> Iterator[str]:
    """``defectscope serve`` on a free localhost port; stopped (whole process group) on exit."""
    port = free_port()
    env = {
        **os.environ,
        "DEFECTSCOPE_BATCH_MAX_SIZE": str(config.batch_max_size),
        "DEFECTSCOPE_BATCH_MAX_WAIT_MS": str(config.batch_max_wait_ms),
        # The log is on, as in a deployment; one SQLite file per run.
        "DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{workdir / (config.name + '.db')}",
    }
    env.pop("DEFECTSCOPE_API_KEY", None)
    command = [sys.executable, "-c", "from defectscope.cli import main; main()", "serve"]
    command += [str(model), "--host", HOST, "--port", str(port), "--workers", str(config.workers)]
    log_path = workdir / f"{config.name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url, process, log_path, workers=config.workers)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_ready(url: str, process: subprocess.Popen, log_path: Path, workers: int) -> None:
    import httpx

    deadline = time.monotonic() + 180
    # Each worker loads its own model and any may answer: ask until many answers in a row agree.
    needed, streak = 8 * workers, 0
    with httpx.Client(base_url=url, timeout=5) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
            try:
                ok = http.get("/readyz").status_code == 200
            except httpx.TransportError:
                ok = False
            streak = streak + 1 if ok else 0
            if streak >= needed:
                return
            time.sleep(0.05 if ok else 0.2)
    raise RuntimeError(f"server not ready in time:\n{log_path.read_text()[-3000:]}")


def batch_sizes(url: str) -> dict:
    """Micro-batch sizes from /metrics (with several workers: the answering worker's only)."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for name in ("defectscope_batch_size_sum", "defectscope_batch_size_count"):
        match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
        values[name] = float(match.group(1)) if match else 0.0
    count = values["defectscope_batch_size_count"]
    return {
        "model_calls": int(count),
        "mean_batch_size": round(values["defectscope_batch_size_sum"] / count, 2) if count else 0,
    }


# ------------------------------------------------------------------------------- load
def post_kwargs(image: tuple[str, bytes]) -> dict:
    name, data = image
    return {"files": {"file": (Path(name).name, data, "image/png")}}


def sequential(url: str, images: list[tuple[str, bytes]], n: int) -> Stats:
    import httpx

    latencies, statuses = [], []
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            t0 = time.perf_counter()
            response = http.post("/v1/predict", **post_kwargs(images[i % len(images)]))
            latencies.append((time.perf_counter() - t0) * 1000.0)
            statuses.append(response.status_code)
    return summarize(latencies, statuses, time.perf_counter() - started)


def interleaved_overhead(url: str, images: list[tuple[str, bytes]], detector, n: int) -> dict:
    """HTTP request and direct ``predict`` on the same image, alternately, while the server
    idles: on a shared machine, load from others then weighs on both sides alike."""
    import httpx

    from defectscope.data.io import load_image

    decoded = [load_image(data) for _, data in images]
    http_ms, direct_ms = [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(n):
            k = i % len(images)
            t0 = time.perf_counter()
            detector.predict([decoded[k]], batch_size=1)
            t1 = time.perf_counter()
            response = http.post("/v1/predict", **post_kwargs(images[k]))
            t2 = time.perf_counter()
            if response.status_code == 200:
                direct_ms.append((t1 - t0) * 1000.0)
                http_ms.append((t2 - t1) * 1000.0)
    http_p50, direct_p50 = percentile(http_ms, 50), percentile(direct_ms, 50)
    return {
        "n": len(http_ms),
        "http_p50_ms": round(http_p50, 2),
        "direct_predict_p50_ms": round(direct_p50, 2),
        "api_overhead_p50_ms": round(http_p50 - direct_p50, 2),
    }


async def closed_loop(
    url: str, images: list[tuple[str, bytes]], users: int, duration: float
) -> Stats:
    import httpx

    latencies: list[float] = []
    statuses: list[int] = []
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=users, max_keepalive_connections=users)

    async def user(index: int, http: httpx.AsyncClient) -> None:
        i = index
        while time.perf_counter() < stop_at and len(statuses) < MAX_REQUESTS_PER_RUN:
            t0 = time.perf_counter()
            try:
                response = await http.post("/v1/predict", **post_kwargs(images[i % len(images)]))
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            latencies.append((time.perf_counter() - t0) * 1000.0)
            statuses.append(status)
            i += users

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(user(u, http) for u in range(users)))
        # Requests in flight at the deadline still finish; count the time they took.
        seconds = time.perf_counter() - started
    return summarize(latencies, statuses, seconds)


def locust_run(url: str, users: int, duration: float, workdir: Path, data: Path | None) -> Stats:
    prefix = workdir / f"locust_{users}"
    env = {**os.environ}
    if data is not None:
        env["DEFECTSCOPE_LOADTEST_DATA"] = str(data)
    command = [sys.executable, "-m", "locust", "-f", str(REPO / "benchmarks" / "locustfile.py")]
    command += ["--headless", "--users", str(users), "--spawn-rate", str(users)]
    command += ["--run-time", f"{int(duration)}s", "--host", url, "--csv", str(prefix)]
    command += ["--only-summary", "--stop-timeout", "30", "--exit-code-on-error", "0"]
    subprocess.run(command, env=env, check=True, timeout=duration + 120, capture_output=True)
    with open(f"{prefix}_stats.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    n, failures = int(row["Request Count"]), int(row["Failure Count"])
    return Stats(
        n=n - failures,
        n_errors=failures,
        seconds=duration,
        throughput_rps=round(float(row["Requests/s"]), 3),
        p50_ms=float(row["50%"]),
        p95_ms=float(row["95%"]),
        p99_ms=float(row["99%"]),
        mean_ms=round(float(row["Average Response Time"]), 2),
    )


def warm_up(url: str, images: list[tuple[str, bytes]], workers: int) -> None:
    # Every worker's first calls pay for allocations; keep them out of the numbers.
    asyncio.run(closed_loop(url, images, users=2 * workers, duration=3.0))


# -------------------------------------------------------------------------------- main
def configurations(users: int, many_users: int) -> list[ServerConfig]:
    return [
        ServerConfig("w1_batch_greedy", 1, 8, 0.0, users),
        ServerConfig("w1_batch_on", 1, 8, 10.0, users),
        ServerConfig("w1_batch_off", 1, 1, 0.0, users),
        ServerConfig("w2_batch_on", 2, 8, 10.0, users),
        ServerConfig("w2_batch_off", 2, 1, 0.0, users),
        ServerConfig(f"w1_batch_on_{many_users}users", 1, 8, 10.0, many_users),
    ]


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="Model folder or file (default: fit one).")
    parser.add_argument("--data", type=Path, help="MVTec-style category (default: bottle).")
    parser.add_argument("--images", type=int, default=24, help="Distinct images to send.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of load per run.")
    parser.add_argument("--users", type=int, default=8, help="Concurrent users per run.")
    parser.add_argument("--many-users", type=int, default=78, help="Users of the crowd run.")
    parser.add_argument("--sequential", type=int, default=40, help="Sequential requests.")
    parser.add_argument("--only", nargs="*", help="Run only these configurations (by name).")
    parser.add_argument("--engine", choices=("httpx", "locust"), default="httpx")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    args = parser.parse_args(argv)
    duration = min(max(args.duration, 1.0), MAX_DURATION_S)
    users, many = min(max(args.users, 1), MAX_USERS), min(max(args.many_users, 1), MAX_USERS)

    images = pick_images(args.images, args.data)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(),
        "images": {
            "n": len(images),
            "source": "bottle test" if (args.data or BOTTLE).joinpath("test").is_dir() else "gen",
            "mean_kib": round(statistics.fmean(len(b) for _, b in images) / 1024, 1),
        },
        "engine": args.engine,
        "duration_s": duration,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="defectscope-load-") as tmp:
        workdir = Path(tmp)
        model = args.model
        if model is None:
            model = workdir / "model"
            results["model"] = fit_default_model(model, args.data)
            print(f"fitted the default model: {results['model']}", flush=True)
        else:
            results["model"] = {"path": str(model)}
        results["direct"] = direct_latencies(model, images, repeats=2)
        print(f"direct: {results['direct']}", flush=True)
        from defectscope.export.runtimes import load_detector

        detector = load_detector(model, "auto", None)

        for config in configurations(users, many):
            if args.only and config.name not in args.only:
                continue
            print(f"{config.name}: starting", flush=True)
            with served(model, config, workdir) as url:
                warm_up(url, images, config.workers)
                seq = sequential(url, images, args.sequential)
                overhead = interleaved_overhead(url, images, detector, args.sequential)
                if args.engine == "locust":
                    load = locust_run(url, config.users, duration, workdir, args.data)
                else:
                    load = asyncio.run(closed_loop(url, images, config.users, duration))
                batching = batch_sizes(url)
            run = {
                "config": asdict(config),
                "sequential": asdict(seq),
                "load": asdict(load),
                "speedup_vs_sequential": round(load.throughput_rps / seq.throughput_rps, 2)
                if seq.throughput_rps
                else None,
                "api_overhead": overhead,
                "batching": batching,
            }
            results["runs"][config.name] = run
            print(
                f"{config.name}: {load.throughput_rps:.2f} req/s "
                f"(sequential {seq.throughput_rps:.2f}, x{run['speedup_vs_sequential']}), "
                f"p50 {load.p50_ms:.0f} ms, p95 {load.p95_ms:.0f} ms, p99 {load.p99_ms:.0f} ms, "
                f"errors {load.n_errors}, overhead p50 {overhead['api_overhead_p50_ms']:.1f} ms, "
                f"mean batch {batching['mean_batch_size']}",
                flush=True,
            )
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
