"""Many models in one `defectscope serve` process: listing, scoring by name, per-model
thresholds, one shared backbone, LRU unloading under a memory budget, a registry promotion and
reload under load, and the CLI's refusals of bad model lists (one line, exit 2)."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
from _cli import run_cli as _run_cli
from _images import png, texture_crops
from _models import copy_model, rewritten_model
from _server import AUTH, KEY, served

from defectscope.detector.knn_screen import screen_bytes
from defectscope.features.backbones import module_bytes

pytest.importorskip("fastapi")

run_cli = partial(_run_cli, columns=300, unset=("DEFECTSCOPE_DEBUG",))


@contextmanager
def serving(args: list[str], env: dict[str, str] | None = None) -> Iterator[httpx.Client]:
    """``defectscope serve ARGS`` in its own process group, once ready; a client for it."""
    with (
        served(args, {"DEFECTSCOPE_BATCH_MAX_WAIT_MS": "2", **(env or {})}) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client,
    ):
        yield client


def image_file(seed: int) -> tuple[str, bytes]:
    return (f"img{seed}.png", png(texture_crops(1, seed=seed)[0]))


def listed(client: httpx.Client) -> dict[str, dict]:
    answer = client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    return {entry["name"]: entry for entry in answer.json()["models"]}


def other_layers(texture_model_dir: Path, target: Path, layers: list[int]) -> Path:
    """The same model with its backbone layers written out: the same weights and bank, but
    another backbone configuration, which is not shared."""

    def edit(meta: dict, tensors: dict) -> None:
        meta["config"]["backbone"]["layers"] = layers

    return rewritten_model(texture_model_dir, target, edit)


@pytest.fixture(scope="module")
def models_dir(texture_model_dir: Path, fitted, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    copy_model(texture_model_dir, root / "alpha")
    copy_model(texture_model_dir, root / "beta")
    layers = list(fitted.feature_parts().features.backbone.layers)
    other_layers(texture_model_dir, root / "gamma", layers)
    return root


def test_three_models_by_name_with_a_shared_backbone(models_dir: Path, tmp_path: Path) -> None:
    args = ["--models", str(models_dir), "--default-model", "alpha"]
    with serving(args, {"DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{tmp_path}/p.db"}) as c:
        models = listed(c)
        assert set(models) == {"alpha", "beta", "gamma"}
        assert models["alpha"]["loaded"] and models["alpha"]["default"]
        assert not models["beta"]["loaded"] and not models["gamma"]["loaded"]

        one = c.post("/v1/models/beta/predict", files={"file": image_file(1)})
        assert one.status_code == 200, one.text
        assert one.json()["model_fingerprint"] and "score" in one.json()
        batch = c.post(
            "/v1/models/gamma/predict/batch", files=[("files", image_file(s)) for s in (2, 3)]
        )
        assert batch.status_code == 200 and batch.json()["n_ok"] == 2, batch.text
        default = c.post("/v1/predict", files={"file": image_file(1)})
        assert default.status_code == 200
        assert default.json()["score"] == pytest.approx(one.json()["score"], rel=1e-5)

        models = listed(c)
        assert models["beta"]["loaded"] and models["gamma"]["loaded"]
        # beta shares alpha's backbone object; gamma's configuration differs: its own copy.
        assert models["beta"]["backbone_shared_with"] == ["alpha"]
        assert models["alpha"]["backbone_shared_with"] == ["beta"]
        assert models["gamma"]["backbone_shared_with"] == []
        assert models["beta"]["memory_bytes"] < models["alpha"]["memory_bytes"] / 2
        assert models["gamma"]["memory_bytes"] == models["alpha"]["memory_bytes"]
        assert c.get("/v1/models").json()["shared_backbones"] == 2

        # Named routes take the bodies of the routes they mirror, not the small JSON limit.
        noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
        big = png(noise)
        assert len(big) > 200_000
        large = c.post("/v1/models/beta/predict", files={"file": ("big.png", big)})
        assert large.status_code == 200, large.text
        two = [("files", ("b1.png", big)), ("files", ("b2.png", big))]
        assert c.post("/v1/models/beta/predict/batch", files=two).json()["n_ok"] == 2

        missing = c.post("/v1/models/nope/predict", files={"file": image_file(1)})
        assert missing.status_code == 404
        assert "alpha, beta, gamma" in missing.json()["detail"]
        assert c.get("/v1/models/nope/thresholds").status_code == 404

        before = c.get("/v1/models/alpha/thresholds").json()["threshold"]
        saved = c.put("/v1/models/beta/thresholds", json={"image": before * 3, "reviewer": "t"})
        assert saved.status_code == 200, saved.text
        assert saved.json()["threshold"] == pytest.approx(before * 3)
        assert saved.json()["threshold_audit"][-1]["who"] == "t"
        assert c.get("/v1/models/beta/thresholds").json()["threshold"] == pytest.approx(before * 3)
        assert c.get("/v1/models/alpha/thresholds").json()["threshold"] == pytest.approx(before)
        assert c.put("/v1/models/beta/thresholds", json={}).status_code == 422
        rescored = c.post("/v1/models/beta/predict", files={"file": image_file(1)}).json()
        assert rescored["threshold"] == pytest.approx(before * 3)

        metrics = c.get("/metrics").text
        assert 'defectscope_model_predictions_total{model="beta"} 5.0' in metrics
        assert 'defectscope_model_loaded{model="gamma"} 1.0' in metrics
        logged = c.get("/v1/predictions", params={"model_name": "gamma"}).json()
        assert logged["total"] == 2
        assert {item["model_name"] for item in logged["items"]} == {"gamma"}
        assert logged["items"][0]["route"] == "/v1/models/{name}/predict/batch"
        check_clients(str(c.base_url), before, tmp_path)


def check_clients(url: str, threshold: float, tmp_path: Path) -> None:
    """The Python client and `defectscope client predict` score with a named model."""
    from defectscope.client import DefectscopeClient

    data = image_file(1)[1]
    with DefectscopeClient(url, api_key=KEY, model="beta") as client:
        assert client.predict(data)["threshold"] == pytest.approx(threshold * 3)
        assert client.predict(data, model="alpha")["threshold"] == pytest.approx(threshold)
        assert client.predict_batch([data])[0]["result"]["threshold"] == pytest.approx(
            threshold * 3
        )
        assert client.model_thresholds()["name"] == "beta"
        assert client.models()["default"] == "alpha"
    image = tmp_path / "one.png"
    image.write_bytes(data)
    common = ["client", "predict", str(image), "--url", url, "--api-key", KEY]
    assert run_cli(*common, "--model-name", "gamma").returncode == 0
    one_line_error(run_cli(*common, "--model-name", "nope"), "alpha, beta, gamma")


def test_least_recently_used_model_is_unloaded_beyond_the_budget(
    texture_model_dir: Path, fitted, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    for name in ("a", "b", "c"):
        copy_model(texture_model_dir, root / name)
    # Both banks of the model (full size and half size), each with the search's copy.
    bank = sum(
        memory_bank.numel() * memory_bank.element_size() + screen_bytes(memory_bank)
        for memory_bank in fitted.memory_banks().values()
    )
    backbone = module_bytes(fitted.feature_parts().features.backbone)
    # Room for the backbone and two banks (with the search's copy) and a half: the default
    # and one more model.
    budget = (backbone + 2.5 * bank) / (1024 * 1024)
    args = ["--models", str(root), "--default-model", "a", "--memory-budget-mb", f"{budget:.6f}"]
    with serving(args, {"DEFECTSCOPE_PREDICTION_LOG_URL": "none"}) as c:
        assert c.post("/v1/models/b/predict", files={"file": image_file(1)}).status_code == 200
        assert listed(c)["b"]["loaded"]
        assert c.post("/v1/models/c/predict", files={"file": image_file(1)}).status_code == 200
        models = listed(c)
        assert models["c"]["loaded"] and not models["b"]["loaded"] and models["a"]["loaded"]
        # b comes back on its next use, and c, now the least recently used, makes room.
        assert c.post("/v1/models/b/predict", files={"file": image_file(1)}).status_code == 200
        models = listed(c)
        assert models["b"]["loaded"] and not models["c"]["loaded"]
        summary = c.get("/v1/models").json()
        assert summary["memory_bytes"] <= summary["memory_budget_bytes"]
        metrics = c.get("/metrics").text
        assert 'defectscope_model_evictions_total{model="b"} 1.0' in metrics
        assert 'defectscope_model_loads_total{model="b"} 2.0' in metrics


def test_concurrent_first_requests_load_a_cold_model_once(models_dir: Path) -> None:
    args = ["--models", str(models_dir), "--default-model", "alpha"]
    with serving(args, {"DEFECTSCOPE_PREDICTION_LOG_URL": "none"}) as c:
        url, results = str(c.base_url), []

        def hit() -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as own:
                results.append(own.post("/v1/models/gamma/predict", files={"file": image_file(4)}))

        threads = [threading.Thread(target=hit) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.status_code for r in results] == [200] * 6
        assert 'defectscope_model_loads_total{model="gamma"} 1.0' in c.get("/metrics").text


def test_promotion_and_reload_under_load_lose_nothing_and_mix_no_versions(
    texture_model_dir: Path, tmp_path: Path
) -> None:
    from defectscope.registry import open_registry

    registry = open_registry(str(tmp_path / "registry"))
    registry.register("tex", texture_model_dir, stage="production")
    registry.register("tex", texture_model_dir)
    args = [str(texture_model_dir), "--model", "tex=tex@production"]
    args += ["--registry", str(tmp_path / "registry"), "--follow-registry", "0.2"]
    with serving(args, {"DEFECTSCOPE_PREDICTION_LOG_URL": "none"}) as c:
        url = str(c.base_url)
        seen: dict[int, list[str]] = {}
        errors: list[str] = []
        stop = threading.Event()

        def hammer(worker: int) -> None:
            versions = seen.setdefault(worker, [])
            with httpx.Client(base_url=url, headers=AUTH, timeout=60) as own:
                while not stop.is_set():
                    if worker % 2:
                        files = [("files", image_file(s)) for s in (5, 6, 7)]
                        answer = own.post("/v1/models/tex/predict/batch", files=files)
                        if answer.status_code != 200:
                            errors.append(answer.text)
                            continue
                        named = {i["result"]["served_version"] for i in answer.json()["items"]}
                        if len(named) != 1:
                            errors.append(f"one batch, several versions: {named}")
                        versions.extend(named)
                    else:
                        answer = own.post("/v1/models/tex/predict", files={"file": image_file(5)})
                        if answer.status_code != 200:
                            errors.append(answer.text)
                            continue
                        versions.append(answer.json()["served_version"])

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        registry.promote("tex", 2)
        reloaded = c.post("/v1/models/tex/reload")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["served_version"] == "tex@2"
        time.sleep(1.5)
        stop.set()
        for thread in threads:
            thread.join()
        assert not errors, errors[:3]
        everything = [v for versions in seen.values() for v in versions]
        assert set(everything) == {"tex@1", "tex@2"}
        for versions in seen.values():
            # Each thread's requests follow each other: once the new version answered, the
            # old one never does again.
            assert versions == sorted(versions), versions
        last = c.post("/v1/models/tex/predict", files={"file": image_file(5)}).json()
        assert last["served_version"] == "tex@2"

        # A rollback in the registry is followed without a reload call (--follow-registry).
        registry.rollback("tex", "production")
        deadline = time.monotonic() + 30
        while last["served_version"] != "tex@1" and time.monotonic() < deadline:
            time.sleep(0.2)
            last = c.post("/v1/models/tex/predict", files={"file": image_file(5)}).json()
        assert last["served_version"] == "tex@1"


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_model_lists_are_one_line_errors(texture_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    copy_model(texture_model_dir, root / "a")
    copy_model(texture_model_dir, root / "b")
    env = {"DEFECTSCOPE_REGISTRY": str(tmp_path / "registry")}
    one_line_error(run_cli("serve", "--models", str(tmp_path / "missing"), env=env), "not a folder")
    duplicate = run_cli(
        "serve", "--models", str(root), "--model", f"a={texture_model_dir}", env=env
    )
    one_line_error(duplicate, "two models named 'a'")
    one_line_error(run_cli("serve", "--model", "x=nosuch@production", env=env), "nosuch")
    one_line_error(run_cli("serve", "--models", str(root), env=env), "--default-model")
    one_line_error(run_cli("serve", "--model", "bad name=x", env=env), "bad model name")


def test_a_micro_batch_never_mixes_detectors() -> None:
    from defectscope.serving.batching import MicroBatcher

    calls: list[tuple[int, str]] = []

    def predict(batch, threshold, target=None):
        calls.append((len(batch), target))
        return [target for _ in batch]

    async def main() -> list[str]:
        batcher = MicroBatcher(predict, max_size=8, max_wait_ms=50)
        await batcher.start()
        try:
            image = np.zeros((2, 2, 3), dtype=np.uint8)
            targets = ["old", "old", "new", "old", "new"]
            return await asyncio.gather(*(batcher.submit(image, None, t) for t in targets))
        finally:
            await batcher.stop()

    assert asyncio.run(main()) == ["old", "old", "new", "old", "new"]
    assert sorted(calls) == [(2, "new"), (3, "old")]
