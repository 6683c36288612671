"""Background decoding: order kept, errors reported per image, pixel digests taken in the
loader's threads, and ``prepare`` run on every decoded image (on the caller's thread, where
torch's own pool is), never on an unreadable one."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
from PIL import Image

import defectscope.data.loading as loading
from defectscope.data.loading import iter_loaded, pixel_digest


def _sources(tmp_path: Path) -> list:
    sources: list = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((5, 6, 3), i * 10, np.uint8)).save(path)
        sources.append(path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sources.insert(3, tmp_path / "broken.png")
    return sources


def test_prepare_runs_on_the_callers_thread_on_decoded_images_only(tmp_path: Path) -> None:
    threads: set[str] = set()

    def prepare(image: np.ndarray) -> int:
        threads.add(threading.current_thread().name)
        return int(image[0, 0, 0])

    batches = list(iter_loaded(_sources(tmp_path), 3, prepare=prepare))
    items = [item for batch in batches for item in batch]
    assert [len(b) for b in batches] == [3, 3, 2]
    assert [item.index for item in items] == list(range(8))
    assert items[3].error is not None and items[3].prepared is None
    decoded = [item for item in items if item.error is None]
    assert [item.prepared for item in decoded] == [0, 10, 20, 30, 40, 50, 60]
    assert threads == {threading.current_thread().name}
    assert all(item.digest is None for item in items)  # not asked for


def test_digests_are_taken_in_the_loader_threads(tmp_path: Path, monkeypatch) -> None:
    threads: set[str] = set()
    original = loading.pixel_digest

    def recording(image: np.ndarray) -> str:
        threads.add(threading.current_thread().name)
        return original(image)

    monkeypatch.setattr(loading, "pixel_digest", recording)
    items = [i for b in iter_loaded(_sources(tmp_path), 3, digest=True) for i in b]
    assert items[3].digest is None  # unreadable
    decoded = [item for item in items if item.image is not None]
    assert [item.digest for item in decoded] == [
        hashlib.sha256(item.image.tobytes()).hexdigest() for item in decoded
    ]
    assert len({item.digest for item in decoded}) == 7
    assert threads and threading.current_thread().name not in threads


def test_pixel_digest_ignores_memory_layout() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert pixel_digest(np.asfortranarray(image)) == pixel_digest(image)
    assert pixel_digest(image[:, ::-1]) != pixel_digest(image)


def test_decoded_arrays_are_prepared_inline() -> None:
    arrays = [np.full((4, 4, 3), v, np.uint8) for v in (1, 2)]
    items = [i for b in iter_loaded(arrays, 8, prepare=lambda a: a.sum()) for i in b]
    assert [int(i.prepared) for i in items] == [48, 96]
    assert all(i.prepared is None for b in iter_loaded(arrays, 8) for i in b)
