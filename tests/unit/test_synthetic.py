"""The synthetic demo dataset (defectscope.data.synthetic)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from skimage import data as skdata

from defectscope.data.datasets import load_mask, open_dataset
from defectscope.data.io import load_image
from defectscope.data.synthetic import DEFECT_TYPES, TEXTURES, make_synthetic_dataset, render
from defectscope.errors import DatasetError


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_textures_are_bundled_with_scikit_image():
    # No network: these load from scikit-image's own package data.
    for name in TEXTURES:
        texture = getattr(skdata, name)()
        assert texture.ndim == 2 and min(texture.shape) >= 256


@pytest.mark.parametrize("texture", sorted(TEXTURES))
@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_change_exactly_the_mask(texture, defect):
    for seed in range(3):
        sample = render(texture, defect, size=256, seed=[seed, 7])
        changed = (sample.image != sample.clean).any(axis=-1)
        np.testing.assert_array_equal(changed, sample.mask)
        assert 0.002 <= sample.mask.mean() <= 0.05, sample.mask.mean()
        # Clearly visible: a strong mean change over the defect, not a faint tint.
        diff = np.abs(sample.image.astype(int) - sample.clean.astype(int))[sample.mask]
        assert diff.max(axis=-1).mean() > 30


def test_render_good_and_errors():
    good = render("grass", None, size=128, seed=1)
    assert good.image.shape == (128, 128, 3) and good.image.dtype == np.uint8
    assert not good.mask.any() and good.defect_type == "good"
    assert render("gravel", "spot", size=600, seed=0).image.shape == (600, 600, 3)
    with pytest.raises(DatasetError, match="texture"):
        render("marble", None)
    with pytest.raises(DatasetError, match="defect type"):
        render("brick", "dent")
    with pytest.raises(DatasetError, match="size"):
        render("brick", None, size=32)


def test_dataset_layout_and_consistency(tmp_path):
    root = make_synthetic_dataset(
        tmp_path / "brick", n_train=4, n_test_good=2, n_test_defect=4, size=96, seed=3
    )
    data = open_dataset(root)
    assert data.layout == "mvtec_ad" and data.name == "brick"
    summary = data.summary()
    assert summary["train"]["total"] == 4
    assert summary["test"]["by_type"] == {"good": 2, "patch": 1, "scratch": 2, "spot": 1}
    assert summary["test"]["with_mask"] == 4
    manifest = json.loads((root / "synthetic.json").read_text())
    for sample in data.test:
        key = sample.path.relative_to(root).as_posix()
        entry = manifest["images"][key]
        expected = render("brick", sample.defect_type, size=96, seed=entry["seed"])
        image = load_image(sample.path)
        np.testing.assert_array_equal(image, expected.image)
        mask = load_mask(sample)
        np.testing.assert_array_equal(mask, expected.mask)
        # Outside the mask the file is the clean image, inside every pixel differs.
        assert (image[~mask] == expected.clean[~mask]).all()
        assert (image[mask] != expected.clean[mask]).any(axis=-1).all()
        if sample.label:
            assert entry["defect_area"] == pytest.approx(mask.mean(), abs=1e-5)


def test_same_arguments_same_bytes(tmp_path):
    kwargs = {"n_train": 3, "n_test_good": 1, "n_test_defect": 3, "size": 64, "seed": 11}
    a = make_synthetic_dataset(tmp_path / "a", texture="gravel", **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", texture="gravel", **kwargs)
    assert _files(a) == _files(b)
    c = make_synthetic_dataset(tmp_path / "c", texture="gravel", **{**kwargs, "seed": 12})
    assert _files(a)["train/good/000.png"] != _files(c)["train/good/000.png"]


def test_output_folder_rules(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "other.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty"):
        make_synthetic_dataset(out, n_train=2, n_test_good=0, n_test_defect=0, size=64)
    make_synthetic_dataset(out, n_train=2, n_test_good=0, n_test_defect=1, size=64, overwrite=True)
    make_synthetic_dataset(out, n_train=1, n_test_good=0, n_test_defect=0, size=64, overwrite=True)
    assert (out / "other.txt").read_text() == "keep"
    assert sorted(p.name for p in (out / "train" / "good").iterdir()) == ["000.png"]
    assert not (out / "ground_truth").exists()
    with pytest.raises(DatasetError, match="texture"):
        make_synthetic_dataset(tmp_path / "x", texture="marble")
    with pytest.raises(DatasetError, match="defect types"):
        make_synthetic_dataset(tmp_path / "x", defect_types=("dent",))


def test_defaults_write_a_small_quick_dataset(tmp_path):
    root = make_synthetic_dataset(tmp_path / "demo")
    summary = open_dataset(root).summary()
    assert summary["train"]["total"] == 30
    assert summary["test"]["good"] == 10 and summary["test"]["defective"] == 15
    assert load_image(next((root / "train" / "good").iterdir())).shape == (256, 256, 3)
