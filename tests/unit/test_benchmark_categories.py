"""benchmarks/categories.py: synthetic benchmark categories in the MVTec AD layout."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.datasets import image_size, load_mask, open_dataset

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "categories.py"


def _load():
    name = "benchmark_categories"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


cat = _load()
SCALE = 0.1


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("categories")
    cat.build_all(root, seed=0, names=["strips", "gear"], scale=SCALE)
    return root


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_categories_cover_the_failure_kinds() -> None:
    assert 6 <= len(cat.CATEGORIES) <= 9
    kinds = {spec.kind for spec in cat.CATEGORIES.values()}
    assert {"texture", "surface", "object"} <= kinds
    assert {True, False} == {spec.color for spec in cat.CATEGORIES.values()}
    for name, spec in cat.CATEGORIES.items():
        assert spec.name == name and spec.description and "\n" not in spec.description
        assert 1 <= len(spec.defects) <= 5
        assert set(spec.defects) == set(spec.defect_fns)
    assert set(cat.CATEGORIES["strips"].defects) == {"blowhole", "break", "crack", "fray", "uneven"}


@pytest.mark.parametrize("name", sorted(cat.CATEGORIES))
def test_masks_are_exactly_the_changed_pixels(name: str) -> None:
    spec = cat.CATEGORIES[name]
    for defect in spec.defects:
        sample = cat.make_sample(name, defect, 0, seed=3)
        assert sample.image.shape == sample.clean.shape
        assert sample.mask.shape == sample.image.shape[:2] and sample.mask.dtype == bool
        changed = sample.image != sample.clean
        if changed.ndim == 3:
            changed = changed.any(-1)
        np.testing.assert_array_equal(sample.mask, changed, err_msg=f"{name}/{defect}")
        assert sample.mask.sum() >= spec.min_area, f"{name}/{defect}"
        # Defects are local: never the whole image.
        assert sample.mask.mean() < 0.5, f"{name}/{defect}"
    good = cat.make_sample(name, "good", 0, seed=3)
    assert not good.mask.any() and good.image is good.clean


def test_low_contrast_defects_are_low_contrast() -> None:
    for name, defect in [
        ("coated_panel", "blotch"),
        ("coated_panel", "tint"),
        ("strips", "uneven"),
    ]:
        for i in range(3):
            s = cat.make_sample(name, defect, i)
            diff = np.abs(s.image.astype(int) - s.clean.astype(int))
            diff = diff.max(-1) if diff.ndim == 3 else diff
            assert 0.05 <= s.mask.mean() <= 0.35, (name, defect, i, s.mask.mean())
            assert diff[s.mask].mean() <= 9, (name, defect, i, diff[s.mask].mean())
            assert diff.max() <= 16, (name, defect, i, diff.max())


def test_layout_is_read_by_the_dataset_reader(built: Path) -> None:
    for name in ("strips", "gear"):
        spec = cat.CATEGORIES[name]
        counts = spec.counts(SCALE)
        dataset = open_dataset(built / name)
        assert dataset.layout == "mvtec_ad"
        assert len(dataset.train) == counts["train/good"]
        assert dataset.defect_types == sorted(spec.defects)
        summary = dataset.summary()["test"]
        assert summary["good"] == counts["test/good"]
        assert summary["defective"] == summary["with_mask"]
        for kind in spec.defects:
            assert summary["by_type"][kind] == counts[f"test/{kind}"]
        for sample in dataset.test:
            if sample.label == 0:
                continue
            raw = np.asarray(Image.open(sample.mask_path))
            assert raw.ndim == 2 and set(np.unique(raw)) <= {0, 255}
            mask = load_mask(sample)
            assert mask.shape == image_size(sample.path) and mask.any()
            # The files are what make_sample produces, so the exact-mask property carries over.
            index = int(sample.path.stem)
            expected = cat.make_sample(name, sample.defect_type, index, seed=0)
            np.testing.assert_array_equal(np.asarray(Image.open(sample.path)), expected.image)
            np.testing.assert_array_equal(mask, expected.mask)


def test_good_test_images_are_not_copies_of_training_images(built: Path) -> None:
    for name in ("strips", "gear"):
        train = [
            np.asarray(Image.open(p), np.float32)
            for p in sorted((built / name / "train" / "good").glob("*.png"))
        ]
        for path in sorted((built / name / "test" / "good").glob("*.png")):
            image = np.asarray(Image.open(path), np.float32)
            for other in train:
                if other.shape == image.shape:
                    assert np.abs(other - image).mean() > 1.0, path


def test_strips_have_varying_non_square_sizes(built: Path) -> None:
    sizes = {
        image_size(p) for p in (built / "strips").rglob("*.png") if "ground_truth" not in p.parts
    }
    assert len(sizes) >= 10
    heights = [h for h, _ in sizes]
    widths = [w for _, w in sizes]
    assert all(h != w for h, w in sizes)
    assert min(heights) >= 250 and max(heights) <= 280
    assert 120 <= min(widths) < 250 and 400 < max(widths) <= 600


def test_deterministic_for_a_seed(built: Path, tmp_path: Path) -> None:
    again = cat.build_category("strips", tmp_path / "a", seed=0, scale=SCALE)
    assert _pngs(again) == _pngs(built / "strips")
    other = cat.build_category("strips", tmp_path / "b", seed=1, scale=SCALE)
    assert _pngs(other).keys() == _pngs(again).keys()
    assert _pngs(other) != _pngs(again)


def test_build_is_idempotent_and_rebuilds_on_change(tmp_path: Path) -> None:
    path = cat.build_category("gear", tmp_path, seed=0, scale=0.02)
    stamp = cat.read_stamp(path)
    assert stamp["version"] == cat.VERSION and stamp["seed"] == 0
    first = path / "train" / "good" / "000.png"
    mtime = first.stat().st_mtime_ns
    assert cat.build_category("gear", tmp_path, seed=0, scale=0.02) == path
    assert first.stat().st_mtime_ns == mtime
    cat.build_category("gear", tmp_path, seed=2, scale=0.02)
    assert cat.read_stamp(path)["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["gear"]  # no temporary folder left

    foreign = tmp_path / "brick"
    (foreign / "train").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        cat.build_category("brick", tmp_path)
    with pytest.raises(ValueError, match="unknown category"):
        cat.build_category("bottle", tmp_path)


def test_command_line_prints_a_summary(tmp_path: Path, capsys) -> None:
    assert cat.main([str(tmp_path), "--names", "strips", "--scale", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "strips" in out and "blowhole" in out and "sizes" in out
    assert (tmp_path / "strips" / "ground_truth" / "uneven" / "000_mask.png").is_file()


def test_known_defects_are_drawn_in_turn_from_each_type_and_reproducibly() -> None:
    from defectscope.data.datasets import Sample

    spec = importlib.util.spec_from_file_location("benchmark_suite", _PATH.with_name("suite.py"))
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    test = [Sample(Path(f"good/{i}.png"), 0, "good") for i in range(4)]
    test += [Sample(Path(f"crack/{i}.png"), 1, "crack") for i in range(5)]
    test += [Sample(Path(f"hole/{i}.png"), 1, "hole") for i in range(2)]
    drawn = suite.draw_known_defects(list(test), 5, seed=0)
    assert [s.defect_type for s in drawn] == ["crack", "hole", "crack", "hole", "crack"]
    assert len(set(drawn)) == 5 and all(s.label == 1 for s in drawn)
    assert suite.draw_known_defects(list(test), 5, seed=0) == drawn
    assert suite.draw_known_defects(list(test), 5, seed=1) != drawn
    assert len(suite.draw_known_defects(list(test), 50)) == 7  # never more than there are


def test_known_draws_summary_averages_each_draw_and_names_the_largest_loss() -> None:
    spec = importlib.util.spec_from_file_location(
        "benchmark_known_draws", _PATH.with_name("known_draws.py")
    )
    draws = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(draws)

    def draw(seed: int, default: float, known: float, pixel: float | None) -> dict:
        return {
            "seed": seed,
            "choice": "l2",
            "default": {"image_auroc": default, "pixel_auroc": pixel, "aupro": pixel},
            "known_defects": {"image_auroc": known, "pixel_auroc": pixel, "aupro": pixel},
        }

    rows = {
        "a": {"default_choice": "raw", "draws": [draw(0, 0.9, 1.0, 0.8), draw(1, 0.9, 0.7, 0.8)]},
        "b": {"default_choice": "l2", "draws": [draw(0, 0.8, 0.8, None), draw(1, 0.6, 0.9, None)]},
    }
    summary = draws.summarize(rows, 2)
    first = summary["per_draw"][0]
    assert first["default"]["image_auroc"]["mean"] == pytest.approx(0.85)
    assert first["known_defects"]["image_auroc"]["worst"] == {"category": "b", "value": 0.8}
    # A metric a category lacks (no masks) is averaged over the others.
    assert first["default"]["pixel_auroc"]["mean"] == pytest.approx(0.8)
    assert summary["mean_over_draws"]["default"]["image_auroc"] == pytest.approx(0.8)
    assert summary["mean_over_draws"]["known_defects"]["image_auroc"] == pytest.approx(0.85)
    assert summary["largest_loss"]["image_auroc"] == {"loss": 0.2, "category": "a", "seed": 1}
    assert "| a | raw |" in draws.markdown(rows, 2)


def test_two_scales_summary_takes_the_worst_of_each_metric_its_own_way() -> None:
    spec = importlib.util.spec_from_file_location(
        "benchmark_two_scales", _PATH.with_name("two_scales.py")
    )
    scales = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scales)

    def row(image: float, alarms: float, pixel: float | None) -> dict:
        entry = {"image_auroc": image, "recall": 0.5, "false_alarm_rate": alarms}
        if pixel is not None:
            entry.update(pixel_auroc=pixel, aupro=pixel)
        return {"weights": {"0.5": entry}}

    rows = {"a": row(0.9, 0.0, 0.8), "b": row(0.7, 0.1, None), "c": row(1.0, 0.04, 0.6)}
    summary = scales.summarize(rows, "0.5")
    assert summary["image_auroc"]["mean"] == pytest.approx(0.8667, abs=1e-4)
    assert summary["image_auroc"]["worst_category"] == "b"
    # False alarms: the worst is the highest; a metric a category lacks is left out.
    assert summary["false_alarm_rate"]["worst_category"] == "b"
    assert summary["pixel_auroc"] == {"mean": 0.7, "worst": 0.6, "worst_category": "c"}
    # The scaled input: a share of each side, a multiple of the stride, never below 64.
    assert scales.scaled_input((320, 320)) == (160, 160)
    assert scales.scaled_input((192, 384)) == (96, 192)
    assert scales.scaled_input((96, 100)) == (64, 64)
    assert scales.scaled_input((640, 640), factor=0.25) == (160, 160)


def test_seed_spread_takes_mean_and_worst_per_seed_over_shared_categories(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "benchmark_seed_spread", _PATH.with_name("seed_spread.py")
    )
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)

    def entry(image: float, alarms: float) -> dict:
        return {"image_auroc": image, "false_alarm_rate": alarms, "selection": "l2"}

    # Seed 0 also holds a category the other seed lacks: it is left out of both.
    seed0 = {"a": entry(0.9, 0.0), "b": entry(0.7, 0.04), "only0": entry(0.1, 0.5)}
    seed1 = {"a": entry(1.0, 0.02), "b": entry(0.8, 0.0)}
    files = []
    for number, run in enumerate((seed0, seed1)):
        path = tmp_path / f"s{number}.json"
        path.write_text(json.dumps({"categories": run}))
        files.append(str(path))
    out = tmp_path / "spread.json"
    assert spread.main(["--run", "x=" + ",".join(files), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())["x"]
    assert set(summary["categories"]) == {"a", "b"}
    first, second = summary["per_seed"]
    assert first["image_auroc"] == {"mean": 0.8, "worst": 0.7, "worst_category": "b"}
    # False alarms: the worst is the highest.
    assert second["false_alarm_rate"]["worst_category"] == "a"
    over = summary["over_seeds"]["image_auroc"]
    assert over == {"mean": 0.85, "worst": 0.75, "lowest_worst": 0.7}
    with pytest.raises(SystemExit):
        spread.main(["--run", "no-files"])


def test_wire_images_are_long_thin_and_vary_in_size() -> None:
    sizes = {cat.make_sample("wire", "good", i, split="train").image.shape for i in range(8)}
    assert len(sizes) >= 6
    for height, width in sizes:
        assert 40 <= height <= 96 and 480 <= width <= 960
        assert width / height >= 5
