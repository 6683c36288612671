"""`defectscope watch` as a line runs it: a real subprocess on a real folder with the session's
saved model. Files arriving while it runs, a file written in two steps, sorting, a corrupt
file, a SIGKILL mid-stream and a restart (every file exactly once), a real HTTP receiver for
the webhook (including a retried post), the prediction log, and bad input."""

from __future__ import annotations

import csv
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from _cli import run_cli
from _images import png, texture_crops, with_defect

from defectscope.line.journal import FileKey, Journal
from defectscope.line.results import ResultFiles
from defectscope.line.watcher import Watcher, WatchOptions


def rows(path: Path) -> list[dict]:
    """The result lines of ``path``; a line torn by a kill is left out."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start_watch(folder: Path, model: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "defectscope.cli", "watch", str(folder), "--model", str(model),
         *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    good = texture_crops(8, seed=21)
    return {
        **{f"good_{i}.png": png(image) for i, image in enumerate(good[:6])},
        "defect_0.png": png(with_defect(good[6])[0]),
        "defect_1.png": png(with_defect(good[7], seed=4)[0]),
    }


def test_once_scores_sorts_and_survives_a_corrupt_file(
    tmp_path: Path, texture_model_dir: Path, images: dict[str, bytes]
) -> None:
    folder, sorted_to = tmp_path / "in", tmp_path / "sorted"
    (folder / "line2").mkdir(parents=True)
    for name, data in images.items():
        (folder / "line2" / name if name.startswith("defect") else folder / name).write_bytes(data)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (folder / "notes.txt").write_text("not an image pattern")
    for category in ("ok", "ng"):  # names already taken there: the new file gets a suffix
        (sorted_to / category / "line2").mkdir(parents=True)
        (sorted_to / category / "line2" / "defect_0.png").write_bytes(b"older")
    jsonl, table = tmp_path / "results.jsonl", tmp_path / "results.csv"
    proc = run_cli(
        "watch", str(folder), "--model", str(texture_model_dir), "--once", "--settle", "0",
        "--results", str(jsonl), "--results", str(table), "--sort-to", str(sorted_to),
        "--batch-size", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    found = {row["path"]: row for row in rows(jsonl)}
    assert sorted(found) == sorted(
        ["broken.png", *[n for n in images if n.startswith("good")],
         "line2/defect_0.png", "line2/defect_1.png"]
    )  # fmt: skip
    broken = found.pop("broken.png")
    assert broken["error"] and broken["score"] is None
    assert Path(broken["sorted_to"]) == sorted_to / "error" / "broken.png"
    reason = (sorted_to / "error" / "broken.png.error.txt").read_text()
    assert reason.strip() == broken["error"]
    for rel, row in found.items():
        assert row["error"] is None and isinstance(row["score"], float)
        category = "ng" if row["is_anomalous"] else "ok"
        target = Path(row["sorted_to"])
        assert target.parent == (sorted_to / category / rel).parent and target.is_file()
        assert target.read_bytes() == images[Path(rel).name]
        assert row["model"] == str(texture_model_dir) and len(row["model_fingerprint"]) == 16
    defect = found["line2/defect_0.png"]
    assert Path(defect["sorted_to"]).name == "defect_0_1.png"  # the old one is kept
    assert max(found[n]["score"] for n in found if "defect" in n) > max(
        found[n]["score"] for n in found if "good" in n
    )
    assert (folder / "notes.txt").exists()  # not matched by the patterns, left alone
    assert not list(folder.rglob("*.png"))  # everything else was moved
    with table.open(newline="") as stream:
        table_rows = list(csv.DictReader(stream))
    assert sorted(r["path"] for r in table_rows) == sorted([*found, "broken.png"])
    assert "8 scored (" in proc.stderr and "1 unreadable" in " ".join(proc.stderr.split())


def test_arrivals_half_written_files_and_a_kill_mid_stream(
    tmp_path: Path, texture_model_dir: Path
) -> None:
    folder, results = tmp_path / "in", tmp_path / "results.jsonl"
    folder.mkdir()
    crops = [png(image) for image in texture_crops(30, seed=5)]
    args = ("--results", str(results), "--poll", "0.1", "--settle", "1.0", "--batch-size", "1")
    proc = start_watch(folder, texture_model_dir, *args)
    try:
        # A file arriving while it runs is scored.
        (folder / "first.png").write_bytes(crops[0])
        wait_for(lambda: len(rows(results)) == 1, what="the first arrival")
        # Written in two steps with a pause longer than a poll, shorter than the settle time.
        half = len(crops[1]) // 2
        with (folder / "slow.png").open("wb") as stream:
            stream.write(crops[1][:half])
            stream.flush()
            time.sleep(0.6)
            stream.write(crops[1][half:])
        wait_for(lambda: len(rows(results)) == 2, what="the slow file")
        slow = rows(results)[1]
        assert slow["path"] == "slow.png" and slow["error"] is None
        # Many at once; killed while it works through them.
        for i, data in enumerate(crops[2:]):
            (folder / f"burst_{i:02d}.png").write_bytes(data)
        wait_for(lambda: len(rows(results)) >= 6, what="part of the burst")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert len(rows(results)) < 30, "the burst finished before the kill: nothing was tested"
    again = run_cli(
        "watch", str(folder), "--model", str(texture_model_dir), "--once", "--settle", "0",
        "--results", str(results),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    counts = Counter(row["path"] for row in rows(results))
    assert sorted(counts) == sorted(
        ["first.png", "slow.png"] + [f"burst_{i:02d}.png" for i in range(28)]
    )
    assert set(counts.values()) == {1}, [p for p, n in counts.items() if n > 1]
    assert all(row["error"] is None for row in rows(results))


def test_sigterm_stops_after_the_batch(tmp_path: Path, texture_model_dir: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    proc = start_watch(folder, texture_model_dir, "--poll", "0.1")
    time.sleep(1.0)
    (folder / "a.png").write_bytes(png(texture_crops(1, seed=2)[0]))
    results = folder / ".defectscope-watch" / "results.jsonl"
    wait_for(lambda: len(rows(results)) == 1, what="a.png")
    second = run_cli("watch", str(folder), "--model", str(texture_model_dir), "--once")
    assert second.returncode == 2 and "already being watched" in second.stderr, second.stderr
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    assert "SIGTERM: stopping" in stderr and "1 scored" in stderr
    journal = (folder / ".defectscope-watch" / "journal.jsonl").read_text()
    assert '"event": "done"' in journal


def test_restart_finishes_a_claimed_file_from_its_result_line(
    tmp_path: Path, fitted, images: dict[str, bytes]
) -> None:
    # A run killed after writing a.png's result line and before marking it done.
    folder, sorted_to, results = tmp_path / "in", tmp_path / "sorted", tmp_path / "r.jsonl"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(images["good_0.png"])
    key_a, key_b = FileKey.of(folder, folder / "a.png"), FileKey.of(folder, folder / "b.png")
    journal = Journal(folder / ".defectscope-watch" / "journal.jsonl").open(folder)
    journal.claim([key_a, key_b])
    journal.close()
    files = ResultFiles([results]).open()
    files.write([{"key": key_a.key, "path": "a.png", "sorted_to": str(sorted_to / "ok" / "a.png"),
                  "error": None, "is_anomalous": False}])  # fmt: skip
    files.close()
    with results.open("a") as stream:
        stream.write('{"key": "b.png|torn')  # b's line was cut by the crash
    options = WatchOptions(root=folder, results=[results], settle_s=0, once=True, sort_to=sorted_to)
    stats = Watcher(fitted, options).run()
    assert stats.recovered == 1 and stats.scored == 1
    assert (sorted_to / "ok" / "a.png").is_file()  # the move the crash skipped
    assert Counter(r["path"] for r in rows(results)) == {"a.png": 1, "b.png": 1}


def test_files_left_in_place_are_not_scored_again(
    tmp_path: Path, fitted, images: dict[str, bytes]
) -> None:
    folder, results = tmp_path / "in", tmp_path / "r.csv"
    folder.mkdir()
    for name in ("a.png", "=b.png"):  # a name a spreadsheet would run as a formula
        (folder / name).write_bytes(images["good_0.png"])
    options = WatchOptions(root=folder, results=[results], settle_s=0, once=True)
    assert Watcher(fitted, options).run().scored == 2
    assert Watcher(fitted, options).run().scored == 0  # unsorted, still there: done already
    (folder / "c.png").write_bytes(images["good_1.png"])
    time.sleep(0.01)
    (folder / "a.png").write_bytes(images["good_2.png"])  # written again: a new file
    assert Watcher(fitted, options).run().scored == 2
    with results.open(newline="") as stream:
        paths = [row["path"] for row in csv.DictReader(stream)]
    assert Counter(paths) == {"a.png": 2, "'=b.png": 1, "c.png": 1}
    # Recovery reads the keys back as they were, quoting undone.
    key = FileKey.of(folder, folder / "=b.png").key
    assert ResultFiles([results]).rows_present({key})[key]["path"] == "=b.png"


class Receiver(http.server.BaseHTTPRequestHandler):
    posts: ClassVar[list[dict]] = []
    fail_first: ClassVar[int] = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Receiver.fail_first > 0:
            Receiver.fail_first -= 1
            self.send_response(503)
        else:
            Receiver.posts.append(json.loads(body))
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.posts, Receiver.fail_first = [], 1
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_webhook_posts_each_result_after_a_failure_and_logs(
    tmp_path: Path, texture_model_dir: Path, images: dict[str, bytes], receiver: str
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in images.items():
        (folder / name).write_bytes(data)
    database = tmp_path / "log.db"
    proc = run_cli(
        "watch", str(folder), "--model", str(texture_model_dir), "--once", "--settle", "0",
        "--webhook", receiver, "--log-url", f"sqlite:///{database}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p["path"] for p in Receiver.posts) == sorted(images)  # the 503 was retried
    assert f"webhook: {len(images)} sent, 0 failed" in " ".join(proc.stderr.split())
    with sqlite3.connect(database) as db:
        logged = db.execute("select route, count(*) from predictions group by route").fetchall()
    assert logged == [("watch", len(images))]

    # Only anomalies; the journal keeps the posts that could not be delivered.
    Receiver.posts, Receiver.fail_first = [], 10**6
    more = tmp_path / "more"
    more.mkdir()
    for name, data in images.items():
        (more / name).write_bytes(data)
    proc = run_cli(
        "watch", str(more), "--model", str(texture_model_dir), "--once", "--settle", "0",
        "--webhook", receiver, "--only-anomalies", "--webhook-retries", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    anomalous = [
        r for r in rows(more / ".defectscope-watch" / "results.jsonl") if r["is_anomalous"]
    ]
    assert anomalous, "the defect images should be anomalous"
    journal = (more / ".defectscope-watch" / "journal.jsonl").read_text().splitlines()
    failed = [json.loads(line) for line in journal if '"webhook_failed"' in line]
    assert sorted(f["key"] for f in failed) == sorted(r["key"] for r in anomalous)
    assert "HTTP 503 after 2 attempts" in failed[0]["reason"]


def test_model_from_the_registry(tmp_path: Path, texture_model_dir: Path) -> None:
    registry = tmp_path / "registry"
    for args in (
        ("register", "texture", str(texture_model_dir)),
        ("register", "texture", str(texture_model_dir)),
        ("promote", "texture", "1", "--stage", "production"),
    ):
        run_cli("registry", *args, "--registry", str(registry), check=True)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(png(texture_crops(1, seed=3)[0]))
    database = tmp_path / "log.db"
    run_cli(
        "watch", str(folder), "--model", "texture@production", "--once", "--settle", "0",
        "--log-url", f"sqlite:///{database}", env={"DEFECTSCOPE_REGISTRY": str(registry)},
        check=True,
    )  # fmt: skip
    (row,) = rows(folder / ".defectscope-watch" / "results.jsonl")
    assert row["model"] == "texture@1" and row["model_version"] == 1
    with sqlite3.connect(database) as db:
        columns = [info[1] for info in db.execute("pragma table_info(predictions)")]
        if "model_version" in columns:  # the log names the registry version that scored
            assert db.execute("select model_version from predictions").fetchall() == [
                ("texture@1",)
            ]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["{tmp}/missing", "--model", "{model}"], ["no such folder"]),
        (["{tmp}", "--model", "{tmp}/no-model"], ["model not found"]),
        (["{tmp}", "--model", "nothing@production", "--registry", "{tmp}/reg"], ["no model"]),
        (["{tmp}", "--model", "{model}", "--pattern", "*.[png"], ["--pattern"]),
        (["{tmp}", "--model", "{model}", "--pattern", "a/*.png"], ["--pattern"]),
        (["{tmp}", "--model", "{model}", "--results", "{tmp}/r.txt"], [".jsonl or .csv"]),
        (["{tmp}", "--model", "{model}", "--webhook", "ftp://x"], ["--webhook"]),
        (["{tmp}", "--model", "{model}", "--poll", "0"], ["--poll"]),
    ],
)
def test_bad_input_is_one_line(
    tmp_path: Path, texture_model_dir: Path, args: list[str], words: list[str]
) -> None:
    filled = [a.format(tmp=tmp_path, model=texture_model_dir) for a in args]
    proc = run_cli("watch", *filled, "--once", unset=("DEFECTSCOPE_DEBUG",), columns=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert all(word in lines[0] for word in words), lines[0]
