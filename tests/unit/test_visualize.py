"""Colouring anomaly maps, overlays, mask images and PNG writing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectscope.detector.prediction import Prediction
from defectscope.prediction_writer import PredictionWriter
from defectscope.visualize import (
    color_range,
    colorize,
    mask_outline,
    mask_to_png_array,
    overlay,
    render_prediction,
    save_png,
    shrink,
)


def test_colorize_shape_dtype_and_fixed_scale():
    amap = np.linspace(0, 4, 20, dtype=np.float32).reshape(4, 5)
    rgb = colorize(amap, threshold=1.0)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    # default scale 0 .. 2 x threshold: everything at or above 2.0 gets the top colour
    top = colorize(np.array([[2.0, 3.0, 100.0]]), threshold=1.0)
    assert (top == top[0, 0]).all()
    # the same raw value looks the same in two images with different ranges
    a = colorize(np.array([[0.5, 0.0]]), threshold=1.0)
    b = colorize(np.array([[0.5, 1.9]]), threshold=1.0)
    assert (a[0, 0] == b[0, 0]).all()
    # explicit vmin/vmax win over the threshold
    assert (colorize(np.array([[1.0]]), 0.0, 1.0) == top[0, 0]).all()
    bottom = colorize(np.array([[0.0, -5.0]]), threshold=1.0)
    assert (bottom[0, 0] == bottom[0, 1]).all() and not (bottom[0, 0] == top[0, 0]).all()


def test_color_range_defaults():
    amap = np.array([[0.0, 3.0]])
    assert color_range(amap, threshold=2.0) == (0.0, 4.0)
    assert color_range(amap) == (0.0, 3.0)  # no threshold: the map's own maximum
    assert color_range(amap, vmin=1.0, vmax=2.0, threshold=5.0) == (1.0, 2.0)
    lo, hi = color_range(np.zeros((2, 2)))
    assert hi > lo


def test_colorize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="unknown colormap"):
        colorize(np.zeros((2, 2)), cmap="no-such-map")


def test_overlay_alpha_extremes_and_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    amap = rng.random((8, 10)).astype(np.float32)
    assert (overlay(image, amap, alpha=0.0, threshold=0.5) == image).all()
    assert (overlay(image, amap, alpha=1.0, threshold=0.5) == colorize(amap, threshold=0.5)).all()
    small_map = rng.random((4, 5)).astype(np.float32)
    out = overlay(image, small_map, alpha=0.5, threshold=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    gray = rng.integers(0, 256, (8, 10), dtype=np.uint8)
    assert overlay(gray, amap).shape == (8, 10, 3)


def test_overlay_draws_mask_outline():
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    out = overlay(image, np.zeros((20, 20), np.float32), alpha=0.0, mask=mask)
    assert (out[5, 10] == (0, 255, 0)).all()  # on the outline
    assert (out[10, 10] == 0).all()  # inside, untouched
    assert (out[0, 0] == 0).all()  # outside, untouched
    outline = mask_outline(mask)
    assert outline.sum() == 10 * 4 - 4
    # a mask at half resolution is scaled up to the image
    half = overlay(image, np.zeros((20, 20), np.float32), alpha=0.0, mask=mask[::2, ::2])
    assert (half[6, 10] == (0, 255, 0)).all()  # rows 6..15 after nearest upscaling
    assert (half[10, 10] == 0).all()


def test_overlay_rejects_bad_input():
    amap = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="uint8"):
        overlay(np.zeros((4, 4, 3), np.float32), amap)
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((4, 4, 3), np.uint8), amap, alpha=1.5)


def test_mask_to_png_array_and_save_png(tmp_path):
    mask = np.array([[True, False], [False, True]])
    png = mask_to_png_array(mask)
    assert png.dtype == np.uint8 and png.tolist() == [[255, 0], [0, 255]]
    assert mask_to_png_array(np.array([[0, 7]])).tolist() == [[0, 255]]

    path = save_png(png, tmp_path / "sub" / "mask.png")
    assert path.exists()
    assert np.array_equal(np.asarray(Image.open(path)), png)
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert np.array_equal(np.asarray(Image.open(save_png(rgb, tmp_path / "rgb.png"))), rgb)
    assert np.array_equal(np.asarray(Image.open(save_png(mask, tmp_path / "b.png"))), png)
    with pytest.raises(ValueError, match="uint8 or bool"):
        save_png(np.zeros((2, 2), np.float32), tmp_path / "f.png")
    with pytest.raises(ValueError, match="shape"):
        save_png(np.zeros((2, 2, 2), np.uint8), tmp_path / "x.png")


def _prediction(height: int = 40, width: int = 60, source: str | None = None) -> Prediction:
    amap = np.zeros((height, width), np.float32)
    amap[5:9, 7:12] = 3.0
    return Prediction(
        score=3.0,
        normalized_score=0.8,
        is_anomalous=True,
        threshold=1.0,
        anomaly_map=amap,
        mask=amap >= 2.0,
        pixel_threshold=2.0,
        source=source,
    )


def test_render_prediction_uses_the_stored_threshold_scale():
    prediction = _prediction()
    image = np.full((40, 60, 3), 128, np.uint8)
    pictures = render_prediction(prediction, image, 1.0)
    assert set(pictures) == {"heatmap", "overlay", "mask"}
    assert (pictures["heatmap"] == colorize(prediction.anomaly_map, threshold=1.0)).all()
    assert (pictures["mask"] == mask_to_png_array(prediction.mask)).all()
    expected = overlay(image, prediction.anomaly_map, threshold=1.0, mask=prediction.mask)
    assert (pictures["overlay"] == expected).all()
    # No image, no overlay; only what is asked for.
    assert set(render_prediction(prediction, None, 1.0)) == {"heatmap", "mask"}
    assert set(render_prediction(prediction, image, 1.0, pictures=("mask",))) == {"mask"}
    with pytest.raises(ValueError, match="unknown pictures"):
        render_prediction(prediction, image, 1.0, pictures=("contour",))


def test_render_prediction_shrinks_large_images_and_keeps_small_defects():
    prediction = _prediction(400, 600)
    prediction.mask[:] = False
    prediction.mask[3, 3] = True  # one pixel: must survive the shrinking
    pictures = render_prediction(
        prediction, np.zeros((400, 600, 3), np.uint8), 1.0, max_pixels=10_000
    )
    for array in pictures.values():
        assert array.shape[0] * array.shape[1] <= 10_000
    assert pictures["mask"].any()
    assert shrink(prediction.mask, 1) is prediction.mask


def test_prediction_writer_uses_the_image_it_is_given(tmp_path):
    image = np.zeros((40, 60, 3), np.uint8)
    paths = [tmp_path / "gone.png"]  # never written: the writer must not read it
    detector = type("Stub", (), {"threshold": 1.0})()
    with PredictionWriter(tmp_path / "out", paths, detector) as writer:
        writer.write(0, _prediction(source=str(paths[0])), image=image)
    files = {p.name for p in (tmp_path / "out" / "images").iterdir()}
    assert files == {"gone_heatmap.png", "gone_overlay.png", "gone_mask.png"}
    overlay_png = np.asarray(Image.open(tmp_path / "out" / "images" / "gone_overlay.png"))
    expected = render_prediction(_prediction(), image, 1.0)["overlay"]
    assert (overlay_png == expected).all()
