"""Auto mode: geometry from image sizes, candidates judged on synthetic defects, the choice
recorded in the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _auto import AUTO_CONFIG, BlindCandidate
from _images import FAST_CONFIG, texture_crops, with_defect

from defectscope.config import DetectorConfig
from defectscope.detector import selection
from defectscope.detector.detector import Detector
from defectscope.detector.geometry import probe_size, resolve_geometry, scale_spread
from defectscope.detector.selection import choose
from defectscope.features.preprocess import Preprocessor


# ----------------------------------------------------------------------------- geometry
def _config(**features) -> DetectorConfig:
    return DetectorConfig.from_dict({"features": features})


def test_differently_shaped_images_are_padded_not_stretched() -> None:
    config = _config(aspect="auto", input_size=[256, 256])
    out = resolve_geometry([(250, 122), (280, 599), (260, 400)], config)
    assert config.features.aspect == "pad"
    assert out["aspect"] == "pad" and "differ" in out["reason"]
    # The canvas has the shape of the box the images fit in (2.1:1 here), at about the
    # configured pixel count, so each image is shrunk by a similar factor.
    height, width = config.features.input_size
    assert height % 32 == 0 and width % 32 == 0
    assert 1.8 <= width / height <= 2.4
    assert 0.75 <= height * width / 256**2 <= 1.25
    assert "2.1" in out["reason"] or "2.0" in out["reason"]


def test_a_padded_canvas_shrinks_long_and_short_images_alike() -> None:
    sizes = [(250, 122), (280, 599), (260, 400), (270, 180), (255, 520)] * 4
    config = _config(aspect="auto", input_size=[256, 256])
    resolve_geometry(sizes, config)
    boxed = Preprocessor(config.features.input_size, (0, 0, 0), (1, 1, 1), "pad")
    square = Preprocessor((256, 256), (0, 0, 0), (1, 1, 1), "pad")

    def spread(preprocessor: Preprocessor) -> float:
        scales = [preprocessor.content_box(h, w).height / h for h, w in sizes]
        return max(scales) / min(scales)

    # Square: the 599 px wide strip is shrunk 2.3x, the 122 px one not at all.
    assert spread(square) > 2.0
    assert spread(boxed) < 1.3


def test_upright_strips_get_an_upright_canvas() -> None:
    sizes = [(122, 250), (599, 280), (400, 260), (180, 270), (520, 255)] * 4
    config = _config(aspect="auto", input_size=[256, 256])
    resolve_geometry(sizes, config)
    height, width = config.features.input_size
    assert 1.8 <= height / width <= 2.4


def test_a_few_panoramas_do_not_shrink_the_other_images() -> None:
    # 1 in 20 images is 10x wider: a box around them would feed the square ones at a tenth of
    # the canvas; the square canvas shrinks 19 of 20 alike, so it stays.
    sizes = [(1000, 1000)] * 19 + [(1000, 10000)]
    config = _config(aspect="auto", input_size=[256, 256])
    out = resolve_geometry(sizes * 3, config)
    assert config.features.aspect == "pad"
    assert config.features.input_size == (512, 512)
    assert "box" not in out["reason"]
    assert scale_spread(sizes, 1.0) == pytest.approx(1.0)


def test_portrait_and_landscape_mixed_keep_a_square_canvas() -> None:
    config = _config(aspect="auto", input_size=[256, 256], max_downscale=None)
    out = resolve_geometry([(300, 500), (500, 300), (400, 400)] * 3, config)
    assert config.features.aspect == "pad"
    assert config.features.input_size == (256, 256)
    assert "box" not in out["reason"]


def test_long_thin_images_of_varying_length_get_a_canvas_of_their_shape() -> None:
    # 40-90 px tall, 500-900 px long: a box spreads their scales about as much as a square
    # does, but a square would feed each as a strip a tenth of its height.
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(40, 91)), int(rng.integers(500, 901))) for _ in range(30)]
    config = _config(aspect="auto", input_size=[256, 256])
    out = resolve_geometry(sizes, config)
    height, width = config.features.input_size
    assert config.features.aspect == "pad" and "box" in out["reason"]
    assert width / height >= 6
    assert 0.75 <= height * width / 256**2 <= 1.25
    boxed = Preprocessor((height, width), (0, 0, 0), (1, 1, 1), "pad")
    square = Preprocessor((256, 256), (0, 0, 0), (1, 1, 1), "pad")
    median_h = float(np.median([h for h, _ in sizes]))

    def fed_height(preprocessor: Preprocessor) -> float:
        return float(np.median([preprocessor.content_box(h, w).height for h, w in sizes]))

    # The median image keeps most of its height in the box, about a third in a square.
    assert fed_height(boxed) >= 0.6 * median_h
    assert fed_height(square) <= 0.4 * median_h


def test_padded_images_limited_by_their_length_get_a_larger_input() -> None:
    # Short sides of 300 px, but a square canvas of 256 shrinks each 1500 px long side 5.9x:
    # the input grows as for 1500 px images, within large_image_scale.
    sizes = [(300, 1500), (1500, 300), (600, 600)] * 3
    config = _config(aspect="auto", input_size=[256, 256])
    out = resolve_geometry(sizes, config)
    assert config.features.aspect == "pad" and "box" not in out["reason"]
    assert config.features.input_size == (512, 512)
    assert "large images (shrunk 5.86x" in out["reason"]
    config = _config(aspect="auto", input_size=[256, 256], large_image_scale=1.0)
    resolve_geometry(sizes, config)
    assert config.features.input_size == (256, 256)


def test_one_elongated_shape_gets_an_input_of_that_shape() -> None:
    config = _config(aspect="auto", input_size=[256, 256])
    resolve_geometry([(200, 800)] * 5, config)
    height, width = config.features.input_size
    assert config.features.aspect == "stretch"
    assert height % 32 == 0 and width % 32 == 0
    assert 3.0 <= width / height <= 5.0
    # About the configured pixel count, so the cost stays what the user configured.
    assert 0.75 <= height * width / 256**2 <= 1.25


def test_large_images_get_a_larger_input_small_ones_do_not() -> None:
    config = _config(aspect="auto", input_size=[256, 256])
    out = resolve_geometry([(1024, 1024)] * 3, config)
    assert config.features.input_size == (512, 512)
    assert "large images" in out["reason"]
    config = _config(aspect="auto", input_size=[256, 256], large_image_scale=1.0)
    resolve_geometry([(1024, 1024)] * 3, config)
    assert config.features.input_size == (256, 256)
    # Without max_downscale, the 3x rule: 512 and 700 px images keep the configured input.
    for side in (512, 700):
        config = _config(aspect="auto", input_size=[256, 256], max_downscale=None)
        resolve_geometry([(side, side)] * 3, config)
        assert config.features.input_size == (256, 256)
    # By default graded: at most max_downscale (1.6) below the images' own size.
    config = _config(aspect="auto", input_size=[256, 256])
    assert config.features.max_downscale == 1.6
    resolve_geometry([(512, 512)] * 3, config)
    assert config.features.input_size == (320, 320)
    config = _config(aspect="auto", input_size=[256, 256])
    resolve_geometry([(1024, 1024)] * 3, config)
    assert config.features.input_size == (512, 512)
    # Images near the input's size are not enlarged.
    for side in (256, 320, 384):
        config = _config(aspect="auto", input_size=[256, 256])
        resolve_geometry([(side, side)] * 3, config)
        assert config.features.input_size == (256, 256)
    # An elongated shape keeps its shape when enlarged.
    config = _config(aspect="auto", input_size=[256, 256])
    resolve_geometry([(600, 2400)] * 3, config)
    height, width = config.features.input_size
    assert height > 128 and 3.5 <= width / height <= 4.5


def test_square_sets_and_explicit_aspects_are_kept() -> None:
    config = _config(aspect="auto", input_size=[256, 256])
    resolve_geometry([(300, 300), (290, 310)], config)
    assert config.features.aspect == "stretch" and config.features.input_size == (256, 256)
    explicit = _config(aspect="stretch", input_size=[128, 256])
    assert resolve_geometry([(250, 122), (280, 599)], explicit) == {"aspect_requested": "stretch"}
    assert explicit.features.aspect == "stretch" and explicit.features.input_size == (128, 256)


def test_probe_size_reads_headers_of_every_input_kind(tmp_path: Path) -> None:
    from _images import png
    from PIL import Image

    array = np.zeros((30, 50, 3), np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(png(array))
    assert probe_size(array) == (30, 50)
    assert probe_size(path) == (30, 50)
    assert probe_size(str(path)) == (30, 50)
    assert probe_size(png(array)) == (30, 50)
    assert probe_size(Image.fromarray(array)) == (30, 50)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert probe_size(bad) is None
    assert probe_size(tmp_path / "missing.png") is None


# ---------------------------------------------------------------------------- selection
def test_choose_prefers_the_earlier_candidate_unless_a_later_one_clearly_wins() -> None:
    assert selection.MARGIN == 0.01
    rows = [{"name": "a", "objective": 0.900}, {"name": "b", "objective": 0.902}]
    assert choose(rows)["name"] == "a"
    rows[1]["objective"] = 0.95
    assert choose(rows)["name"] == "b"


def test_a_candidate_that_separates_synthetic_defects_beats_a_blind_one(monkeypatch) -> None:
    # The blind candidate comes first, so it is the one kept unless the other clearly wins.
    blind = BlindCandidate("raw", "none", 1, "blind")
    monkeypatch.setitem(selection.CANDIDATES, "raw", blind)
    detector = Detector(AUTO_CONFIG)
    result = detector.prepare(texture_crops(16, seed=4))
    rows = {row["name"]: row for row in result.candidates}
    assert result.chosen == "l2"
    assert rows["raw"]["image_auroc"] <= 0.65
    assert rows["l2"]["image_auroc"] >= 0.75
    assert rows["l2"]["objective"] > rows["raw"]["objective"] + 0.15
    assert detector.config.features.normalize == "l2"
    assert result.n_holdout_images == 4 and result.n_defects == 12
    assert "l2 separates synthetic defects best" in result.reason


def test_the_choice_is_applied_and_recorded_in_the_saved_model(tmp_path: Path) -> None:
    images = texture_crops(16, seed=5)
    detector = Detector(AUTO_CONFIG).fit(images)
    chosen = detector.info.selection["chosen"]
    assert chosen in ("raw", "l2")
    expected = {"raw": "none", "l2": "l2"}[chosen]
    assert detector.config.features.normalize == expected
    assert detector.features.normalize == expected
    assert detector.info.timings["selection_s"] > 0
    detector.save(tmp_path)
    loaded = Detector.load(tmp_path)
    assert loaded.config.features.normalize == expected
    assert loaded.info.selection["chosen"] == chosen
    assert [r["name"] for r in loaded.info.selection["candidates"]] == ["raw", "l2"]
    # The loaded model scores exactly as the fitted one.
    a, b = detector.predict(images[:2]), loaded.predict(images[:2])
    assert [p.score for p in a] == pytest.approx([p.score for p in b], rel=1e-5)


def test_image_score_reductions_are_compared_on_the_same_maps_and_applied(
    tmp_path: Path,
) -> None:
    both = {**AUTO_CONFIG, "auto": {**AUTO_CONFIG["auto"], "reductions": ["max", "topk_mean"]}}
    images = texture_crops(16, seed=5)
    detector = Detector(both).fit(images)
    rows = detector.info.selection["candidates"]
    assert [r["name"] for r in rows] == ["raw", "raw+topk_mean", "l2", "l2+topk_mean"]
    # One scoring pass per feature candidate: the reductions share its maps and pixel AUROC.
    assert rows[0]["pixel_auroc"] == rows[1]["pixel_auroc"]
    assert rows[0]["image_auroc"] != rows[1]["image_auroc"]
    chosen = next(r for r in rows if r["name"] == detector.info.selection["chosen"])
    assert detector.config.scoring.reduction == chosen["reduction"]
    assert max(r["objective"] for r in rows) <= chosen["objective"] + selection.MARGIN
    detector.save(tmp_path)
    assert Detector.load(tmp_path).config.scoring.reduction == chosen["reduction"]


def test_reduce_maps_matches_the_scorer() -> None:
    maps = torch.rand(3, 40, 50)
    assert torch.equal(selection.reduce_maps(maps, "max", 0.01), maps.flatten(1).amax(1))
    top = selection.reduce_maps(maps, "topk_mean", 0.01)  # ceil(20 pixels)
    expected = maps.flatten(1).sort(dim=1, descending=True).values[:, :20].mean(1)
    assert torch.allclose(top, expected)


def test_too_few_images_or_auto_off_keep_the_configuration() -> None:
    few = Detector(AUTO_CONFIG).prepare(texture_crops(6))
    assert few.chosen is None and "fewer than auto.min_images" in few.reason
    off = Detector({**AUTO_CONFIG, "auto": {"enabled": False}})
    result = off.prepare(texture_crops(16))
    assert result.chosen is None and result.candidates == []
    assert off.config.features.normalize == DetectorConfig().features.normalize


def test_fit_cli_records_the_choice_and_inspect_shows_it(tmp_path: Path) -> None:
    from _images import png
    from typer.testing import CliRunner

    from defectscope.cli import app

    data = tmp_path / "part"
    for folder in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        (data / folder).mkdir(parents=True)
    for i, image in enumerate(texture_crops(14, seed=6)):
        (data / "train" / "good" / f"{i:03d}.png").write_bytes(png(image))
    for i, image in enumerate(texture_crops(4, seed=9)):
        if i < 2:
            (data / "test" / "good" / f"{i:03d}.png").write_bytes(png(image))
            continue
        bad, mask = with_defect(image, seed=i)
        (data / "test" / "spot" / f"{i:03d}.png").write_bytes(png(bad))
        mask_png = png(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2))
        (data / "ground_truth" / "spot" / f"{i:03d}_mask.png").write_bytes(mask_png)
    config = tmp_path / "config.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"detector": AUTO_CONFIG}))
    runner = CliRunner()
    model = tmp_path / "model"
    result = runner.invoke(app, ["fit", str(data), "--out", str(model), "--config", str(config)])
    assert result.exit_code == 0, result.output
    # The summary table wraps long cells: the reason is checked in full through inspect.
    assert "configuration" in result.output and "geometry" in result.output
    shown = runner.invoke(app, ["inspect", str(model)])
    assert shown.exit_code == 0
    meta = json.loads(shown.output)
    assert meta["selection"]["chosen"] in ("raw", "l2")
    assert {r["name"] for r in meta["selection"]["candidates"]} == {"raw", "l2"}
    assert meta["selection"]["reason"].startswith(meta["selection"]["chosen"])
    assert "objective" in meta["selection"]["reason"]
    report = tmp_path / "report"
    result = runner.invoke(app, ["evaluate", str(model), str(data), "--report", str(report)])
    assert result.exit_code == 0, result.output
    text = (report / "report.md").read_text()
    assert "How the configuration was chosen" in text
    assert f"{meta['selection']['chosen']}: " in text and "objective" in text
    if meta.get("edge_profile"):  # learned where the grid has inner patches to compare with
        assert "edge profile (from good images): outer rings' excess" in text

    fixed = tmp_path / "fixed"
    result = runner.invoke(
        app, ["fit", str(data), "--out", str(fixed), "--config", str(config), "--no-auto"]
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(runner.invoke(app, ["inspect", str(fixed)]).output)
    assert meta["selection"]["chosen"] is None
    assert meta["config"]["features"]["normalize"] == AUTO_CONFIG.get("features", {}).get(
        "normalize", DetectorConfig().features.normalize
    )


def test_fit_reuses_the_backbone_pass_of_auto_mode(monkeypatch) -> None:
    from defectscope.features.backbones import FeatureBackbone

    seen: list[int] = []
    real_forward = FeatureBackbone.forward

    def counting(self, images):  # type: ignore[no-untyped-def]
        seen.append(int(images.shape[0]))
        return real_forward(self, images)

    monkeypatch.setattr(FeatureBackbone, "forward", counting)
    images = texture_crops(16, seed=8)
    config = {**AUTO_CONFIG, "auto": {**AUTO_CONFIG["auto"], "bank_images": 400}}
    detector = Detector(config).fit(images)
    selection_info = detector.info.selection
    extra = selection_info["n_holdout_images"] + selection_info["n_defects"]
    # Every training image once, plus the held-out images and their synthetic defects, plus
    # every training image once more at half size (the half-size bank's own fit).
    assert sum(seen) == 2 * len(images) + extra
    # The same model as a fit whose features are computed again (auto off, same choice).
    fixed = {**AUTO_CONFIG, "auto": {"enabled": False}}
    fixed["features"] = {
        **FAST_CONFIG["features"],
        "normalize": detector.config.features.normalize,
    }
    again = Detector(fixed).fit(images)
    assert torch.allclose(again.memory_bank, detector.memory_bank, atol=1e-4)
    assert again.threshold == pytest.approx(detector.threshold, rel=1e-4)


def _strip_crops(shapes: list[tuple[int, int]], seed: int) -> list[np.ndarray]:
    from skimage import data as skdata

    texture = skdata.brick()
    rng = np.random.default_rng(seed)
    out = []
    for h, w in shapes:
        y = int(rng.integers(0, texture.shape[0] - h))
        x = int(rng.integers(0, texture.shape[1] - w))
        out.append(np.repeat(texture[y : y + h, x : x + w, None], 3, axis=2).copy())
    return out


def _blob(image: np.ndarray, cy: int, cx: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    out = image.copy()
    out[mask] = (220, 30, 30)
    return out, mask


@pytest.mark.parametrize(
    ("train_shapes", "test_shape", "expected_aspect"),
    [
        # Mixed shapes: padded, each image undistorted.
        ([(96, 160), (128, 200), (100, 240), (120, 130)] * 3, (110, 230), "pad"),
        # One elongated shape: an input of that shape.
        ([(64, 256)] * 12, (64, 256), "stretch"),
    ],
)
def test_maps_come_back_at_each_images_size_and_a_defect_lights_up_where_it_is(
    train_shapes, test_shape, expected_aspect
) -> None:
    config = {**FAST_CONFIG, "auto": {"enabled": False}}
    detector = Detector(config).fit(_strip_crops(train_shapes, seed=1))
    assert detector.config.features.aspect == expected_aspect
    assert detector.info.selection["geometry"]["aspect"] == expected_aspect
    if expected_aspect == "stretch":
        height, width = detector.config.features.input_size
        assert width / height >= 3  # the images' 4:1, not a 1:1 squeeze
    good = _strip_crops([test_shape], seed=2)[0]
    h, w = test_shape
    # Near the right end: padding or a wrong aspect would move or smear it.
    cy, cx, radius = h // 2, int(w * 0.8), max(6, h // 8)
    bad, mask = _blob(good, cy, cx, radius)
    result = detector.predict([bad, good])
    assert result[0].anomaly_map.shape == (h, w) and result[1].anomaly_map.shape == (h, w)
    amap = result[0].anomaly_map
    peak = np.unravel_index(int(np.argmax(amap)), amap.shape)
    assert abs(peak[0] - cy) <= radius + 8 and abs(peak[1] - cx) <= radius + 8, (peak, cy, cx)
    assert amap[mask].mean() > 1.5 * amap[~mask].mean()
    assert result[0].score > result[1].score


def test_a_refit_decides_the_geometry_afresh() -> None:
    config = {**FAST_CONFIG, "auto": {"enabled": False}}
    detector = Detector(config).fit(texture_crops(12, seed=3))
    assert detector.config.features.aspect == "stretch"
    detector.fit(_strip_crops([(96, 160), (128, 200), (100, 240)] * 4, seed=4))
    assert detector.config.features.aspect == "pad"
    detector.fit(texture_crops(12, seed=5))
    assert detector.config.features.aspect == "stretch"
