"""Threshold saves on `defectscope serve --workers 2`: two processes, one model file.

Each worker holds its own detector; a save must start from the file, not from the worker's
possibly stale copy, or a threshold another worker saved a moment before is lost.
"""

from __future__ import annotations

import asyncio
import re
import stat
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _models import copy_model  # noqa: E402
from _server import AUTH, served  # noqa: E402

from defectscope.detector.model_file import read_header  # noqa: E402

ROUNDS = 8


def test_concurrent_saves_on_two_workers_keep_every_field(texture_model_dir, tmp_path) -> None:
    model = copy_model(texture_model_dir, tmp_path / "model")
    file = model / "model.safetensors"
    file.chmod(0o640)  # a mode the operator chose: a save must keep it
    env = {"DEFECTSCOPE_PREDICTION_LOG_URL": "none"}
    with served(model, env, workers=2) as server:

        async def save(body: dict) -> int:
            # A connection per request, so that both workers take their share.
            async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
                return (await http.put("/v1/model/thresholds", json=body)).status_code

        async def round_trip(image: float, pixel: float) -> list[int]:
            return await asyncio.gather(save({"image": image}), save({"pixel": pixel}))

        for i in range(ROUNDS):
            image, pixel = 0.5 + 0.01 * i, 1.0 + 0.01 * i
            assert asyncio.run(round_trip(image, pixel)) == [200, 200]
            stored = read_header(file)["calibration"]
            assert (stored["threshold"], stored["pixel_threshold"]) == (image, pixel), i

        assert stat.S_IMODE(file.stat().st_mode) == 0o640
        # Both workers serve the saved thresholds (a worker checks the file once a second).
        time.sleep(1.2)
        for _ in range(6):
            info = httpx.get(f"{server.url}/v1/model", headers=AUTH).json()["calibration"]
            assert (info["threshold"], info["pixel_threshold"]) == (image, pixel)
        # One model, one info series, however many saves and workers.
        metrics = httpx.get(f"{server.url}/metrics", headers=AUTH).text
        series = re.findall(r"^defectscope_model_info\{.*\} 1\.0$", metrics, re.MULTILINE)
        assert len(series) == 1, metrics
        assert not re.search(r"^defectscope_model_info\{.*\} 0\.0$", metrics, re.MULTILINE)
