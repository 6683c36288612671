"""Locust user for the REST API: posts real images to ``/v1/predict`` as fast as answers come.

    locust -f benchmarks/locustfile.py --headless --users 8 --spawn-rate 8 --run-time 30s \\
        --host http://127.0.0.1:8000

Meant for a server on localhost (``benchmarks/load_test.py --engine locust`` starts one and runs
this). Images: MVTec AD bottle test images from ``../shared/datasets/mvtec_ad/bottle`` next to
the repository (or the category in ``DEFECTSCOPE_LOADTEST_DATA``), else generated textures.
``DEFECTSCOPE_API_KEY``, when set, is sent as ``X-API-Key``.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from locust import HttpUser, constant, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import pick_images

_data = os.environ.get("DEFECTSCOPE_LOADTEST_DATA")
IMAGES = pick_images(24, Path(_data) if _data else None)


class PredictUser(HttpUser):
    # Closed loop: the next request leaves when the previous answer is in, as in load_test.py.
    wait_time = constant(0)

    def on_start(self) -> None:
        self.rng = random.Random(id(self))
        key = os.environ.get("DEFECTSCOPE_API_KEY")
        if key:
            self.client.headers["X-API-Key"] = key

    @task
    def predict(self) -> None:
        name, data = self.rng.choice(IMAGES)
        with self.client.post(
            "/v1/predict",
            files={"file": (Path(name).name, data, "image/png")},
            name="/v1/predict",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
