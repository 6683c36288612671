"""Deterministic transforms and augmented dataset copies (defectscope.data.augment)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from defectscope.data import augment as aug
from defectscope.data.augment import Augmentation, Op, spec_from_options
from defectscope.data.augmented_copy import write_augmented_dataset
from defectscope.data.datasets import load_mask, open_dataset
from defectscope.data.io import load_image
from defectscope.data.synthetic import make_synthetic_dataset
from defectscope.errors import ConfigError, DatasetError


def _image(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def _rotated_position(row: float, col: float, degrees: float, size: int) -> tuple[float, float]:
    # Counter-clockwise as displayed (rows grow downwards) about the pixel-grid centre.
    c = (size - 1) / 2
    t = np.deg2rad(degrees)
    new_col = c + (col - c) * np.cos(t) + (row - c) * np.sin(t)
    new_row = c - (col - c) * np.sin(t) + (row - c) * np.cos(t)
    return new_row, new_col


def test_rotate_90_matches_rot90_for_image_and_mask():
    image = _image()
    mask = np.zeros((32, 32), dtype=bool)
    mask[3:6, 20:25] = True
    np.testing.assert_array_equal(aug.rotate(image, 90), np.rot90(image))
    rotated = aug.rotate(mask, 90)
    assert rotated.dtype == bool
    np.testing.assert_array_equal(rotated, np.rot90(mask))


@pytest.mark.parametrize("degrees", [17.0, -33.0, 140.0])
def test_rotate_moves_a_marked_pixel_in_image_and_mask_together(degrees):
    size = 64
    image = np.full((size, size, 3), 40, dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    image[14:17, 40:43] = (255, 0, 0)  # a marked 3x3 block centred on (15, 41)
    mask[14:17, 40:43] = True
    spec = Augmentation.single("rotate", degrees=degrees)
    out, out_mask = spec.apply(image, mask)
    assert out_mask is not None and out_mask.dtype == bool and out_mask.any()
    red = (out[..., 0] > 150) & (out[..., 1] < 100)
    expected = _rotated_position(15, 41, degrees, size)
    for region in (out_mask, red):
        rows, cols = np.nonzero(region)
        assert abs(rows.mean() - expected[0]) < 1.0 and abs(cols.mean() - expected[1]) < 1.0
    # Where the mask is, the image shows the marker: the two moved consistently.
    assert red[out_mask].mean() > 0.6


def test_shift_moves_content_right_and_down():
    image = _image()
    out = aug.shift(image, dx=3, dy=-2, fill="constant")
    np.testing.assert_array_equal(out[0:30, 3:], image[2:32, :29])
    assert (out[:, :3] == 0).all() and (out[30:] == 0).all()
    mask = np.zeros((32, 32), dtype=bool)
    mask[10, 10] = True
    assert np.argwhere(aug.shift(mask, dx=3, dy=-2)).tolist() == [[8, 13]]
    with pytest.raises(ConfigError, match="fill"):
        aug.shift(image, dx=1, fill="mirror-ish")


def test_photometric_ops():
    image = _image()
    for op in (aug.brightness, aug.contrast, aug.saturation):
        np.testing.assert_array_equal(op(image, 1.0), image)
    assert (aug.brightness(image, 0.0) == 0).all()
    flat = aug.contrast(image, 0.0)
    assert flat.max() - flat.min() <= 1
    gray = aug.saturation(image, 0.0)
    assert (np.ptp(gray.astype(int), axis=-1) <= 1).all()
    np.testing.assert_array_equal(aug.hue(image, 0.0), image)
    red = np.zeros((2, 2, 3), dtype=np.uint8)
    red[..., 0] = 255
    np.testing.assert_allclose(aug.hue(red, 1 / 3)[0, 0], (0, 255, 0), atol=1)
    with pytest.raises(ValueError, match="hue"):
        aug.hue(image, 0.7)
    np.testing.assert_array_equal(aug.color_jitter(image), image)
    assert aug.gaussian_blur(image, 2.0).std() < image.std() * 0.6
    np.testing.assert_array_equal(aug.gaussian_blur(image, 0), image)
    with pytest.raises(ValueError, match="RGB uint8"):
        aug.brightness(image.astype(np.float32), 1.1)


def test_noise_is_seeded():
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    a, b = aug.gaussian_noise(image, 10, seed=1), aug.gaussian_noise(image, 10, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, aug.gaussian_noise(image, 10, seed=2))
    assert 7 < a.astype(float).std() < 13


def test_augmentation_is_deterministic_per_key_and_seed():
    spec = Augmentation(
        (
            Op("rotate", {"degrees": (-10, 10)}),
            Op("color_jitter", {"brightness": (0.8, 1.2), "hue": (-0.05, 0.05)}),
            Op("gaussian_noise", {"sigma": 5}),
        ),
        seed=3,
    )
    image = _image(24)
    first, _ = spec.apply(image, key="train/good/000.png")
    again, _ = spec.apply(image, key="train/good/000.png")
    np.testing.assert_array_equal(first, again)
    other, _ = spec.apply(image, key="train/good/001.png")
    reseeded, _ = spec.apply(image, key="train/good/000.png", seed=4)
    assert not np.array_equal(first, other) and not np.array_equal(first, reseeded)
    drawn = spec.sample("train/good/000.png")
    assert -10 <= drawn[0][1]["degrees"] <= 10 and drawn[2][1] == {"sigma": 5.0}


def test_spec_validation_and_round_trip():
    with pytest.raises(ConfigError, match="unknown augmentation"):
        Op("twirl", {})
    with pytest.raises(ConfigError, match="no parameter"):
        Op("rotate", {"angle": 3})
    with pytest.raises(ConfigError, match="needs degrees"):
        Op("rotate", {})
    with pytest.raises(ConfigError, match="range"):
        Op("rotate", {"degrees": (5, 1)})
    with pytest.raises(ConfigError, match="fill"):
        Augmentation((), fill="wobble")
    data = {"seed": 7, "fill": "edge", "ops": [{"name": "rotate", "degrees": [-5, 5]}]}
    spec = Augmentation.from_dict(data)
    assert spec.ops[0].params == {"degrees": (-5.0, 5.0)}
    assert Augmentation.from_dict(spec.to_dict()) == spec
    assert json.loads(json.dumps(spec.to_dict())) == {
        **data,
        "ops": [{"name": "rotate", "degrees": [-5.0, 5.0]}],
    }


def test_spec_from_options():
    fixed = spec_from_options(rotate=5, brightness=0.2, blur=1.0)
    assert [op.name for op in fixed.ops] == ["rotate", "color_jitter", "gaussian_blur"]
    assert fixed.ops[0].params == {"degrees": 5.0}
    assert fixed.ops[1].params == {"brightness": 1.2}
    ranged = spec_from_options(rotate=5, brightness=0.2, noise=4, random=True)
    assert ranged.ops[0].params == {"degrees": (-5.0, 5.0)}
    assert ranged.ops[1].params == {"brightness": (0.8, 1.2)}
    assert ranged.ops[2].params == {"sigma": (0.0, 4.0)}
    assert spec_from_options().ops == ()


@pytest.fixture()
def small_dataset(tmp_path):
    return make_synthetic_dataset(
        tmp_path / "src", n_train=3, n_test_good=1, n_test_defect=3, size=64, seed=1
    )


def test_write_augmented_dataset_geometric(small_dataset, tmp_path):
    spec = Augmentation.single("rotate", degrees=(-20, 20), seed=5)
    copy = write_augmented_dataset(small_dataset, tmp_path / "dst", spec)
    source = open_dataset(small_dataset)
    assert copy.layout == source.layout == "mvtec_ad"
    assert copy.summary()["test"] == source.summary()["test"]
    assert len(copy.train) == len(source.train)
    manifest = json.loads((tmp_path / "dst" / "augmentation.json").read_text())
    assert manifest["spec"] == spec.to_dict() and len(manifest["images"]) == 7
    for old, new in zip(source.test, copy.test, strict=True):
        key = old.path.relative_to(small_dataset).as_posix()
        expected_image, expected_mask = spec.apply(
            load_image(old.path), load_mask(old) if old.label else None, key=key
        )
        np.testing.assert_array_equal(load_image(new.path), expected_image)
        if old.label:
            assert new.mask_path is not None
            np.testing.assert_array_equal(load_mask(new), expected_mask)
            assert load_mask(new).any()
    # Same arguments, same bytes.
    again = write_augmented_dataset(small_dataset, tmp_path / "dst2", spec)
    for a, b in zip(copy.test, again.test, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()


def test_write_augmented_dataset_photometric_copies_masks(small_dataset, tmp_path):
    spec = spec_from_options(brightness=-0.3)
    copy = write_augmented_dataset(small_dataset, tmp_path / "dst", spec)
    source = open_dataset(small_dataset)
    for old, new in zip(source.test, copy.test, strict=True):
        assert load_image(new.path).mean() < load_image(old.path).mean()
        if old.mask_path:
            assert new.mask_path.read_bytes() == old.mask_path.read_bytes()


def test_write_augmented_dataset_refusals(small_dataset, tmp_path):
    spec = Augmentation.single("gaussian_blur", sigma=1)
    with pytest.raises(DatasetError, match="inside the source"):
        write_augmented_dataset(small_dataset, small_dataset / "aug", spec)
    with pytest.raises(DatasetError, match="contains the source"):
        write_augmented_dataset(small_dataset, tmp_path, spec)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        write_augmented_dataset(small_dataset, busy, spec)
    assert (busy / "keep.txt").exists()
    copy = write_augmented_dataset(small_dataset, busy, spec, overwrite=True)
    assert not (busy / "keep.txt").exists() and copy.layout == "mvtec_ad"
    assert not list(tmp_path.glob(".busy.partial-*"))


def test_write_augmented_files_layout(tmp_path):
    src = tmp_path / "shots"
    src.mkdir()
    for i in range(2):
        Image.fromarray(_image(16, seed=i)).save(src / f"{i}.png")
    copy = write_augmented_dataset(src / "0.png", tmp_path / "out", spec_from_options(rotate=90))
    assert copy.layout == "files" and [s.path.name for s in copy.train] == ["0.png"]
    np.testing.assert_array_equal(load_image(copy.train[0].path), np.rot90(_image(16, seed=0)))
