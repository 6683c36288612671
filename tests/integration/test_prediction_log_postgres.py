"""The prediction log on SQLite and on a real PostgreSQL server.

The PostgreSQL server is started by the test session itself from the Debian packages
(``/usr/lib/postgresql/*/bin``): a throwaway cluster in a temporary folder, on a free localhost
port, stopped and deleted at the end. Without the binaries (or psycopg) those cases are skipped.
The same repository tests run on both databases.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")

from _images import free_port
from sqlalchemy import inspect as sql_inspect

from defectscope.serving.predictions_log import (
    CSV_COLUMNS,
    Base,
    LogQuery,
    PredictionLogRepository,
)

PG_USER = "postgres"


def find_pg_bin() -> Path | None:
    """Newest Debian PostgreSQL ``bin`` folder that has initdb and pg_ctl."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        folder = Path(initdb).parent
        if (folder / "pg_ctl").exists():
            with contextlib.suppress(ValueError):
                found.append((int(folder.parent.name.split(".")[0]), folder))
    return max(found)[1] if found else None


def server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    return PG_USER


def run_as(user: str | None, argv: list[str], timeout: float = 60) -> None:
    if user is not None:
        argv = ["runuser", "-u", user, "--", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed ({done.returncode}): {done.stdout}{done.stderr}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a fresh database on a PostgreSQL server of this test session's own."""
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL tests need psycopg[binary]")
    pg_bin = find_pg_bin()
    if pg_bin is None:
        pytest.skip(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); "
            "install them with: apt-get install postgresql"
        )
    user = server_user()
    # Not pytest's tmp_path: that is private to root, and the server user must reach it.
    root = Path(tempfile.mkdtemp(prefix="defectscope-pg-"))
    data, sockets, logfile = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    if user is not None:
        entry = pwd.getpwnam(user)
        for path in (root, sockets):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    started = False
    try:
        initdb = [str(pg_bin / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust"]
        run_as(user, [*initdb, "-E", "UTF8", "--no-sync", "--no-instructions"], timeout=120)
        # A port can be taken between probing and binding: retry with a new one.
        for _ in range(3):
            port = free_port()
            options = (
                f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            )
            try:
                pg_ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-l", str(logfile)]
                run_as(user, [*pg_ctl, "-o", options, "-w", "-t", "60", "start"], timeout=90)
            except RuntimeError:
                continue
            started = True
            break
        if not started:
            log = logfile.read_text() if logfile.exists() else ""
            raise RuntimeError(f"PostgreSQL did not start:\n{log[-2000:]}")
        admin = f"host=127.0.0.1 port={port} user={PG_USER} dbname=postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute("CREATE DATABASE defectscope")
        yield f"postgresql+psycopg://{PG_USER}@127.0.0.1:{port}/defectscope"
    finally:
        if started:
            with contextlib.suppress(Exception):
                run_as(user, [str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'predictions.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def repository(db_url) -> Iterator[PredictionLogRepository]:
    repo = PredictionLogRepository(db_url)
    yield repo
    # The PostgreSQL database is shared by the session: every test starts from no table.
    Base.metadata.drop_all(repo.engine)
    repo.close()


T0 = datetime(2026, 11, 20, 12, 0, 0, 123456, tzinfo=UTC)


def record(i: int, *, at: datetime | None = None, anomalous: bool = False) -> dict:
    return {
        "created_at": at or T0 + timedelta(minutes=i),
        "route": "/v1/predict" if i % 2 == 0 else "/v1/predict/batch",
        "request_id": f"req-{i}",
        "model_fingerprint": "5f0c2d8e41a7b9c3",
        "image_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
        "width": 900 + i,
        "height": 700,
        "score": 1.0 / 3.0 + i,
        "normalized_score": 0.25 + i / 100,
        "is_anomalous": anomalous,
        "threshold": 1.4200000000000002,
        "latency_ms": 12.5 + i,
    }


# ------------------------------------------------------------------------- repository
def test_rows_round_trip_with_types_and_utc_times(repository):
    repository.add_many([record(0), record(1, anomalous=True)])
    total, rows = repository.query(LogQuery())
    assert total == 2
    assert [row["request_id"] for row in rows] == ["req-1", "req-0"]  # newest first
    row = rows[1]
    assert list(row) == CSV_COLUMNS
    expected = record(0)
    for key in ("route", "model_fingerprint", "image_sha256", "width", "height"):
        assert row[key] == expected[key]
    # Double precision both ways, not a 4-byte REAL.
    assert row["score"] == expected["score"] and row["threshold"] == expected["threshold"]
    assert row["is_anomalous"] is False and rows[0]["is_anomalous"] is True
    assert isinstance(row["id"], int) and rows[0]["id"] > row["id"]
    created = datetime.fromisoformat(row["created_at"])
    assert created == T0 and created.utcoffset() == timedelta(0)  # microseconds kept


def test_filters_by_time_with_any_zone_and_by_decision(repository):
    repository.add_many([record(i, anomalous=i in (1, 3)) for i in range(5)])

    def total(**kwargs) -> int:
        return repository.query(LogQuery(**kwargs))[0]

    assert total() == 5
    assert total(is_anomalous=True) == 2 and total(is_anomalous=False) == 3
    assert total(since=T0 + timedelta(minutes=2)) == 3  # inclusive
    assert total(until=T0 + timedelta(minutes=2)) == 2  # exclusive
    # The same instant written in another zone, and naive (taken as UTC).
    plus2 = timezone(timedelta(hours=2))
    assert total(since=(T0 + timedelta(minutes=2)).astimezone(plus2)) == 3
    assert total(since=(T0 + timedelta(minutes=2)).replace(tzinfo=None)) == 3
    assert total(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=4)) == 3
    assert total(since=T0 + timedelta(minutes=1), is_anomalous=True) == 2
    assert total(since=T0 + timedelta(days=1)) == 0


def test_paging_is_newest_first_and_counts_all_matches(repository):
    repository.add_many([record(i) for i in range(7)])
    total, page = repository.query(LogQuery(limit=3, offset=2))
    assert total == 7
    assert [row["request_id"] for row in page] == ["req-4", "req-3", "req-2"]
    total, page = repository.query(LogQuery(limit=3, offset=6))
    assert total == 7 and [row["request_id"] for row in page] == ["req-0"]
    assert repository.query(LogQuery(offset=50)) == (7, [])


def test_csv_export_streams_in_chunks_oldest_first(repository):
    repository.add_many([record(i, anomalous=i % 3 == 0) for i in range(7)])
    pieces = list(repository.iter_csv(LogQuery(), chunk=2))
    assert len(pieces) == 4  # 2 + 2 + 2 + 1 rows, the header in the first piece only
    rows = list(csv.DictReader(io.StringIO("".join(pieces))))
    assert [row["request_id"] for row in rows] == [f"req-{i}" for i in range(7)]
    assert datetime.fromisoformat(rows[0]["created_at"]) == T0
    flagged = list(
        csv.DictReader(
            io.StringIO("".join(repository.iter_csv(LogQuery(is_anomalous=True), chunk=2)))
        )
    )
    assert [row["request_id"] for row in flagged] == ["req-0", "req-3", "req-6"]
    empty = "".join(repository.iter_csv(LogQuery(since=T0 + timedelta(days=1))))
    assert empty.strip() == ",".join(CSV_COLUMNS)


def test_concurrent_writers_from_threads(repository):
    # The app writes from background-task threads; every write must land exactly once.
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for j in range(5):
                repository.add_many([record(worker * 100 + j), record(worker * 100 + j + 50)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    total, rows = repository.query(LogQuery(limit=1000))
    assert total == 40 and len({row["id"] for row in rows}) == 40


def test_reopening_keeps_rows_and_empty_writes_are_no_ops(repository, db_url):
    repository.add_many([record(0)])
    repository.add_many([])
    again = PredictionLogRepository(db_url)  # create_all must not fail on an existing table
    try:
        assert again.query(LogQuery())[0] == 1
        tables = sql_inspect(again.engine).get_table_names()
        assert "predictions" in tables
        indexed = {
            column
            for index in sql_inspect(again.engine).get_indexes("predictions")
            for column in index["column_names"]
        }
        assert {"created_at", "is_anomalous", "image_sha256"} <= indexed
    finally:
        again.close()


def test_postgresql_url_is_used_as_given(postgres_url):
    repo = PredictionLogRepository(postgres_url)
    try:
        assert repo.engine.dialect.name == "postgresql"
        assert repo.engine.dialect.driver == "psycopg"
    finally:
        Base.metadata.drop_all(repo.engine)
        repo.close()


# --------------------------------------------------------------------------- end to end
def test_app_logs_predictions_to_the_database(db_url, fitted_copy, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from _images import texture_crops
    from fastapi.testclient import TestClient
    from PIL import Image

    from defectscope.serving.app import create_app
    from defectscope.serving.settings import ServingSettings

    detector = fitted_copy
    buffer = io.BytesIO()
    Image.fromarray(texture_crops(1, seed=5)[0]).save(buffer, format="PNG")
    data = buffer.getvalue()
    # Through the environment, as a deployment would configure it.
    monkeypatch.setenv("DEFECTSCOPE_PREDICTION_LOG_URL", db_url)
    settings = ServingSettings(model_path=None)
    assert settings.prediction_log_url == db_url
    app = create_app(settings, detector=detector)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            state = app.state.serving
            assert state.repository is not None, "the prediction log did not open"
            predicted = client.post("/v1/predict", files={"file": ("a.png", data)})
            assert predicted.status_code == 200, predicted.text
            client.post("/v1/predict/batch", files=[("files", ("b.png", data))])
            # The log is written by a background task after the response: wait for it.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                page = client.get("/v1/predictions").json()
                if page["total"] >= 2:
                    break
                time.sleep(0.05)
            assert page["total"] == 2, page
            newest, oldest = page["items"]
            assert oldest["route"] == "/v1/predict" and newest["route"] == "/v1/predict/batch"
            assert oldest["image_sha256"] == hashlib.sha256(data).hexdigest()
            assert oldest["score"] == pytest.approx(predicted.json()["score"])
            assert oldest["request_id"] == predicted.headers["x-request-id"]
            assert datetime.fromisoformat(oldest["created_at"]).utcoffset() == timedelta(0)
            exported = client.get("/v1/predictions.csv")
            assert exported.status_code == 200
            assert len(list(csv.DictReader(io.StringIO(exported.text)))) == 2
            engine = state.repository.engine
            assert engine.dialect.name == db_url.split(":")[0].split("+")[0]
    finally:
        # The lifespan closed the repository's engine; drop the table with a fresh one.
        cleanup = PredictionLogRepository(db_url)
        Base.metadata.drop_all(cleanup.engine)
        cleanup.close()
