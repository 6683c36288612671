"""End to end, the review loop: `defectscope serve` (with a prediction log that keeps pictures)
and `defectscope ui` as real processes, driven by headless Chromium (Debian's
/usr/bin/chromium through Playwright; never a downloaded browser).

A folder of good and defective images is scored at a threshold low enough that one good image
is flagged. On the Review page the flagged images are gone through with the keyboard only, the
good one marked a false alarm; the model is taught (preview, then confirm) and that image
passes on the new version; the teach is undone (the parent version active again); a threshold
change on the Model page shows in the audit trail. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
pytest.importorskip("fastapi")
pytest.importorskip("playwright.sync_api")

from _browser import CHROMIUM, api_and_ui, chromium_page
from _images import png, texture_crops, with_defect
from _models import copy_model

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


@pytest.fixture
def model(texture_model_dir, tmp_path) -> Path:
    # Its own copy: teaching writes new versions next to it and thresholds into it.
    return copy_model(texture_model_dir, tmp_path / "model")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"ui-review-e2e-{name}.png"), full_page=True)


def shown_prediction(page, seen: list[int]) -> int:
    """The id of the prediction on screen once the rerun has replaced the last one reviewed
    (Streamlit keeps the old elements on screen until the new run redraws them)."""
    header = page.get_by_text(re.compile(r"^Prediction \d+ —")).first
    deadline = time.monotonic() + 90  # generous: CI machines may be busy
    while time.monotonic() < deadline:
        prediction = int(re.match(r"Prediction (\d+)", header.inner_text()).group(1))
        if prediction not in seen and not page.get_by_test_id("stStatusWidget").count():
            return prediction
        page.wait_for_timeout(50)
    raise AssertionError(f"the next prediction never showed (reviewed {seen})")


def test_review_teach_undo_and_threshold_audit_in_chromium(model, tmp_path) -> None:
    folder = tmp_path / "batch"
    folder.mkdir()
    goods = texture_crops(4, seed=91)
    for i, image in enumerate(goods):
        (folder / f"good_{i}.png").write_bytes(png(image))
    for i in range(2):
        (folder / f"defect_{i}.png").write_bytes(png(with_defect(goods[i], seed=7 + i)[0]))
    images = sorted(folder.glob("*.png"))
    # A threshold between the two highest good scores: exactly one good image is flagged.
    predicted = Detector.load(model).predict(images)
    scores = {p.name: r.score for p, r in zip(images, predicted, strict=True)}
    good_scores = sorted(s for n, s in scores.items() if n.startswith("good"))
    threshold = (good_scores[-1] + good_scores[-2]) / 2
    false_alarm = next(n for n, s in scores.items() if n.startswith("good") and s > threshold)
    assert all(s > threshold for n, s in scores.items() if n.startswith("defect")), scores

    with api_and_ui(model, tmp_path) as (api, ui), chromium_page(1400, 1200) as page:
        page.set_default_timeout(120_000)  # teaching and reruns on a busy machine
        with DefectscopeClient(api) as client:
            client.set_thresholds(image=threshold)
            ids = {}
            for i, path in enumerate(images):
                answer = client.predict(path, part_id=f"P{i:03d}", line="L1", station="S2")
                ids[path.name] = answer["prediction_id"]
            flagged = {n for n in ids if scores[n] >= threshold}
            assert len(flagged) == 3
            # The server logs in the background: wait (bounded) until all three are queued.
            deadline = time.monotonic() + 15
            while client.review_queue(scope="flagged")["total"] < len(flagged):
                assert time.monotonic() < deadline, "the flagged predictions were not logged"
                time.sleep(0.1)

        # ---------------------------------------------------------- review by keyboard
        page.goto(f"{ui}/review")
        progress = page.get_by_text(re.compile(r"\d+ left of 3"))
        progress.wait_for()
        page.get_by_text("heatmap overlay").first.wait_for()
        seen = []
        for remaining in (3, 2, 1):
            page.get_by_text(f"{remaining} left of 3").wait_for()
            prediction = shown_prediction(page, seen)
            seen.append(prediction)
            page.evaluate("document.activeElement && document.activeElement.blur()")
            page.keyboard.press("f" if prediction == ids[false_alarm] else "a")
        page.get_by_text("Every image in this queue is reviewed.").wait_for()
        assert sorted(seen) == sorted(ids[n] for n in flagged)
        page.keyboard.press("ArrowLeft")  # back to the last one: its review is shown
        page.get_by_text(re.compile(r"Reviewed: (correct|false alarm)")).first.wait_for()
        shot(page, "reviewed")
        with DefectscopeClient(api) as client:
            reviewed = {
                r["id"]: r["review"]["verdict"] for r in client.predictions(reviewed=True)["items"]
            }
        assert reviewed[ids[false_alarm]] == "false_alarm"
        assert {reviewed[ids[n]] for n in flagged - {false_alarm}} == {"correct"}

        # ---------------------------------------------------------------------- teach
        page.get_by_role("button", name="Preview teaching").click()
        page.get_by_text(re.compile(r"Teaching 1 false-alarm image")).wait_for()
        page.get_by_role("button", name="Confirm: teach the model").click()
        taught = page.get_by_text(re.compile(r"Taught 1 image\(s\): version \S+ is active"))
        taught.wait_for()
        version = re.search(r"version (\S+) is active", taught.inner_text()).group(1)
        page.get_by_role("button", name="Re-score this session's false alarms on it").click()
        page.get_by_text(re.compile(rf"Prediction {ids[false_alarm]}: passes now")).wait_for()
        shot(page, "taught")
        with DefectscopeClient(api) as client:
            versions = client.versions()
            assert str(versions["active"]) == version
            parent = next(v["parent"] for v in versions["versions"] if str(v["version"]) == version)
            again = client.predict(folder / false_alarm)
            assert not again["is_anomalous"]

        # ----------------------------------------------------------------------- undo
        page.get_by_role("button", name=f"Undo (go back to version {parent})").click()
        page.get_by_text(f"Version {parent} is active again.").wait_for()
        with DefectscopeClient(api) as client:
            assert str(client.versions()["active"]) == str(parent)
            assert client.predict(folder / false_alarm)["is_anomalous"]  # flagged again

        # --------------------------------------------- threshold change and its audit trail
        page.get_by_role("link", name="Model").click()
        page.get_by_text("Change the image threshold").wait_for()
        new = round(threshold * 1.25, 3)
        box = page.get_by_label("New image threshold (score ≥ threshold → anomalous)")
        box.fill(str(new))
        box.press("Enter")
        page.get_by_label("Your name").fill("Ana")
        page.get_by_label("Why (kept in the audit trail)").fill("fewer false alarms")
        page.get_by_role("button", name="Save threshold…").click()
        page.get_by_role("button", name="Confirm", exact=True).click()
        page.get_by_text("Threshold saved to the model").wait_for()
        # The audit trail on the page (a plain table) has the change, and so has the API.
        page.get_by_role("cell", name="Ana", exact=True).wait_for()
        with DefectscopeClient(api) as client:
            info = client.model_info()
        assert info["calibration"]["threshold"] == pytest.approx(new)
        last = info["threshold_audit"][-1]
        assert (last["who"], last["new"]) == ("Ana", pytest.approx(new))
        shot(page, "audit")
