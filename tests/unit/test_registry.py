"""The model registry: versions, stages, promote and rollback, lineage and reports, references,
concurrent writers, a corrupt stage file; on the folder backend and on MLflow's registry."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defectscope.detector.model_file import read_header
from defectscope.registry import (
    RegistryError,
    open_registry,
    parse_ref,
    resolve_model_ref,
)
from defectscope.registry.folder import FolderRegistry


def registries(tmp_path: Path) -> dict[str, str]:
    found = {"folder": str(tmp_path / "registry")}
    try:
        import mlflow  # noqa: F401
    except ImportError:
        return found
    found["mlflow"] = f"mlflow:sqlite:///{tmp_path / 'mlflow.db'}"
    return found


@pytest.fixture(params=["folder", "mlflow"])
def registry(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DEFECTSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    uris = registries(tmp_path)
    if request.param not in uris:
        pytest.skip("mlflow is not installed (the tracking extra)")
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store puts artefacts in ./mlruns
    return open_registry(uris[request.param])


def test_parse_ref() -> None:
    assert parse_ref("bottle") == ("bottle", "latest")
    assert parse_ref("bottle@latest") == ("bottle", "latest")
    assert parse_ref("bottle@3") == ("bottle", 3)
    assert parse_ref("bottle@production") == ("bottle", "production")
    for bad in ("", "@3", "bot tle@1", "bottle@Prod uction", "../x@1"):
        with pytest.raises(RegistryError):
            parse_ref(bad)


def test_register_versions_stages_and_rollback(registry, texture_model_dir: Path) -> None:
    report = {"metrics": {"image_auroc": 0.97}}
    first = registry.register("bottle", texture_model_dir, lineage={"data": "/data/bottle"})
    second = registry.register(
        "bottle", texture_model_dir, parent="bottle@1", report=report, stage="staging"
    )
    third = registry.register("bottle", texture_model_dir / "model.safetensors")
    assert (first, second, third) == (1, 2, 3)
    assert registry.names() == ["bottle"]
    versions = registry.versions("bottle")
    assert [v.version for v in versions] == [1, 2, 3]
    fingerprint = read_header(texture_model_dir / "model.safetensors")["training"]["fingerprint"]
    assert versions[0].lineage["training_fingerprint"] == fingerprint
    assert versions[0].lineage["data"] == "/data/bottle"
    assert versions[1].lineage["parent"] == "bottle@1"
    assert versions[1].stages == ["staging"] and versions[1].has_report
    assert registry.report("bottle", 2) == report
    assert registry.report("bottle", 1) is None

    # latest, a number, a stage; the resolved file is a copy of the registered model
    assert registry.resolve("bottle").version == 3
    assert registry.resolve("bottle@latest").version == 3
    assert registry.resolve("bottle@1").version == 1
    resolved = registry.resolve("bottle@staging")
    assert resolved.version == 2 and resolved.ref == "bottle@2"
    assert resolved.path.read_bytes() == (texture_model_dir / "model.safetensors").read_bytes()

    registry.promote("bottle", 1, "production")
    registry.promote("bottle", 3, "production")
    assert registry.resolve("bottle@production").version == 3
    assert registry.rollback("bottle", "production") == 1
    assert registry.resolve("bottle@production").version == 1
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("bottle", "production")
    events = [(e["action"], e["stage"], e["version"]) for e in registry.stage_history("bottle")]
    assert events == [
        ("register", "staging", 2),
        ("promote", "production", 1),
        ("promote", "production", 3),
        ("rollback", "production", 1),
    ]

    with pytest.raises(RegistryError, match=r"no such version|not found"):
        registry.resolve("bottle@9")
    with pytest.raises(RegistryError, match="canary"):
        registry.resolve("bottle@canary")
    with pytest.raises(RegistryError, match="no model named"):
        registry.versions("nothing")
    with pytest.raises(RegistryError, match=r"not found|no such version"):
        registry.promote("bottle", 7, "production")


def test_register_refuses_a_file_that_is_not_a_model(registry, tmp_path: Path) -> None:
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(Exception, match=r"not a defectscope model|bad header|too short"):
        registry.register("bottle", junk)


def test_resolve_model_ref_leaves_paths_alone(tmp_path: Path, texture_model_dir: Path) -> None:
    uri = str(tmp_path / "registry")
    assert resolve_model_ref(texture_model_dir, uri) == (texture_model_dir, None)
    assert resolve_model_ref("models/bottle", uri) == ("models/bottle", None)
    assert resolve_model_ref("s3://bucket/m@1", uri) == ("s3://bucket/m@1", None)
    FolderRegistry(uri).register("bottle", texture_model_dir)
    path, found = resolve_model_ref("bottle@1", uri)
    assert found is not None and found.version == 1 and Path(path).is_file()
    with pytest.raises(RegistryError):
        resolve_model_ref("bottle@2", uri)


def test_mlflow_model_uris_resolve_in_an_mlflow_registry(
    tmp_path: Path, texture_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("mlflow")
    monkeypatch.setenv("DEFECTSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = open_registry(f"mlflow:{tracking}")
    registry.register("tex", texture_model_dir, stage="production")
    registry.register("tex", texture_model_dir)
    by_alias, found = resolve_model_ref("models:/tex@production", f"mlflow:{tracking}")
    assert found is not None and found.version == 1 and Path(by_alias).is_file()
    # MLflow's version form, and the tracking URI from MLflow's own variable.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    _, found = resolve_model_ref("models:/tex/2", str(tmp_path / "folder-registry"))
    assert found is not None and found.version == 2
    with pytest.raises(RegistryError, match="models:/NAME/VERSION"):
        resolve_model_ref("models:/tex/latest-ish", f"mlflow:{tracking}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match="MLflow model URI"):
        resolve_model_ref("models:/tex@production", str(tmp_path / "folder-registry"))


def test_concurrent_registers_get_distinct_versions(
    tmp_path: Path, texture_model_dir: Path
) -> None:
    root = tmp_path / "registry"
    script = (
        "import sys\n"
        "from defectscope.registry.folder import FolderRegistry\n"
        "r = FolderRegistry(sys.argv[1])\n"
        "print(*[r.register('bottle', sys.argv[2]) for _ in range(4)])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root), str(texture_model_dir)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    numbers = [int(n) for proc in procs for n in proc.communicate(timeout=120)[0].split()]
    assert all(proc.returncode == 0 for proc in procs)
    assert sorted(numbers) == list(range(1, 9))
    assert [v.version for v in FolderRegistry(root).versions("bottle")] == list(range(1, 9))


def test_corrupt_stage_file_is_a_clear_error(tmp_path: Path, texture_model_dir: Path) -> None:
    registry = FolderRegistry(tmp_path / "registry")
    registry.register("bottle", texture_model_dir, stage="production")
    stages = tmp_path / "registry" / "bottle" / "stages.json"
    stages.write_text('{"stages": {"production": 1', encoding="utf-8")
    with pytest.raises(RegistryError, match="corrupt stage file"):
        registry.resolve("bottle@production")
    stages.write_text(json.dumps(["not", "an", "object"]), encoding="utf-8")
    with pytest.raises(RegistryError, match="corrupt stage file"):
        registry.promote("bottle", 1, "production")


def test_unreachable_mlflow_registry_fails_fast() -> None:
    pytest.importorskip("mlflow")
    started = time.monotonic()
    with pytest.raises(RegistryError, match="MLflow registry"):
        open_registry("mlflow:http://127.0.0.1:9")
    assert time.monotonic() - started < 30


def test_registry_in_place_of_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RegistryError, match="not a folder"):
        open_registry(str(tmp_path / "file"))
