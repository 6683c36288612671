"""Datasets, models and reports on an object store: a real S3-compatible server (moto's
standalone server on 127.0.0.1, started here), the real CLI in subprocesses, real s3fs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from _cli import FAST_OVERRIDES
from _cli import run_cli as _run_cli
from _images import free_port, texture_crops

from defectscope import storage
from defectscope.data.synthetic import make_synthetic_dataset
from defectscope.errors import DefectscopeError

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

FAST = FAST_OVERRIDES


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A moto S3 server on a free local port, and the environment that points clients at it.

    Applied to this process too (s3fs reads it when it creates a filesystem), and handed to the
    CLI subprocesses. Config and credential files are pointed at nothing so that no real AWS
    account on the machine is ever used.
    """
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
        "DEFECTSCOPE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        s3 = boto3.client("s3")
        for bucket in ("data", "models", "results"):
            s3.create_bucket(Bucket=bucket)
        yield env
    server.stop()


def keys(bucket: str, prefix: str = "") -> set[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for item in listing.get("Contents", [])}


def run_cli(
    env: dict[str, str], *args: str, check: bool = True, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    return _run_cli(*args, env=env, unset=unset, columns=160, check=check)


@pytest.fixture(scope="module")
def remote_dataset(s3_env, tmp_path_factory) -> str:
    local = make_synthetic_dataset(
        tmp_path_factory.mktemp("data") / "tiles",
        n_train=10,
        n_test_good=3,
        n_test_defect=4,
        size=128,
    )
    return storage.upload_dir(local, "s3://data/tiles")


@pytest.fixture(scope="module")
def remote_model(s3_env, remote_dataset) -> str:
    proc = run_cli(s3_env, "fit", remote_dataset, "--out", "s3://models/tiles", *FAST)
    assert "s3://models/tiles/model.safetensors" in proc.stdout
    return "s3://models/tiles"


# ------------------------------------------------------------------------------ URI parsing
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("s3://bucket/key", "s3://bucket/key"),
        (Path("s3://bucket/key"), "s3://bucket/key"),  # pathlib folds the double slash
        ("gs://bucket/models/m", "gs://bucket/models/m"),
        ("GS://bucket/x", "gs://bucket/x"),
        ("memory://x/y", "memory://x/y"),
        ("models/bottle", None),
        ("/abs/path", None),
        ("file:///abs/path", None),
        ("C:/windows/path", None),
        ("weird:/folder", None),  # a folded single slash only counts for known schemes
    ],
)
def test_uris_are_told_from_local_paths(value, expected) -> None:
    assert storage.as_uri(value) == expected
    assert storage.is_remote(value) is (expected is not None)


def test_file_uris_and_local_paths_stay_local(tmp_path) -> None:
    (tmp_path / "a.txt").write_text("x")
    assert storage.location(f"file://{tmp_path}") == tmp_path
    assert storage.localize(tmp_path / "a.txt") == tmp_path / "a.txt"
    assert storage.read_bytes(f"file://{tmp_path}/a.txt") == b"x"


def test_output_locations_are_local_paths_or_uris_below_the_destination(tmp_path) -> None:
    assert storage.join(tmp_path, "model.onnx") == tmp_path / "model.onnx"
    assert storage.join("s3://models/tiles/", "report") == "s3://models/tiles/report"
    stage = tmp_path / "stage"
    written = stage / "report" / "report.html"
    assert storage.output_location(tmp_path / "out", stage, written) == written
    remote = storage.output_location("s3:/results/run", stage, written)
    assert remote == "s3://results/run/report/report.html"


def test_a_file_in_the_way_of_an_output_folder_is_refused(tmp_path) -> None:
    (tmp_path / "taken").write_text("x")
    storage.check_output_folder(tmp_path / "new" / "deeper", "--out")  # nothing there yet
    storage.check_output_folder("s3://results/any", "--out")  # no files in the way remotely
    with pytest.raises(DefectscopeError, match=r"^--out .*taken: not a folder$"):
        storage.check_output_folder(tmp_path / "taken", "--out")
    with pytest.raises(DefectscopeError, match=r"\(inside .*taken, a file\)$"):
        storage.check_output_folder(tmp_path / "taken" / "sub", "--report")


