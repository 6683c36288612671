"""Traceable predictions: part fields in, filters, one prediction with its stored pictures,
bounded and pruned pictures, and an old prediction log database that gains the new columns."""

from __future__ import annotations

import base64
import io
import os
import sqlite3
import time
from collections.abc import Iterator

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("httpx")

from _images import png, texture_crops, with_defect
from _models import copy_model
from _server import assert_json_error, settings_for, wait_ready
from fastapi.testclient import TestClient
from integration.test_prediction_log_postgres import postgres_url  # noqa: F401 - a fixture
from PIL import Image

from defectscope.detector.prediction import Prediction
from defectscope.serving.app import create_app
from defectscope.serving.picture_store import PictureStore
from defectscope.serving.predictions_log import LogQuery, PredictionLogRepository

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    good = texture_crops(3, seed=11)
    return [*good, with_defect(texture_crops(1, seed=12)[0])[0]]


@pytest.fixture
def client(texture_model_dir, tmp_path) -> Iterator[TestClient]:
    model = copy_model(texture_model_dir, tmp_path / "model")
    settings = settings_for(model, tmp_path, api_key="s3cret")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        c.headers.update(KEY)
        yield c


def post(client: TestClient, image: np.ndarray, name: str = "a.png", **fields: str) -> dict:
    response = client.post("/v1/predict", files={"file": (name, png(image))}, data=fields)
    assert response.status_code == 200, response.text
    return response.json()


