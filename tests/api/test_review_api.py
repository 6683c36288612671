"""The review loop over HTTP: verdicts, queues, exports, teaching a false alarm away, model
versions (undo), the threshold audit trail and the calibration numbers behind a threshold."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

from _images import png, texture_crops, with_defect
from _models import copy_model
from _server import assert_json_error, settings_for, wait_ready
from fastapi.testclient import TestClient

from defectscope.data.datasets import open_dataset
from defectscope.detector.calibration import spread_quantile
from defectscope.detector.detector import Detector
from defectscope.serving.app import create_app

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture
def model_dir(texture_model_dir, tmp_path) -> Path:
    return copy_model(texture_model_dir, tmp_path / "model")


@pytest.fixture
def client(model_dir, tmp_path) -> Iterator[TestClient]:
    settings = settings_for(model_dir, tmp_path, api_key="s3cret", export_max_items=50)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        c.headers.update(KEY)
        yield c


def predict(client: TestClient, image: np.ndarray, name: str = "a.png") -> dict:
    response = client.post("/v1/predict", files={"file": (name, png(image))})
    assert response.status_code == 200, response.text
    return response.json()


def review(client: TestClient, pid: int, verdict: str, **extra) -> dict:
    response = client.post(f"/v1/predictions/{pid}/review", json={"verdict": verdict, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_review_verdicts_queue_and_bad_input(client):
    good = texture_crops(4, seed=21)
    bad = with_defect(texture_crops(1, seed=22)[0])[0]
    results = [predict(client, image, f"g{i}.png") for i, image in enumerate(good)]
    flagged = predict(client, bad, "bad.png")
    assert flagged["is_anomalous"]
    pid = flagged["prediction_id"]

    queue = client.get("/v1/reviews/queue").json()
    assert pid in [item["id"] for item in queue["items"]]
    assert all(item["is_anomalous"] and item["review"] is None for item in queue["items"])

    stored = review(client, pid, "correct", note="crack", reviewer="ann")
    assert stored["review"]["verdict"] == "correct" and stored["review"]["reviewer"] == "ann"
    again = review(client, pid, "false_alarm")  # a re-review replaces the first
    assert again["review"]["verdict"] == "false_alarm" and again["review"]["note"] is None
    assert again["review"]["reviewer"] == "anonymous"
    assert pid not in [i["id"] for i in client.get("/v1/reviews/queue").json()["items"]]
    assert client.get("/v1/predictions", params={"verdict": "false_alarm"}).json()["total"] == 1

    passed = [r["prediction_id"] for r in results if not r["is_anomalous"]]
    audit = client.get("/v1/reviews/queue", params={"scope": "audit", "limit": 2, "seed": 3})
    body = audit.json()
    assert body["total"] == len(passed) and len(body["items"]) == min(2, len(passed))
    assert {i["id"] for i in body["items"]} <= set(passed)
    same = client.get("/v1/reviews/queue", params={"scope": "audit", "limit": 2, "seed": 3})
    assert [i["id"] for i in same.json()["items"]] == [i["id"] for i in body["items"]]

    url = f"/v1/predictions/{pid}/review"
    assert_json_error(
        client.post("/v1/predictions/999999/review", json={"verdict": "correct"}), 404
    )
    assert_json_error(client.post(url, json={"verdict": "maybe"}), 422)
    assert_json_error(client.post(url, json={"verdict": "correct", "note": "n" * 1001}), 422)
    assert_json_error(client.post(url, json={"verdict": "correct", "reviewer": "r" * 65}), 422)
    assert_json_error(client.post(url, json={"verdict": "correct", "extra": 1}), 422)
    broken = client.post(url, content=b"{", headers={"content-type": "application/json"})
    assert_json_error(broken, 400)
    assert_json_error(
        client.post(url, json={"verdict": "correct"}, headers={"X-API-Key": "no"}), 401
    )
    assert_json_error(client.get("/v1/reviews/queue", params={"scope": "all"}), 422)
    assert_json_error(client.get("/v1/reviews/queue", headers={"X-API-Key": "no"}), 401)


def test_exports_csv_and_a_zip_the_dataset_loader_reads(client, tmp_path):
    good = texture_crops(3, seed=31)
    bad = with_defect(texture_crops(1, seed=32)[0])[0]
    ids = [predict(client, image, f"g{i}.png")["prediction_id"] for i, image in enumerate(good)]
    bad_id = predict(client, bad, "bad.png")["prediction_id"]
    review(client, ids[0], "false_alarm", note="dust")
    review(client, ids[1], "missed_defect")
    review(client, bad_id, "correct")  # a confirmed flag: a defect
    exported = client.get("/v1/reviews.csv")
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert sorted(int(r["id"]) for r in rows) == sorted([ids[0], ids[1], bad_id])
    assert {r["review_verdict"] for r in rows} == {"false_alarm", "missed_defect", "correct"}

    response = client.get("/v1/reviews.zip")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    folder = tmp_path / "export"
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        archive.extractall(folder)
        labels = list(csv.DictReader(io.StringIO(archive.read("labels.csv").decode())))
    assert {int(r["id"]): r["label"] for r in labels} == {
        ids[0]: "good",
        ids[1]: "defect",
        bad_id: "defect",
    }
    assert (folder / "overlays" / f"{bad_id}.png").is_file()
    with pytest.warns(UserWarning, match="no mask"):  # image-level labels only
        dataset = open_dataset(folder)
    assert [s.path.name for s in dataset.train] == [f"{ids[0]}.png"]
    test = dataset.split("test")
    assert sorted((s.path.name, s.label) for s in test) == sorted(
        [(f"{ids[0]}.png", 0), (f"{ids[1]}.png", 1), (f"{bad_id}.png", 1)]
    )
    # The same model scores the exported images as it scored the uploads.
    exported_good = Detector.load(client.app.state.serving.settings.model_path)
    score = exported_good.predict(folder / "test" / "good" / f"{ids[0]}.png")[0].score
    assert score == pytest.approx(client.get(f"/v1/predictions/{ids[0]}").json()["score"], rel=1e-4)


def test_zip_export_is_bounded(model_dir, tmp_path):
    settings = settings_for(model_dir, tmp_path, export_max_items=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        for image in texture_crops(2, seed=41):
            review(c, predict(c, image)["prediction_id"], "correct")
        assert_json_error(c.get("/v1/reviews.zip"), 413)
        assert c.get("/v1/reviews.zip", params={"since": "2999-01-01T00:00:00Z"}).status_code == 200


def test_teaching_clears_a_false_alarm_and_versions_undo_it(client, model_dir):
    image = texture_crops(1, seed=51)[0]
    first = predict(client, image, "dusty.png")
    # A deliberately low threshold: this good image becomes a false alarm.
    low = first["score"] * 0.6
    saved = client.put("/v1/model/thresholds", json={"image": low, "reviewer": "lead"})
    assert saved.status_code == 200, saved.text
    alarm = predict(client, image, "dusty.png")
    assert alarm["is_anomalous"] and alarm["served_version"] == ""
    pid = alarm["prediction_id"]
    assert_json_error(client.post("/v1/model/teach"), 422)  # nothing reviewed yet
    empty = client.post("/v1/model/teach/preview").json()
    assert empty["images"] == 0 and empty["would_clear"] == 0 and empty["flagged_total"] >= 1
    review(client, pid, "false_alarm", reviewer="ann")

    preview = client.post("/v1/model/teach/preview", json={"prediction_ids": [pid]})
    assert preview.status_code == 200, preview.text
    plan = preview.json()
    assert plan["images"] == 1 and plan["bank_rows_added"] > 0
    assert plan["flagged_total"] >= 1 and plan["would_clear"] >= 1
    assert plan["current_threshold"] == pytest.approx(low) == plan["new_threshold"]
    assert client.get("/v1/model/versions").json() == {"active": None, "versions": []}

    state = client.app.state.serving
    assert state.teach_lock.acquire()
    try:
        assert_json_error(client.post("/v1/model/teach", json={}), 409)
    finally:
        state.teach_lock.release()
    taught = client.post("/v1/model/teach", json={"reviewer": "ann"})
    assert taught.status_code == 200, taught.text
    body = taught.json()
    assert (body["version"], body["parent"], body["images"]) == ("2", "1", 1)
    assert body["prediction_ids"] == [pid]

    after = predict(client, image, "dusty.png")
    assert not after["is_anomalous"] and after["score"] < 0.5 * alarm["score"]
    assert after["served_version"] == "2" and after["threshold"] == pytest.approx(low)
    logged = client.get(f"/v1/predictions/{after['prediction_id']}").json()
    assert logged["model_version"] == "2"
    assert client.get(f"/v1/predictions/{pid}").json()["taught_version"] == "2"
    assert_json_error(client.post("/v1/model/teach", json={"prediction_ids": [pid]}), 422)

    versions = client.get("/v1/model/versions").json()
    assert versions["active"] == "2"
    listed = {v["version"]: v for v in versions["versions"]}
    assert listed["2"]["parent"] == "1" and listed["2"]["created_by"] == "ann"
    assert listed["2"]["images_taught"] == 1
    assert listed["2"]["bank_rows"] == listed["1"]["bank_rows"] + body["bank_rows_added"]
    assert (model_dir / "versions" / "active").read_text().strip() == "2"
    lineage = client.get("/v1/model").json()["lineage"]
    assert lineage["parent_version"] == "1" and lineage["prediction_ids"] == [pid]
    reloaded = Detector.load(model_dir / "versions" / "2")
    assert reloaded.predict(image)[0].score == pytest.approx(after["score"], rel=1e-4)

    # Undo: the parent serves again and flags the image as before.
    undone = client.post("/v1/model/versions/1/activate")
    assert undone.status_code == 200, undone.text
    assert undone.json()["active"] == "1"
    back = predict(client, image, "dusty.png")
    assert back["is_anomalous"] and back["score"] == pytest.approx(alarm["score"], rel=1e-4)
    assert back["served_version"] == "1"
    assert client.get(f"/v1/predictions/{back['prediction_id']}").json()["model_version"] == "1"
    assert_json_error(client.post("/v1/model/versions/9/activate"), 404)
    assert_json_error(client.post("/v1/model/versions/x1/activate"), 422)
    assert client.post("/v1/model/versions/2/activate").json()["active"] == "2"

    # A restarted server serves the active version.
    settings = client.app.state.serving.settings
    with TestClient(create_app(settings), raise_server_exceptions=False) as fresh:
        wait_ready(fresh.get)
        fresh.headers.update(KEY)
        again = predict(fresh, image)
        assert again["served_version"] == "2" and not again["is_anomalous"]


def test_threshold_audit_reset_and_calibration_numbers(client, model_dir):
    detector = Detector.load(model_dir)
    calibration = detector.calibration
    scores = np.asarray(calibration.good_scores)
    q = 1 - calibration.false_alarm_rate
    rule = spread_quantile(scores, q, calibration.tail_spread)
    assert calibration.tail_spread == 1.2 and rule > scores.max()  # the fit's rule, spread
    info = client.get("/v1/model").json()
    assert info["threshold_audit"] == [] and info["calibrated_threshold"] == pytest.approx(rule)

    candidate = float(np.median(scores))
    numbers = client.get("/v1/model/calibration", params={"threshold": candidate}).json()
    assert numbers["good_scores"] == sorted(scores.tolist())
    assert numbers["lowest_good_score"] == pytest.approx(scores.min())
    assert numbers["expected_false_alarm_rate"] == pytest.approx((scores >= candidate).mean())
    assert numbers["below_lowest_good"] is False
    assert numbers["current_threshold"] == pytest.approx(detector.threshold)
    low = client.get("/v1/model/calibration", params={"threshold": scores.min() / 2}).json()
    assert low["below_lowest_good"] is True and low["expected_false_alarm_rate"] == 1.0
    assert low["estimated_false_alarm_rate"] == 1.0  # in the body of the scores: their share
    current = client.get("/v1/model/calibration").json()
    assert current["expected_false_alarm_rate"] == pytest.approx(
        (scores >= detector.threshold).mean()
    )
    # The stored threshold lies above every good score, but the rule that put it there reads
    # it as its target rate for new good images, not as 0.
    target = calibration.false_alarm_rate
    assert 0.5 * target <= current["estimated_false_alarm_rate"] <= target + 1e-6
    higher = client.get("/v1/model/calibration", params={"threshold": rule * 1.5}).json()
    assert higher["estimated_false_alarm_rate"] < current["estimated_false_alarm_rate"]
    assert_json_error(client.get("/v1/model/calibration", params={"threshold": "nan"}), 422)

    new = rule * 1.3
    body = {"image": new, "reviewer": "bob", "reason": "too many alarms"}
    assert client.put("/v1/model/thresholds", json=body).status_code == 200
    trail = client.get("/v1/model").json()["threshold_audit"]
    assert len(trail) == 1
    entry = trail[0]
    assert (entry["who"], entry["field"], entry["reason"]) == ("bob", "image", "too many alarms")
    assert entry["old"] == pytest.approx(detector.threshold) and entry["new"] == pytest.approx(new)
    assert entry["when"]

    assert_json_error(client.put("/v1/model/thresholds", json={"reset": True, "image": 1.0}), 422)
    reset = client.put("/v1/model/thresholds", json={"reset": True})
    assert reset.status_code == 200, reset.text
    assert reset.json()["calibration"]["threshold"] == pytest.approx(rule)
    trail = client.get("/v1/model").json()["threshold_audit"]
    assert [e["field"] for e in trail] == ["image", "image", "pixel"]
    assert trail[1]["who"] == "anonymous" and trail[1]["new"] == pytest.approx(rule)
    # Kept in the model file: a fresh load sees the trail and the calibrated value.
    reloaded = Detector.load(model_dir)
    assert reloaded.threshold == pytest.approx(rule)
    assert reloaded.calibration.threshold_source == "good_quantile"
    from defectscope.detector.teaching import model_extras

    extras = model_extras(model_dir)
    assert len(extras["threshold_audit"]) == 3
    assert extras["calibrated_threshold"] == pytest.approx(rule)


def test_client_and_cli_over_a_real_server(model_dir, tmp_path):
    from _cli import run_cli
    from _server import running_server

    from defectscope.client import ClientError, DefectscopeClient

    settings = settings_for(model_dir, tmp_path, api_key="s3cret")
    image = texture_crops(1, seed=71)[0]
    with running_server(settings, Detector.load(model_dir)) as (url, _app):
        env = {"DEFECTSCOPE_URL": url, "DEFECTSCOPE_API_KEY": "s3cret"}
        with DefectscopeClient(url, api_key="s3cret") as client:
            score = client.predict(png(image))["score"]
            client.set_thresholds(score * 0.6, reviewer="lead", reason="test")
            result = client.predict(("p.png", png(image)), line="L1", tags=["a", "b"])
            pid = result["prediction_id"]
            row = client.prediction(pid)
            assert (row["part_id"], row["line"], row["tags"]) == ("p.png", "L1", ["a", "b"])
            # Pictures are drawn after the answer: poll a moment for them.
            deadline = time.monotonic() + 10
            while not client.prediction(pid)["has_pictures"] and time.monotonic() < deadline:
                time.sleep(0.05)
            thumbnail = client.prediction_picture(pid, "thumbnail")
            assert thumbnail.startswith(b"\x89PNG")
            assert client.review_queue(limit=5)["items"][0]["id"] == pid
            numbers = client.calibration(score)
            assert numbers["threshold"] == pytest.approx(score)
            assert client.model_info()["threshold_audit"][-1]["who"] == "lead"
            with pytest.raises(ClientError) as error:
                client.review(pid, "maybe")
            assert error.value.status == 422

        queue = run_cli("review", "queue", "--json", env=env, check=True)
        assert pid in [item["id"] for item in json.loads(queue.stdout)["items"]]
        run_cli("review", "mark", str(pid), "false_alarm", "--note", "glare", env=env, check=True)
        bad = run_cli("review", "mark", str(pid), "maybe", env=env)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
        preview = run_cli("review", "teach", "--preview", env=env, check=True)
        assert json.loads(preview.stdout)["prediction_ids"] == [pid]
        taught = run_cli("review", "teach", "--reviewer", "ann", env=env, check=True)
        assert "version 2 (parent 1)" in taught.stderr
        listed = run_cli("review", "versions", "--json", env=env, check=True)
        assert json.loads(listed.stdout)["active"] == "2"
        csv_path, zip_path = tmp_path / "r.csv", tmp_path / "r.zip"
        run_cli(
            "review", "export", "--csv", str(csv_path), "--zip", str(zip_path), env=env, check=True
        )
        assert str(pid) in csv_path.read_text() and zipfile.is_zipfile(zip_path)
        run_cli("review", "activate", "1", env=env, check=True)
        with DefectscopeClient(url, api_key="s3cret") as client:
            assert client.versions()["active"] == "1"
            assert client.predict(png(image))["served_version"] == "1"
        missing = run_cli("review", "activate", "7", env=env)
        assert missing.returncode == 2 and "no model version 7" in missing.stderr
    gone = run_cli("review", "versions", env=env)
    assert gone.returncode == 2 and "unreachable" in gone.stderr

    # Locally, without a server: a new model file whose lineage names nothing served.
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(png(image))
    local = run_cli("teach", str(model_dir), str(tmp_path / "imgs"), "--out", str(tmp_path / "t"))
    assert local.returncode == 0, local.stderr
    assert Detector.load(tmp_path / "t").predict(image)[0].score < 0.5 * score
    refused = run_cli("teach", str(tmp_path / "nowhere"), str(tmp_path / "imgs"), "--out", "x")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1


def test_another_worker_follows_a_taught_version(model_dir, tmp_path):
    settings = settings_for(model_dir, tmp_path)
    image = texture_crops(1, seed=81)[0]
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as first,
        TestClient(create_app(settings), raise_server_exceptions=False) as second,
    ):
        wait_ready(first.get)
        wait_ready(second.get)
        score = predict(first, image)["score"]
        first.put("/v1/model/thresholds", json={"image": score * 0.6})
        review(first, predict(first, image)["prediction_id"], "false_alarm")
        assert first.post("/v1/model/teach", json={}).json()["version"] == "2"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            answer = predict(second, image)
            if answer["served_version"] == "2":
                break
            time.sleep(0.2)
        assert answer["served_version"] == "2" and not answer["is_anomalous"]
        assert answer["score"] == pytest.approx(predict(first, image)["score"], rel=1e-4)


def test_teach_and_activate_refuse_bad_bodies(client):
    for body in (
        {"prediction_ids": []},
        {"prediction_ids": [0]},
        {"prediction_ids": [2**70]},
        {"prediction_ids": ["x"]},
        {"since": "yesterday"},
        {"since": "9999-12-31T23:59:59-01:00"},
        {"other": 1},
    ):
        for route in ("/v1/model/teach", "/v1/model/teach/preview"):
            assert_json_error(client.post(route, json=body), 422)
    assert_json_error(client.post("/v1/model/teach", json={"prediction_ids": [12345]}), 422)
    # A tag filter is matched literally: LIKE wildcards in it match nothing else.
    predict(client, texture_crops(1, seed=91)[0])
    client.post(
        "/v1/predict",
        files={"file": ("a.png", png(texture_crops(1, seed=92)[0]))},
        data={"tags": "lot_1"},
    )
    assert client.get("/v1/predictions", params={"tag": "lot_1"}).json()["total"] == 1
    assert client.get("/v1/predictions", params={"tag": "lot%"}).json()["total"] == 0
    assert client.get("/v1/predictions", params={"tag": "lotX1"}).json()["total"] == 0