def test_remove_outputs_returns_what_was_there(tmp_path) -> None:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "metrics.json").write_text("{}")
    (tmp_path / "model.onnx").write_text("x")
    (tmp_path / "model.safetensors").write_text("x")
    removed = storage.remove_outputs(tmp_path, ("report", "model.onnx", "model.xml"))
    assert removed == ["report", "model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


# ------------------------------------------------------------------------- cache and writes
def test_localize_downloads_only_what_changed(s3_env, tmp_path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("alpha")
    (source / "sub" / "b.txt").write_text("beta")
    (source / "c.txt").write_text("gamma")
    storage.upload_dir(source, "s3://data/sync")

    local = storage.localize("s3://data/sync")
    assert (local / "a.txt").read_text() == "alpha"
    assert (local / "sub" / "b.txt").read_text() == "beta"
    first = {p.name: p.stat().st_mtime_ns for p in local.rglob("*.txt")}

    time.sleep(0.02)
    assert storage.localize("s3://data/sync") == local
    assert {p.name: p.stat().st_mtime_ns for p in local.rglob("*.txt")} == first  # no download

    s3 = boto3.client("s3")
    s3.put_object(Bucket="data", Key="sync/a.txt", Body=b"ALPHA, changed")
    s3.delete_object(Bucket="data", Key="sync/c.txt")
    storage.localize("s3://data/sync")
    assert (local / "a.txt").read_text() == "ALPHA, changed"
    assert not (local / "c.txt").exists()  # deleted remotely, dropped from the cache
    assert (local / "sub" / "b.txt").stat().st_mtime_ns == first["b.txt"]  # untouched

    one = storage.localize("s3://data/sync/sub/b.txt")
    assert one.read_text() == "beta"
    # A pattern gives the matched files only, though the cached folder holds more.
    assert storage.localize_matches("s3://data/sync/*.txt") == [local / "a.txt"]
    assert storage.localize_matches("s3://data/sync") == [local]
    with pytest.raises(DefectscopeError, match="pattern"):
        storage.localize("s3://data/sync/*.txt")
    assert storage.glob("s3://data/sync/*.txt") == ["s3://data/sync/a.txt"]
    assert storage.read_bytes("s3://data/sync/sub/b.txt") == b"beta"


def test_staged_output_uploads_only_on_success(s3_env) -> None:
    with storage.staged_output("s3://results/staged") as folder:
        (folder / "deep" / "x").mkdir(parents=True)
        (folder / "deep" / "x" / "r.json").write_text("{}")
    assert keys("results", "staged/") == {"staged/deep/x/r.json"}

    with pytest.raises(RuntimeError), storage.staged_output("s3://results/failed") as folder:
        (folder / "partial.json").write_text("{}")
        raise RuntimeError("the run failed")
    assert keys("results", "failed/") == set()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("s3://data/no/such/key", "not found"),
        ("s3://no-such-bucket/x", "bucket"),
        ("nosuchscheme://x/y", "unsupported storage scheme"),
    ],
)
def test_missing_objects_and_buckets_are_clear_errors(s3_env, uri, message) -> None:
    with pytest.raises(DefectscopeError, match=message) as error:
        storage.localize(uri)
    assert uri in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------- the Detector API
