"""Background decoding: order kept, errors reported per image, and ``prepare`` run on every
decoded image (in the loader's threads), never on an unreadable one."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.data.loading import iter_loaded


def test_prepare_runs_in_the_loader_threads_on_decoded_images_only(tmp_path: Path) -> None:
    sources: list = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((5, 6, 3), i * 10, np.uint8)).save(path)
        sources.append(path)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    sources.insert(3, tmp_path / "broken.png")
    threads: set[str] = set()

    def prepare(image: np.ndarray) -> int:
        threads.add(threading.current_thread().name)
        return int(image[0, 0, 0])

    batches = list(iter_loaded(sources, 3, prepare=prepare))
    items = [item for batch in batches for item in batch]
    assert [len(b) for b in batches] == [3, 3, 2]
    assert [item.index for item in items] == list(range(8))
    assert items[3].error is not None and items[3].prepared is None
    decoded = [item for item in items if item.error is None]
    assert [item.prepared for item in decoded] == [int(item.image[0, 0, 0]) for item in decoded]
    assert [item.prepared for item in decoded] == [0, 10, 20, 30, 40, 50, 60]
    assert threading.current_thread().name not in threads  # never on the caller's thread


def test_decoded_arrays_are_prepared_inline() -> None:
    arrays = [np.full((4, 4, 3), v, np.uint8) for v in (1, 2)]
    items = [i for b in iter_loaded(arrays, 8, prepare=lambda a: a.sum()) for i in b]
    assert [int(i.prepared) for i in items] == [48, 96]
    assert all(i.prepared is None for b in iter_loaded(arrays, 8) for i in b)