def test_part_fields_round_trip_and_filter(client, images):
    first = post(client, images[0], "p1.png", line="L1", station="S1", tags="night, lotA")
    second = post(client, images[1], "p2.png", part_id="SN-2", line="L2", tags="lotA")
    encoded = base64.b64encode(png(images[2])).decode()
    third = client.post(
        "/v1/predict", json={"image_base64": encoded, "station": "S1", "tags": ["x"]}
    ).json()
    ids = [first["prediction_id"], second["prediction_id"], third["prediction_id"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 3

    one = client.get(f"/v1/predictions/{ids[0]}").json()
    assert (one["part_id"], one["line"], one["station"]) == ("p1.png", "L1", "S1")
    assert one["tags"] == ["night", "lotA"] and one["review"] is None
    assert one["score"] == pytest.approx(first["score"])
    assert one["threshold"] == pytest.approx(first["threshold"])
    assert one["model_version"] == first["model_fingerprint"]  # unversioned model
    assert client.get(f"/v1/predictions/{ids[1]}").json()["part_id"] == "SN-2"
    third_row = client.get(f"/v1/predictions/{ids[2]}").json()
    assert third_row["part_id"] is None and third_row["tags"] == ["x"]

    def total(**params) -> int:
        response = client.get("/v1/predictions", params=params)
        assert response.status_code == 200, response.text
        return response.json()["total"]

    assert total() == 3
    assert total(tag="lotA") == 2 and total(tag="lot") == 0 and total(tag="night") == 1
    assert total(station="S1") == 2 and total(line="L2") == 1 and total(part_id="SN-2") == 1
    assert total(reviewed="false") == 3 and total(reviewed="true") == 0
    n_flagged = sum(r["is_anomalous"] for r in (first, second, third))
    assert total(decision="anomalous") == n_flagged and total(decision="normal") == 3 - n_flagged
    page = client.get("/v1/predictions", params={"limit": 2, "offset": 1}).json()
    assert [item["id"] for item in page["items"]] == [ids[1], ids[0]]  # newest first
    assert all(item["has_pictures"] for item in page["items"])


def test_bad_part_fields_and_queries_are_422(client, images):
    data = png(images[0])
    cases = [
        {"tags": ",".join(f"t{i}" for i in range(17))},
        {"tags": "x" * 65},
        {"line": "l" * 65},
        {"part_id": "p" * 257},
        {"station": "bad\x01name"},
    ]
    for fields in cases:
        response = client.post("/v1/predict", files={"file": ("a.png", data)}, data=fields)
        assert_json_error(response, 422)
        batch = client.post("/v1/predict/batch", files=[("files", ("a.png", data))], data=fields)
        assert_json_error(batch, 422)
    encoded = base64.b64encode(data).decode()
    assert_json_error(client.post("/v1/predict", json={"image_base64": encoded, "tags": 5}), 422)
    for params in ({"decision": "maybe"}, {"tag": "a,b"}, {"reviewed": "perhaps"}):
        assert_json_error(client.get("/v1/predictions", params=params), 422)
    assert_json_error(client.get("/v1/predictions/999999"), 404)
    assert_json_error(client.get("/v1/predictions/0"), 422)
    assert_json_error(client.get("/v1/predictions/999999/thumbnail.png"), 404)
    assert_json_error(client.get("/v1/predictions/1/other.png"), 422)


def test_batch_items_carry_ids_and_fields(client, images):
    files = [("files", (f"b{i}.png", png(image))) for i, image in enumerate(images[:2])]
    files.append(("files", ("broken.png", b"not an image")))
    body = client.post("/v1/predict/batch", files=files, data={"line": "L9", "tags": "t"}).json()
    ids = [item["result"]["prediction_id"] for item in body["items"][:2]]
    assert body["items"][2]["result"] is None
    rows = [client.get(f"/v1/predictions/{i}").json() for i in ids]
    assert [row["part_id"] for row in rows] == ["b0.png", "b1.png"]
    assert all(row["line"] == "L9" and row["tags"] == ["t"] for row in rows)


def test_pictures_are_served_bounded_and_absent_when_off(
    client, images, texture_model_dir, tmp_path
):
    large = np.asarray(Image.fromarray(images[3]).resize((300, 280)))
    answer = post(client, large, "big.png")
    pid = answer["prediction_id"]
    detail = client.get(f"/v1/predictions/{pid}").json()
    assert detail["has_pictures"]
    for kind in ("thumbnail", "overlay", "image"):
        url = detail[f"{kind}_url"]
        assert url == f"/v1/predictions/{pid}/{kind}.png"
        response = client.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(response.content))
        if kind == "thumbnail":
            assert max(picture.size) == 256
        else:
            assert picture.size == (300, 280)
    original = np.asarray(Image.open(io.BytesIO(client.get(detail["image_url"]).content)))
    assert np.array_equal(original, large)  # lossless: what teaching will embed
    unauthorised = client.get(detail["overlay_url"], headers={"X-API-Key": "wrong"})
    assert_json_error(unauthorised, 401)

    # Pictures off: predictions are still logged, with no picture URLs.
    model = copy_model(texture_model_dir, tmp_path / "model-off")
    settings = settings_for(model, tmp_path / "off", pictures_enabled=False)
    (tmp_path / "off").mkdir()
    with TestClient(create_app(settings), raise_server_exceptions=False) as off:
        wait_ready(off.get)
        pid = post(off, images[0])["prediction_id"]
        row = off.get(f"/v1/predictions/{pid}").json()
        assert not row["has_pictures"] and row["thumbnail_url"] is None
        assert_json_error(off.get(f"/v1/predictions/{pid}/thumbnail.png"), 404)


def test_original_is_kept_only_under_its_limit(texture_model_dir, tmp_path, images):
    model = copy_model(texture_model_dir, tmp_path / "model")
    settings = settings_for(model, tmp_path, pictures_original_max_bytes=10)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        pid = post(c, images[0])["prediction_id"]
        row = c.get(f"/v1/predictions/{pid}").json()
        assert row["thumbnail_url"] and row["overlay_url"] and row["image_url"] is None
        assert_json_error(c.get(f"/v1/predictions/{pid}/image.png"), 404)


def fake_prediction(height: int, width: int) -> Prediction:
    grid = np.linspace(0.0, 2.0, height * width, dtype=np.float32).reshape(height, width)
    return Prediction(1.5, 0.7, True, 1.0, grid, grid > 1.0, 1.2)


def test_picture_store_bounds_sizes_and_prunes(tmp_path):
    store = PictureStore(tmp_path / "pictures", max_count=3, max_age_days=1, max_bytes=10**9)
    image = np.random.default_rng(0).integers(0, 255, (1500, 1300, 3), dtype=np.uint8)
    key = store.new_key()
    store.save(
        key,
        image,
        fake_prediction(1500, 1300),
        1.0,
        keep_original=False,
        render_max_pixels=4 * 1024 * 1024,
    )
    assert store.path(key, "image") is None
    with (
        Image.open(store.path(key, "thumbnail")) as thumb,
        Image.open(store.path(key, "overlay")) as over,
    ):
        assert max(thumb.size) == 256 and max(over.size) == 1024
    small = image[:64, :64]
    keys = []
    for _ in range(4):
        keys.append(store.new_key())
        store.save(
            keys[-1],
            small,
            fake_prediction(64, 64),
            1.0,
            keep_original=True,
            render_max_pixels=10**6,
        )
    now = time.time()
    # Age: the first one is made two days old.
    old = store.folder(key)
    os.utime(old, (now - 2 * 86400, now - 2 * 86400))
    removed = store.prune(now)
    assert removed == 2 and not store.has(key) and not store.has(keys[0])
    assert all(store.has(k) for k in keys[1:])
    # Bytes: a budget under two folders keeps the newest one only.
    sizes = sum(f.stat().st_size for f in store.folder(keys[3]).iterdir())
    store.max_bytes = sizes + 1
    store.prune(now)
    assert [store.has(k) for k in keys[1:]] == [False, False, True]
    with pytest.raises(ValueError):
        store.folder("../etc")


OLD_SCHEMA = """
CREATE TABLE predictions (
    id INTEGER NOT NULL PRIMARY KEY, created_at DATETIME, route VARCHAR(64),
    request_id VARCHAR(64), model_fingerprint VARCHAR(64), image_sha256 VARCHAR(64),
    width INTEGER, height INTEGER, score FLOAT, normalized_score FLOAT, is_anomalous BOOLEAN,
    threshold FLOAT, latency_ms FLOAT
);
INSERT INTO predictions VALUES (1, '2026-11-01 10:00:00.000000', '/v1/predict', 'r1', 'fp',
    'abc', 10, 10, 2.0, 0.8, 1, 1.5, 3.0);
"""


def test_old_schema_database_gains_columns_and_keeps_rows(tmp_path, texture_model_dir, images):
    db = tmp_path / "predictions.db"
    with sqlite3.connect(db) as connection:
        connection.executescript(OLD_SCHEMA)
    repository = PredictionLogRepository(f"sqlite:///{db}")
    try:
        total, rows = repository.items(LogQuery())
        assert total == 1 and rows[0]["score"] == 2.0 and rows[0]["tags"] == []
        assert rows[0]["review"] is None and rows[0]["part_id"] is None
        assert repository.items(LogQuery(reviewed=False))[0] == 1
    finally:
        repository.close()
    with sqlite3.connect(db) as connection:
        columns = {row[1] for row in connection.execute("PRAGMA table_info(predictions)")}
    assert {"part_id", "tags", "review_verdict", "picture_key", "model_version"} <= columns
    # The server runs on it: new rows, the old row reviewable.
    model = copy_model(texture_model_dir, tmp_path / "model")
    with TestClient(create_app(settings_for(model, tmp_path)), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        pid = post(c, images[0], tags="new")["prediction_id"]
        assert pid == 2
        reviewed = c.post("/v1/predictions/1/review", json={"verdict": "correct"})
        assert reviewed.status_code == 200, reviewed.text
        assert c.get("/v1/predictions", params={"reviewed": "true"}).json()["total"] == 1
        assert c.get("/v1/predictions", params={"tag": "new"}).json()["total"] == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def old_db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    # The PostgreSQL server of tests/integration/test_prediction_log_postgres.py (imported
    # below as a fixture of this module too); skipped where PostgreSQL is not installed.
    return request.getfixturevalue("postgres_url")


def test_migration_filters_and_reviews_on_each_database(old_db_url):
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import (
        Boolean,
        Column,
        DateTime,
        Float,
        Integer,
        MetaData,
        String,
        Table,
        create_engine,
    )

    from defectscope.serving.predictions_log import Base
    from defectscope.serving.reviews_log import (
        audit_sample,
        iter_reviewed,
        mark_taught,
        set_review,
        teachable,
    )

    old = MetaData()
    Table(
        "predictions",
        old,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", DateTime(timezone=True)),
        *(Column(n, String(64)) for n in ("route", "request_id", "model_fingerprint")),
        Column("image_sha256", String(64)),
        Column("width", Integer),
        Column("height", Integer),
        *(Column(n, Float) for n in ("score", "normalized_score", "threshold", "latency_ms")),
        Column("is_anomalous", Boolean),
    )
    engine = create_engine(old_db_url)
    old.create_all(engine)
    engine.dispose()
    repository = PredictionLogRepository(old_db_url)
    try:
        t0 = datetime(2026, 11, 1, tzinfo=UTC)

        def row(i: int, **extra) -> dict:
            return {
                "created_at": t0 + timedelta(minutes=i),
                "route": "/v1/predict",
                "request_id": f"r{i}",
                "model_fingerprint": "fp",
                "image_sha256": "x",
                "width": 1,
                "height": 1,
                "score": float(i),
                "normalized_score": 0.5,
                "is_anomalous": i % 2 == 1,
                "threshold": 1.0,
                "latency_ms": 1.0,
                **extra,
            }

        ids = repository.add_many(
            [
                row(0),
                row(1, tags=",a,b,", station="S1", model_version="2"),
                row(2, tags=",b,", line="L1"),
                row(3, part_id="P3"),
            ]
        )
        assert len(ids) == 4 and ids == sorted(ids)

        def total(**filters) -> int:
            return repository.items(LogQuery(**filters))[0]

        assert total() == 4 and total(tag="b") == 2 and total(tag="a") == 1
        assert total(station="S1") == 1 and total(line="L1") == 1 and total(part_id="P3") == 1
        assert total(model_version="2") == 1 and total(is_anomalous=True) == 2
        assert (
            set_review(repository, ids[1], "false_alarm", "dust", "ann")["review"]["note"] == "dust"
        )
        assert set_review(repository, 10**9, "correct", None, "x") is None
        set_review(repository, ids[2], "correct", None, "bob")
        assert total(reviewed=True) == 2 and total(reviewed=False) == 2
        assert total(verdict="false_alarm") == 1
        count, sample = audit_sample(repository, LogQuery(limit=5), seed=1)
        assert count == 1 and [item["id"] for item in sample] == [ids[0]]
        assert [r.id for r in teachable(repository, None, None, 10)] == [ids[1]]
        mark_taught(repository, [ids[1]], "2")
        assert teachable(repository, None, None, 10) == []
        assert [r.id for r in iter_reviewed(repository, LogQuery(), chunk=1)] == ids[1:3]
        first = repository.items(LogQuery(oldest_first=True, limit=1))[1][0]
        assert first["id"] == ids[0] and first["tags"] == [] and first["review"] is None
    finally:
        Base.metadata.drop_all(repository.engine)
        repository.close()


def test_pictures_waiting_to_be_drawn_are_bounded(texture_model_dir, tmp_path, images):
    model = copy_model(texture_model_dir, tmp_path / "model")
    settings = settings_for(model, tmp_path)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c.get)
        state = c.app.state.serving
        # As if the budget were taken by images still waiting for their pictures.
        state.picture_pixels = settings.inflight_pixel_budget
        pid = post(c, images[0])["prediction_id"]
        assert pid is not None and not c.get(f"/v1/predictions/{pid}").json()["has_pictures"]
        state.picture_pixels = 0
        pid = post(c, images[0])["prediction_id"]
        assert c.get(f"/v1/predictions/{pid}").json()["has_pictures"]
        assert state.picture_pixels == 0  # released once drawn
