"""`defectscope serve --watch DIR`: a real server scores the images that land in a folder with
the model it serves, writes results, sorts the files and logs each prediction."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from _cli import run_cli
from _images import png, texture_crops, with_defect
from _server import AUTH, served

pytest.importorskip("fastapi")

from defectscope.cli.serving import watch_environment
from defectscope.errors import DefectscopeError


def wait_for_lines(path: Path, count: int, timeout: float = 120.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if len(rows) >= count:
                return rows
        time.sleep(0.2)
    raise AssertionError(f"{path}: fewer than {count} result lines after {timeout} s")


def test_the_server_scores_a_watched_folder(texture_model_dir: Path, tmp_path: Path) -> None:
    folder, sorted_to = tmp_path / "incoming", tmp_path / "sorted"
    (folder / "line1").mkdir(parents=True)
    results = tmp_path / "results.jsonl"
    env = {
        "DEFECTSCOPE_PREDICTION_LOG_URL": f"sqlite:///{tmp_path / 'log.db'}",
        "DEFECTSCOPE_WATCH_DIR": str(folder),
        "DEFECTSCOPE_WATCH_RESULTS": str(results),
        "DEFECTSCOPE_WATCH_SORT_TO": str(sorted_to),
        "DEFECTSCOPE_WATCH_SETTLE_S": "0.3",
        "DEFECTSCOPE_WATCH_POLL_S": "0.1",
    }
    good = texture_crops(2, seed=71)
    with served(texture_model_dir, env) as server:
        (folder / "line1" / "a.png").write_bytes(png(good[0]))
        (folder / "b.png").write_bytes(png(with_defect(good[1])[0]))
        (folder / "broken.png").write_bytes(b"not an image")
        rows = {row["path"]: row for row in wait_for_lines(results, 3)}
        assert set(rows) == {"line1/a.png", "b.png", "broken.png"}
        assert rows["broken.png"]["error"] and rows["broken.png"]["score"] is None
        assert rows["b.png"]["score"] > rows["line1/a.png"]["score"]
        # Scored by the served model: the same score as the REST API gives for the same bytes.
        answer = httpx.post(
            f"{server.url}/v1/predict",
            headers=AUTH,
            files={"file": ("b.png", png(with_defect(good[1])[0]), "image/png")},
        ).json()
        assert rows["b.png"]["score"] == pytest.approx(answer["score"], rel=1e-5)
        assert rows["b.png"]["model_fingerprint"] == answer["model_fingerprint"]
        # Each file moved by its decision, keeping its sub-folder.
        decision = "ng" if rows["line1/a.png"]["is_anomalous"] else "ok"
        assert (sorted_to / decision / "line1" / "a.png").is_file()
        assert (sorted_to / "error" / "broken.png").is_file()
        assert not (folder / "b.png").exists()
        # And in the server's prediction log, next to the REST prediction.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the log row follows the result line
            logged = httpx.get(f"{server.url}/v1/predictions", headers=AUTH).json()
            if logged["total"] >= 3:
                break
            time.sleep(0.2)
        assert logged["total"] == 3  # two watched images and the REST request


def test_watch_options_are_checked_before_the_server_starts(
    texture_model_dir: Path, tmp_path: Path
) -> None:
    model = str(texture_model_dir)
    for args, message in (
        (["--watch", str(tmp_path / "missing")], "not a folder"),
        (["--watch", str(tmp_path), "--watch-results", str(tmp_path / "r.txt")], ".jsonl or .csv"),
        (["--watch-sort-to", str(tmp_path)], "need --watch DIR"),
    ):
        proc = run_cli("serve", model, *args, "--port", "1", timeout=120, columns=400)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], proc.stderr
    env = watch_environment(tmp_path, tmp_path / "r.csv", tmp_path / "out")
    assert env == {
        "DEFECTSCOPE_WATCH_DIR": str(tmp_path.resolve()),
        "DEFECTSCOPE_WATCH_RESULTS": str((tmp_path / "r.csv").resolve()),
        "DEFECTSCOPE_WATCH_SORT_TO": str((tmp_path / "out").resolve()),
    }
    (tmp_path / "file").write_text("x")
    with pytest.raises(DefectscopeError, match="a file, not a folder"):
        watch_environment(tmp_path, None, tmp_path / "file")
