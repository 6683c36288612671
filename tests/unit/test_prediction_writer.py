"""PredictionWriter: pictures from a bounded background pool; every file written, same rows."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.detector.prediction import Prediction
from defectscope.errors import ImageLoadError
from defectscope.prediction_writer import PredictionWriter
from defectscope.visualize import render_prediction

STUB = type("Stub", (), {"threshold": 1.0})()


def prediction(seed: int, source: str | None = None) -> Prediction:
    rng = np.random.default_rng(seed)
    anomaly_map = rng.random((40, 60)).astype(np.float32) * 2.0
    return Prediction(
        score=float(anomaly_map.max()),
        normalized_score=0.5,
        is_anomalous=seed % 2 == 0,
        threshold=1.0,
        anomaly_map=anomaly_map,
        mask=anomaly_map >= 1.0,
        pixel_threshold=1.0,
        source=source,
    )


def image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 60, 3), dtype=np.uint8)


def test_every_picture_is_written_and_equals_the_rendered_one(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i:03d}.png" for i in range(12)]
    with PredictionWriter(tmp_path / "out", paths, STUB, workers=2, max_pending=3) as writer:
        for i in range(12):
            writer.write(i, prediction(i), image=image(i))
        writer.write(0, ImageLoadError(str(paths[0]), "broken"))  # error rows need no picture
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == 13 and rows[-1]["error"] == "broken"
    assert writer.n_anomalous == 6
    for i, row in enumerate(rows[:12]):
        assert list(row["files"]) == ["heatmap", "mask", "overlay"]
        expected = render_prediction(prediction(i), image(i), 1.0)
        for picture, relative in row["files"].items():
            written = np.asarray(Image.open(tmp_path / "out" / relative))
            assert (written == expected[picture]).all(), (i, picture)


def test_pictures_decode_the_source_when_no_image_is_given(tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.fromarray(image(3)).save(source)
    with PredictionWriter(tmp_path / "out", [source], STUB) as writer:
        writer.write(0, prediction(3, source=str(source)))
    overlay = np.asarray(Image.open(tmp_path / "out" / "images" / "in_overlay.png"))
    assert (overlay == render_prediction(prediction(3), image(3), 1.0)["overlay"]).all()


def test_no_overlay_without_an_image_or_a_source(tmp_path: Path) -> None:
    with PredictionWriter(tmp_path / "out", [tmp_path / "a.png"], STUB) as writer:
        writer.write(0, prediction(1))
    files = {p.name for p in (tmp_path / "out" / "images").iterdir()}
    assert files == {"a_heatmap.png", "a_mask.png"}


def test_the_queue_of_pictures_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    def slow(self, files, prediction, image) -> None:  # type: ignore[no-untyped-def]
        started.release()
        release.wait(10)

    monkeypatch.setattr(PredictionWriter, "_write_images", slow)
    paths = [tmp_path / f"{i}.png" for i in range(5)]
    written: list[int] = []
    with PredictionWriter(tmp_path / "out", paths, STUB, workers=1, max_pending=2) as writer:

        def produce() -> None:
            for i in range(5):
                writer.write(i, prediction(i), image=image(i))
                written.append(i)

        producer = threading.Thread(target=produce)
        producer.start()
        assert started.acquire(timeout=10)
        producer.join(0.5)
        # One picture job running, one queued: the third write waits for a free slot.
        assert written == [0, 1] and producer.is_alive()
        release.set()
        producer.join(10)
    assert written == [0, 1, 2, 3, 4]


def test_a_failed_picture_is_raised(tmp_path: Path) -> None:
    missing = tmp_path / "gone.png"  # no image given and the source cannot be read
    with pytest.raises(ImageLoadError), PredictionWriter(tmp_path / "out", [missing], STUB) as w:
        w.write(0, prediction(0, source=str(missing)))
