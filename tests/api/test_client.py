"""The REST client and `defectscope client predict`, against a real uvicorn server."""

from __future__ import annotations

import base64
import copy
import io
import json
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from _cli import run_cli as _run_cli
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from _images import free_port, png, texture_crops, with_defect  # noqa: E402
from _server import running_server  # noqa: E402

from defectscope.client import ClientError, DefectscopeClient  # noqa: E402
from defectscope.detector.detector import Detector  # noqa: E402
from defectscope.serving.settings import ServingSettings  # noqa: E402


@pytest.fixture(scope="module")
def detector(fitted) -> Detector:
    """The served model: a copy of the session's, which what the servers do cannot reach."""
    return copy.deepcopy(fitted)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    good = texture_crops(3, seed=11)
    arrays = [*good, with_defect(good[0])[0]]
    paths = []
    for i, array in enumerate(arrays):
        # Two files named 000.png in different folders: the CLI must not overwrite one.
        path = folder / ("a" if i % 2 else "b") / f"{i // 2:03d}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(png(array))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def server(detector, tmp_path_factory) -> Iterator[tuple[str, object]]:
    log = tmp_path_factory.mktemp("log") / "predictions.db"
    settings = ServingSettings(model_path=None, prediction_log_url=f"sqlite:///{log}")
    with running_server(settings, detector) as running:
        yield running


def test_predict_batch_model_health_and_log(server, detector, images):
    url, _ = server
    expected = detector.predict([str(p) for p in images])
    with DefectscopeClient(url) as client:
        assert client.health() == {"status": "ok"}
        assert client.ready() is True
        single = client.predict(images[0], heatmap=True, overlay=True, mask=True)
        assert single["score"] == pytest.approx(expected[0].score, rel=1e-5)
        for key in ("heatmap_png", "overlay_png", "mask_png"):
            assert Image.open(io.BytesIO(base64.b64decode(single[key]))).size == (128, 128)
        from_bytes = client.predict(images[3].read_bytes(), threshold=expected[3].score * 2)
        assert from_bytes["score"] == pytest.approx(expected[3].score, rel=1e-5)
        assert from_bytes["is_anomalous"] is False

        items = client.predict_batch([*images, b"not an image"])
        assert [item["result"]["score"] for item in items[:4]] == pytest.approx(
            [p.score for p in expected], rel=1e-5
        )
        assert items[4]["result"] is None and items[4]["error"]["status"] == 415

        model = client.model_info()
        assert model["calibration"]["threshold"] == pytest.approx(detector.threshold)
        assert "good_scores" not in model["calibration"]

        # The log is written in a background task after each answer.
        deadline = time.monotonic() + 10
        while client.predictions()["total"] < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        page = client.predictions(limit=2)
        assert page["total"] == 6 and len(page["items"]) == 2
        # images[0] was scored twice: once alone, once in the batch.
        n_bad = sum(p.is_anomalous for p in expected) + expected[0].is_anomalous
        assert client.predictions(is_anomalous=True)["total"] == n_bad
        assert client.predictions(since="2999-01-01T00:00:00Z")["total"] == 0


def test_errors_carry_the_servers_message_and_status(server, monkeypatch):
    url, app = server
    with DefectscopeClient(url) as client:
        with pytest.raises(ClientError, match="not a readable image") as info:
            client.predict(b"GIF? no, plain text")
        assert info.value.status == 415
        with pytest.raises(ClientError, match="limit") as info:
            client.predictions(limit=0)
        assert info.value.status == 422
        with pytest.raises(ClientError, match="cannot read"):
            client.predict("/no/such/file.png")

        def boom(*args, **kwargs):
            raise RuntimeError("secret internals")

        monkeypatch.setattr(app.state.serving.detector, "predict", boom)
        with pytest.raises(ClientError, match="HTTP 500: internal error") as info:
            client.predict(png(texture_crops(1, seed=3)[0]))
        assert info.value.status == 500 and "secret" not in str(info.value)


def test_unreachable_server():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more
    with DefectscopeClient(url, timeout=5) as client, pytest.raises(ClientError) as info:
        client.health()
    assert f"the server at {url} is unreachable" in str(info.value)
    assert info.value.status is None


def test_api_key(detector, images):
    settings = ServingSettings(model_path=None, prediction_log_url=None, api_key="s3cret")
    with running_server(settings, detector) as (url, _):
        with DefectscopeClient(url, api_key="s3cret") as client:
            assert client.predict(images[0])["score"] > 0
            assert client.model_info()["feature_dim"] > 0
        for key in (None, "wrong"):
            with DefectscopeClient(url, api_key=key) as client:
                with pytest.raises(ClientError, match="API key") as info:
                    client.predict(images[0])
                assert info.value.status == 401
                assert client.health() == {"status": "ok"}  # health stays open


run_cli = partial(
    _run_cli, columns=200, unset=("DEFECTSCOPE_URL", "DEFECTSCOPE_API_KEY"), timeout=120
)


def test_cli_client_predict_writes_pngs(server, detector, images, tmp_path):
    url, _ = server
    out_dir = tmp_path / "out"
    done = run_cli("client", "predict", *map(str, images), "--url", url, "--out", str(out_dir))
    assert done.returncode == 0, done.stderr
    assert "anomalous" in done.stdout or "good" in done.stdout
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    # a/000.png and b/000.png both exist: unique names, nothing overwritten.
    assert len(pngs) == 2 * len(images)
    assert {"a__000_heatmap.png", "b__000_heatmap.png", "a__000_overlay.png"} <= set(pngs)
    for name in pngs:
        assert Image.open(out_dir / name).size == (128, 128)
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    expected = detector.predict([str(p) for p in images])
    assert [r["score"] for r in rows] == pytest.approx([p.score for p in expected], rel=1e-5)

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    done = run_cli("client", "predict", str(images[0]), str(bad), "--url", url)
    assert done.returncode == 1 and "1 of 2 images failed" in done.stderr

    nowhere = f"http://127.0.0.1:{free_port()}"
    done = run_cli("client", "predict", str(images[0]), "--url", nowhere)
    assert done.returncode == 2
    assert "unreachable" in done.stderr and "Traceback" not in done.stderr