def test_detector_saves_to_and_loads_from_s3(s3_env, fitted, tmp_path) -> None:
    from defectscope.detector.detector import Detector
    from defectscope.export.runtimes import load_detector

    images = texture_crops(2, seed=3)
    detector = fitted
    assert detector.save("s3://models/api") == "s3://models/api/model.safetensors"
    assert keys("models", "api/") == {"api/model.safetensors"}

    loaded = Detector.load("s3://models/api")
    via_runtime = load_detector(Path("s3://models/api"))  # as Typer / pydantic pass it
    expected = [p.score for p in detector.predict(images[:2])]
    for other in (loaded, via_runtime):
        assert other.threshold == pytest.approx(detector.threshold)
        np.testing.assert_allclose([p.score for p in other.predict(images[:2])], expected, 1e-5)

    with pytest.raises(DefectscopeError, match="bucket 'no-such-bucket' does not exist"):
        detector.save("s3://no-such-bucket/m")


# ----------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_cli_fit_predict_evaluate_on_s3(s3_env, remote_model, remote_dataset) -> None:
    assert keys("models", "tiles/") == {"tiles/model.safetensors"}
    meta = json.loads(run_cli(s3_env, "inspect", remote_model).stdout)
    assert meta["training"]["n_images"] == 10

    proc = run_cli(
        s3_env,
        "predict",
        remote_model,
        f"{remote_dataset}/test/*/*.png",
        "--out",
        "s3://results/pred",
    )
    assert "Results: s3://results/pred/results.jsonl" in proc.stdout
    written = keys("results", "pred/")
    assert {"pred/results.jsonl", "pred/results.csv"} <= written
    assert sum(key.endswith("_heatmap.png") for key in written) == 7
    rows = [json.loads(line) for line in storage.read_bytes("s3://results/pred/results.jsonl")
            .decode().splitlines()]  # fmt: skip
    assert len(rows) == 7 and not any(row["error"] for row in rows)

    proc = run_cli(s3_env, "evaluate", remote_model, remote_dataset, "--report", "s3://results/rep")
    assert "s3://results/rep/" in proc.stdout
    assert {"rep/metrics.json", "rep/report.html"} <= keys("results", "rep/")
    metrics = json.loads(storage.read_bytes("s3://results/rep/metrics.json"))["metrics"]
    assert 0.5 < metrics["image_auroc"] <= 1.0


@pytest.mark.slow
def test_cli_serve_loads_a_model_from_s3(s3_env, remote_model, tmp_path) -> None:
    port = free_port()
    env = {
        **os.environ,
        **s3_env,
        "DEFECTSCOPE_PREDICTION_LOG_URL": "none",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", "serve", remote_model, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"server not ready: {process.stderr.read() if process.stderr else ''}")
        model = httpx.get(f"http://127.0.0.1:{port}/v1/model").json()
        assert model["backbone"]["name"] == "tf_efficientnet_lite0"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inspect", "s3://models/missing"], "s3://models/missing/model.safetensors: not found"),
        (["predict", "s3://no-such-bucket/m", "x.png"], "bucket 'no-such-bucket' does not exist"),
        (["fit", "s3://data/tiles", "--out", "s3://no-such-bucket/m"], "cannot write, bucket"),
        (
            ["evaluate", "s3://models/tiles", "s3://data/tiles", "--report", "s3://nob/r"],
            "bucket 'nob' does not exist",
        ),
    ],
)
def test_cli_storage_errors_are_one_line_exit_2(s3_env, remote_dataset, args, message) -> None:
    proc = run_cli(s3_env, *args, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_cli_without_credentials_says_so(s3_env, remote_dataset) -> None:
    unset = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    proc = run_cli(s3_env, "inspect", "s3://models/tiles", check=False, unset=unset)
    assert proc.returncode == 2, proc.stderr
    assert "no credentials" in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr


@pytest.mark.parametrize(("uri", "package"), [("s3://b/m", "s3fs"), ("gs://b/m", "gcsfs")])
def test_missing_protocol_package_names_the_extra(uri, package) -> None:
    # The package is hidden from the import system, as if never installed.
    code = (
        "import sys; sys.modules['s3fs'] = sys.modules['gcsfs'] = None; "
        f"sys.argv = ['defectscope', 'inspect', {uri!r}]; "
        "from defectscope.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert package in proc.stderr and "defectscope[cloud]" in proc.stderr
