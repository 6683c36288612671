"""End to end: `defectscope serve` and `defectscope ui` as real processes, driven by
headless Chromium (Debian's /usr/bin/chromium through Playwright; never a downloaded browser).

Uploads a real image (an MVTec AD bottle test image when ../shared has it, else a texture
PNG), waits for the score and the heatmap overlay, checks them against the API's prediction
log, and saves a screenshot under ``test-artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("streamlit")
pytest.importorskip("fastapi")
pytest.importorskip("playwright.sync_api")

from _browser import CHROMIUM, SCORE_LINE, api_and_ui, chromium_page, upload_and_score
from _images import png, texture_crops, with_defect
from _models import copy_model
from conftest import BOTTLE_ROOT

from defectscope.client import DefectscopeClient
from defectscope.detector.detector import Detector

ARTIFACTS = Path(__file__).parents[2] / "test-artifacts"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="Debian chromium is not installed at /usr/bin/chromium (.ci/run installs it)",
    ),
]


@pytest.fixture(scope="module")
def model(texture_model_dir, tmp_path_factory) -> Path:
    # This module's own copy of the session's model: the UI may save thresholds to it.
    return copy_model(texture_model_dir, tmp_path_factory.mktemp("model"))


def test_upload_in_chromium_shows_score_and_heatmap(model, tmp_path) -> None:
    bottle = BOTTLE_ROOT / "test" / "broken_large" / "000.png"
    if bottle.is_file():
        image = tmp_path / "bottle_broken_large_000.png"
        shutil.copy(bottle, image)
    else:
        image = tmp_path / "brick_with_defect.png"
        image.write_bytes(png(with_defect(texture_crops(1, seed=3)[0])[0]))

    with api_and_ui(model, tmp_path) as (api, ui), chromium_page() as page:
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        text = upload_and_score(page, ui, [image])
        assert not [u for u in requested if not u.startswith((ui, "data:", "blob:"))], requested
        shown = float(re.search(SCORE_LINE, text).group(1))
        # The heatmap overlay arrived from the API and the browser decoded it: the opened
        # image's original, overlay and mask, and its thumbnail, are images of the upload's size.
        page.get_by_text("heatmap overlay").first.wait_for()
        page.wait_for_function(
            "() => [...document.images].filter(i => i.complete && i.naturalWidth > 0).length >= 4"
        )
        sizes = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
        )
        assert sizes.count(list(Image.open(image).size)) == 4, sizes
        # The favicon is the app's own picture, served by the UI: no request leaves the machine.
        assert all(u.startswith(ui) for u in requested if "favicon" in u or "icon" in u), requested
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "ui-e2e-inspect.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        # The page shows what the API logged for the browser's upload, and what the model says.
        with DefectscopeClient(api) as client:
            logged = client.predictions(limit=5)["items"]
        assert len(logged) == 1 and logged[0]["route"] == "/v1/predict/batch"
        assert shown == pytest.approx(logged[0]["score"], rel=1e-3)
        expected = Detector.load(model).predict([image])[0]
        assert shown == pytest.approx(expected.score, abs=1e-3)
        decision = "anomalous" if expected.is_anomalous else "good"
        assert text.split("—")[1].strip().startswith(decision)
