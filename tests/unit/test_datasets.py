"""Dataset layouts, masks and fingerprints (defectscope.data.datasets)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.datasets import (
    Sample,
    dataset_fingerprint,
    load_mask,
    open_dataset,
    open_files,
)
from defectscope.data.io import load_image
from defectscope.errors import DatasetError, ImageLoadError


def _png(path: Path, value: int = 128, size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), value, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (12, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros(size, dtype=np.uint8)
    mask[2:5, 3:7] = 255
    Image.fromarray(mask).save(path)
    return path


def make_mvtec(root: Path, mask_missing: bool = False) -> Path:
    for i in range(3):
        _png(root / "train" / "good" / f"{i:03d}.png")
    for i in range(2):
        _png(root / "test" / "good" / f"{i:03d}.png")
        _png(root / "test" / "crack" / f"{i:03d}.png")
        _png(root / "test" / "hole" / f"{i:03d}.png")
        _mask(root / "ground_truth" / "hole" / f"{i:03d}_mask.png")
    _mask(root / "ground_truth" / "crack" / "000_mask.png")
    if not mask_missing:
        _mask(root / "ground_truth" / "crack" / "001_mask.png")
    # Clutter every real dataset has: hidden files, notes, thumbnails folders.
    (root / "train" / "good" / ".000.png").write_bytes(b"junk")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    _png(root / "test" / ".cache" / "000.png")
    (root / "license.txt").write_text("CC BY-NC-SA")
    return root


def test_mvtec_ad_layout(tmp_path):
    data = open_dataset(make_mvtec(tmp_path / "widget"))
    assert data.layout == "mvtec_ad" and data.name == "widget"
    assert [s.path.name for s in data.train] == ["000.png", "001.png", "002.png"]
    assert data.validation == []
    assert [(s.defect_type, s.path.name) for s in data.test] == [
        ("good", "000.png"),
        ("good", "001.png"),
        ("crack", "000.png"),
        ("crack", "001.png"),
        ("hole", "000.png"),
        ("hole", "001.png"),
    ]
    for sample in data.test:
        assert sample.label == (sample.defect_type != "good")
        if sample.label:
            assert sample.mask_path == (
                data.root / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
            )
        else:
            assert sample.mask_path is None
    summary = data.summary()
    assert summary["train"]["total"] == 3
    assert summary["test"] == {
        "total": 6,
        "good": 2,
        "defective": 4,
        "with_mask": 4,
        "by_type": {"crack": 2, "good": 2, "hole": 2},
    }
    assert data.defect_types == ["crack", "hole"]


def test_missing_mask_warns_but_keeps_the_sample(tmp_path):
    root = make_mvtec(tmp_path / "widget", mask_missing=True)
    with pytest.warns(UserWarning, match=r"1 defective image\(s\) have no mask.*crack/001.png"):
        data = open_dataset(root)
    crack = [s for s in data.test if s.defect_type == "crack"]
    assert [s.mask_path is None for s in crack] == [False, True]
    assert not load_mask(crack[1]).any()


def test_mvtec_ad2_layout(tmp_path):
    root = tmp_path / "can"
    for i in range(3):
        _png(root / "train" / "good" / f"{i:03d}_regular.png")
    _png(root / "validation" / "good" / "000_regular.png")
    _png(root / "test_public" / "good" / "000_regular.png")
    _png(root / "test_public" / "bad" / "000_regular.png")
    _png(root / "test_public" / "bad" / "001_overexposed.png")
    _mask(root / "test_public" / "ground_truth" / "bad" / "000_regular_mask.png")
    _mask(root / "test_public" / "ground_truth" / "bad" / "001_overexposed.png")  # tolerated name
    for i in range(4):
        _png(root / "test_private" / f"{i:03d}.png")
    _png(root / "test_private_mixed" / "000.png")

    data = open_dataset(root)
    assert data.layout == "mvtec_ad2"
    assert len(data.train) == 3 and len(data.validation) == 1
    assert [(s.defect_type, s.label) for s in data.test] == [("good", 0), ("bad", 1), ("bad", 1)]
    assert all(s.mask_path is not None for s in data.test if s.label)
    assert all("test_private" not in str(s.path) for s in data.train + data.test)
    summary = data.summary()
    assert summary["unlabeled"] == {"test_private": 4, "test_private_mixed": 1}
    assert any("test_private" in note for note in summary["notes"])
    assert summary["validation"]["total"] == 1


def test_folder_layout_defect_folders_are_test_only(tmp_path):
    root = tmp_path / "parts"
    for i in range(4):
        _png(root / "good" / f"g{i}.png")
    _png(root / "scratch" / "s0.png")
    _png(root / "scratch" / "s1.jpg")
    _png(root / "dent" / "d0.png")
    _mask(root / "masks" / "scratch" / "s0_mask.png")
    _mask(root / "masks" / "dent" / "d0.bmp")
    (root / "empty").mkdir()

    with pytest.warns(UserWarning, match="s1.jpg"):
        data = open_dataset(root)
    assert data.layout == "folder"
    assert len(data.train) == 4 and all(s.label == 0 for s in data.train)
    assert [(s.defect_type, s.path.name) for s in data.test] == [
        ("dent", "d0.png"),
        ("scratch", "s0.png"),
        ("scratch", "s1.jpg"),
    ]
    assert [s.mask_path.name if s.mask_path else None for s in data.test] == [
        "d0.bmp",
        "s0_mask.png",
        None,
    ]
    assert any("no good images" in note for note in data.summary()["notes"])


def test_folder_layout_with_train_good(tmp_path):
    root = tmp_path / "parts"
    for i in range(2):
        _png(root / "train" / "good" / f"{i}.png")
    _png(root / "train" / "bent" / "0.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no masks at all is normal here, not worth a warning
        data = open_dataset(root)
    assert data.layout == "folder"
    assert len(data.train) == 2
    assert [(s.defect_type, s.label) for s in data.test] == [("bent", 1)]


def test_folder_layout_with_test_folder_uses_mvtec_semantics(tmp_path):
    root = tmp_path / "parts"
    for i in range(2):
        _png(root / "good" / f"{i}.png")
    _png(root / "test" / "good" / "0.png")
    _png(root / "test" / "bent" / "0.png")
    _mask(root / "masks" / "bent" / "0.png")
    data = open_dataset(root)
    assert data.layout == "folder"
    assert [(s.defect_type, s.label) for s in data.test] == [("good", 0), ("bent", 1)]
    assert data.test[1].mask_path == root / "masks" / "bent" / "0.png"


def test_plain_folder_is_train_only(tmp_path):
    for name in ("b.png", "a.jpg", "c.tiff"):
        _png(tmp_path / name)
    (tmp_path / "readme.md").write_text("x")
    data = open_dataset(tmp_path)
    assert data.layout == "folder"
    assert [s.path.name for s in data.train] == ["a.jpg", "b.png", "c.tiff"]
    assert data.test == [] and data.validation == []


def test_files_layout(tmp_path):
    one = _png(tmp_path / "x" / "one.png")
    two = _png(tmp_path / "y" / "two.png")
    single = open_dataset(one)
    assert single.layout == "files" and single.name == "one"
    assert [s.path for s in single.train] == [one]
    both = open_files([two, one])
    assert both.layout == "files" and [s.path for s in both.train] == [one, two]
    assert both.root == tmp_path.resolve()
    assert open_dataset([one, two]).train == both.train
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    with pytest.raises(DatasetError, match="not an image file"):
        open_files([one, notes])
    with pytest.raises(DatasetError, match="not found"):
        open_files([tmp_path / "missing.png"])
    with pytest.raises(DatasetError, match="no image files"):
        open_files([])


def test_bad_roots(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no known dataset layout.*expected"):
        open_dataset(tmp_path / "docs")
    root = make_mvtec(tmp_path / "widget")
    with pytest.raises(DatasetError, match="holds categories widget: open one of them"):
        open_dataset(tmp_path)
    for path in (root / "train" / "good").glob("*.png"):
        path.unlink()
    with pytest.raises(DatasetError, match="train split is empty"):
        open_dataset(root)
    with pytest.raises(DatasetError, match="unknown layout"):
        open_dataset(root, layout="coco")
    with pytest.raises(DatasetError, match="not an MVTec AD 2"):
        open_dataset(root, layout="mvtec_ad2")


def test_explicit_layout_must_match(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="not an MVTec AD category"):
        open_dataset(tmp_path, layout="mvtec_ad")
    assert open_dataset(tmp_path, layout="files").layout == "files"


def test_corrupt_images_are_listed_not_decoded(tmp_path):
    root = make_mvtec(tmp_path / "widget")
    bad = root / "train" / "good" / "999.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    data = open_dataset(root)  # opening must not decode
    assert data.train[-1].path == bad
    with pytest.raises(ImageLoadError, match=r"999\.png"):
        load_image(bad)


def test_load_mask_shapes_and_formats(tmp_path):
    image = _png(tmp_path / "img.png", size=(12, 16))
    good = Sample(image, 0, "good")
    assert load_mask(good).shape == (12, 16) and not load_mask(good).any()
    assert load_mask(good, (5, 7)).shape == (5, 7)
    assert load_mask(Sample(image, 1, "crack")).shape == (12, 16)  # defect without a mask

    block = np.zeros((8, 8), dtype=np.uint8)
    block[:4, 4:] = 255  # top-right quadrant
    expected = np.zeros((8, 8), dtype=bool)
    expected[:4, 4:] = True
    variants = {
        "l8.png": Image.fromarray(block),
        "l16.png": Image.fromarray(block.astype(np.uint16) * 257),
        "one.png": Image.fromarray(block).convert("1"),
        "rgb.png": Image.fromarray(np.stack([block, 0 * block, 0 * block], -1)),
        "pal.png": Image.fromarray(block).convert("P"),
        "rgba.png": Image.fromarray(np.stack([block] * 3 + [np.full_like(block, 255)], -1)),
        "tif.tif": Image.fromarray(block),
    }
    for name, mask_image in variants.items():
        mask_image.save(tmp_path / name)
        sample = Sample(image, 1, "crack", tmp_path / name)
        assert load_mask(sample).dtype == bool
        np.testing.assert_array_equal(load_mask(sample), expected, err_msg=name)
        small = load_mask(sample, (2, 2))
        np.testing.assert_array_equal(small, [[False, True], [False, False]], err_msg=name)
        big = load_mask(sample, (16, 24))
        assert big.shape == (16, 24) and big.sum() == 8 * 12

    # Transparent pixels are background whatever colour they hold.
    rgba = np.full((4, 4, 4), 255, dtype=np.uint8)
    rgba[:, :2, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    alpha = load_mask(Sample(image, 1, "crack", tmp_path / "alpha.png"))
    assert alpha[:, 2:].all() and not alpha[:, :2].any()

    (tmp_path / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ImageLoadError, match=r"broken\.png"):
        load_mask(Sample(image, 1, "crack", tmp_path / "broken.png"))
    with pytest.raises(ImageLoadError, match=r"gone\.png"):
        load_mask(Sample(image, 1, "crack", tmp_path / "gone.png"))


def test_fingerprint(tmp_path):
    a = [_png(tmp_path / "a" / f"{i}.png", value=i) for i in range(3)]
    b = [_png(tmp_path / "b" / f"{i}.png", value=i) for i in range(3)]
    fp = dataset_fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert dataset_fingerprint(b) == fp  # a copy elsewhere has the same id
    assert dataset_fingerprint(list(reversed(a))) == fp
    assert dataset_fingerprint(a[:2]) != fp
    _png(b[1], value=200)
    assert dataset_fingerprint(b) != fp
    b[1].rename(tmp_path / "b" / "9.png")
    _png(b[1], value=1)  # same bytes as before, restored
    assert dataset_fingerprint(b) == fp
    with pytest.raises(DatasetError):
        dataset_fingerprint([])
    with pytest.raises(ImageLoadError):
        dataset_fingerprint([tmp_path / "missing.png"])


def test_fingerprint_is_fast(tmp_path):
    # 200 files the size of a 512x512 RGB PNG of a texture (~400 KB): hashing is I/O-bound.
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size=400_000, dtype=np.uint8).tobytes()
    paths = []
    for i in range(200):
        path = tmp_path / f"{i:03d}.png"
        path.write_bytes(payload[i:] + payload[:i])
        paths.append(path)
    start = time.perf_counter()
    dataset_fingerprint(paths)
    assert time.perf_counter() - start < 5.0


@pytest.mark.needs_shared
def test_real_bottle_counts(bottle_root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every bottle defect has its mask
        data = open_dataset(bottle_root)
    assert data.layout == "mvtec_ad" and data.name == "bottle"
    summary = data.summary()
    assert summary["train"]["total"] == 209
    assert summary["test"]["total"] == 83
    assert summary["test"]["good"] == 20
    assert summary["test"]["with_mask"] == 63
    assert summary["test"]["by_type"] == {
        "broken_large": 20,
        "broken_small": 22,
        "contamination": 21,
        "good": 20,
    }
    defect = next(s for s in data.test if s.defect_type == "broken_small")
    full = load_mask(defect)
    assert full.shape == (512, 512) and 0 < full.mean() < 0.2
    small = load_mask(defect, (64, 48))
    assert small.shape == (64, 48) and small.any()
    good = next(s for s in data.test if s.label == 0)
    assert not load_mask(good, (64, 64)).any()


@pytest.mark.needs_shared
def test_real_bottle_fingerprint_is_stable(bottle_root):
    paths = [s.path for s in open_dataset(bottle_root).train]
    assert dataset_fingerprint(paths) == dataset_fingerprint(list(reversed(paths)))
