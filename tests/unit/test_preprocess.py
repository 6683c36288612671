"""Preprocessor: resizing (stretch / pad), normalisation and mapping maps back to the original."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectscope.features.preprocess import ContentBox, Preprocessor, mirror_indices

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def grey(height: int, width: int, value: int) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def expected_grey(value: int) -> torch.Tensor:
    return (value / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)


# ------------------------------------------------------------------ construction


def test_constructor_normalises_types() -> None:
    pre = Preprocessor([64.0, 48.0], np.array(MEAN), list(STD))  # type: ignore[arg-type]
    assert pre.input_size == (64, 48)
    assert all(isinstance(v, int) for v in pre.input_size)
    assert pre.mean == MEAN and pre.std == STD
    assert pre.aspect == "stretch"


def test_bad_aspect() -> None:
    with pytest.raises(ValueError, match="aspect must be 'stretch' or 'pad', not 'crop'"):
        Preprocessor((64, 64), MEAN, STD, aspect="crop")


# -------------------------------------------------------------------- output


@pytest.mark.parametrize("aspect", ["stretch", "pad"])
def test_output_shape_and_dtype(aspect: str) -> None:
    pre = Preprocessor((48, 64), MEAN, STD, aspect)
    images = [grey(30, 50, 10), grey(100, 20, 200), grey(48, 64, 99)]
    batch = pre(images)
    assert batch.shape == (3, 3, 48, 64)
    assert batch.dtype == torch.float32
    assert torch.isfinite(batch).all()


def test_empty_batch() -> None:
    pre = Preprocessor((32, 32), MEAN, STD)
    with pytest.raises(ValueError, match="no images to preprocess"):
        pre([])
    with pytest.raises(ValueError, match="no images to preprocess"):
        pre.batch([])  # the loader threads' resized images, none of them readable


@pytest.mark.parametrize("value", [0, 37, 128, 255])
@pytest.mark.parametrize("size", [(32, 32), (50, 70), (17, 9)])
def test_uniform_grey_normalisation(value: int, size: tuple[int, int]) -> None:
    pre = Preprocessor((32, 32), MEAN, STD)
    batch = pre([grey(*size, value)])
    expected = expected_grey(value).view(3, 1, 1).expand(3, 32, 32)
    torch.testing.assert_close(batch[0], expected, atol=1e-5, rtol=0)


def test_same_size_is_not_resampled() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    pre = Preprocessor((32, 40), MEAN, STD)
    out = pre([image])[0]
    expected = (
        torch.from_numpy(image).permute(2, 0, 1).float() / 255.0 - torch.tensor(MEAN).view(3, 1, 1)
    ) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_resize_keeps_unit_range_and_layout() -> None:
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :20, 0] = 255  # left half red
    pre = Preprocessor((32, 32), MEAN, STD)
    resized = pre.resize(image)
    assert resized.shape == (3, 32, 32)
    assert resized.min() >= 0.0 and resized.max() <= 1.0
    assert resized[0, :, :14].min() > 0.99
    assert resized[0, :, 18:].max() < 0.01
    assert resized[1:].abs().max() < 1e-6


def test_normalize_on_batch() -> None:
    pre = Preprocessor((8, 8), (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    batch = torch.ones(2, 3, 8, 8)
    out = pre.normalize(batch)
    torch.testing.assert_close(out[:, 0], torch.full((2, 8, 8), 1.0))
    torch.testing.assert_close(out[:, 1], torch.full((2, 8, 8), 3.0))
    torch.testing.assert_close(out[:, 2], torch.full((2, 8, 8), 0.5))


def test_input_not_modified() -> None:
    image = grey(10, 20, 77)
    copy = image.copy()
    Preprocessor((32, 32), MEAN, STD, "pad")([image])
    np.testing.assert_array_equal(image, copy)


# --------------------------------------------------------------- content box


@pytest.mark.parametrize("shape", [(100, 200), (200, 100), (64, 64), (7, 300)])
def test_stretch_content_box_is_full(shape: tuple[int, int]) -> None:
    pre = Preprocessor((64, 96), MEAN, STD, "stretch")
    assert pre.content_box(*shape) == ContentBox(0, 0, 64, 96)


@pytest.mark.parametrize(
    ("shape", "box"),
    [
        ((100, 200), ContentBox(64, 0, 128, 256)),  # landscape: bars top and bottom
        ((200, 100), ContentBox(0, 64, 256, 128)),  # portrait: bars left and right
        ((50, 50), ContentBox(0, 0, 256, 256)),  # same aspect: no padding
        ((300, 100), ContentBox(0, 85, 256, 85)),  # 256/3 = 85.33 -> 85, (256-85)//2 = 85
        ((1, 1000), ContentBox(127, 0, 1, 256)),  # at least one pixel high: (256-1)//2
    ],
)
def test_pad_content_box(shape: tuple[int, int], box: ContentBox) -> None:
    pre = Preprocessor((256, 256), MEAN, STD, "pad")
    assert pre.content_box(*shape) == box


def test_pad_content_box_non_square_input() -> None:
    pre = Preprocessor((64, 128), MEAN, STD, "pad")
    assert pre.content_box(64, 64) == ContentBox(0, 32, 64, 64)
    assert pre.content_box(10, 80) == ContentBox(24, 0, 16, 128)  # scale 1.6


def test_content_box_is_frozen() -> None:
    box = ContentBox(1, 2, 3, 4)
    with pytest.raises(AttributeError):
        box.top = 5  # type: ignore[misc]


# ---------------------------------------------------------------------- padding


def test_padding_normalises_to_zero_portrait() -> None:
    pre = Preprocessor((64, 64), MEAN, STD, "pad", padding="mean")
    out = pre([grey(64, 32, 255)])[0]
    box = pre.content_box(64, 32)
    assert box == ContentBox(0, 16, 64, 32)
    assert (out[:, :, :16] == 0).all()
    assert (out[:, :, 48:] == 0).all()
    inside = out[:, :, 16:48]
    torch.testing.assert_close(
        inside, expected_grey(255).view(3, 1, 1).expand_as(inside), atol=1e-5, rtol=0
    )


def test_padding_normalises_to_zero_landscape() -> None:
    pre = Preprocessor((64, 64), MEAN, STD, "pad", padding="mean")
    out = pre([grey(20, 40, 0)])[0]
    box = pre.content_box(20, 40)
    assert box == ContentBox(16, 0, 32, 64)
    assert (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()
    torch.testing.assert_close(
        out[:, 16:48], expected_grey(0).view(3, 1, 1).expand(3, 32, 64), atol=1e-5, rtol=0
    )


def test_reflect_padding_mirrors_the_image_and_leaves_its_content_alone() -> None:
    image = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    reflect = Preprocessor((64, 64), MEAN, STD, "pad")
    mean = Preprocessor((64, 64), MEAN, STD, "pad", padding="mean")
    assert reflect.padding == "reflect"
    out, plain = reflect([image])[0], mean([image])[0]
    box = reflect.content_box(20, 40)
    assert box == ContentBox(16, 0, 32, 64)
    torch.testing.assert_close(out[:, 16:48], plain[:, 16:48])
    # Row 15 mirrors row 17 and row 48 mirrors row 46 (the edge row itself is not repeated).
    torch.testing.assert_close(out[:, 15], out[:, 17])
    torch.testing.assert_close(out[:, 48], out[:, 46])
    assert (out[:, :16] != 0).any()


def test_reflect_padding_wider_than_the_content_keeps_mirroring() -> None:
    # A 1-row strip (31 rows of padding above it, far more than its height), a 2-row and a
    # 3-column one: each must fill the canvas with its own values only.
    pre = Preprocessor((64, 64), MEAN, STD, "pad")
    for shape in ((1, 400), (2, 64), (64, 3)):
        image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
        out = pre([image])[0]
        box = pre.content_box(*shape)
        content = out[:, box.top : box.top + box.height, box.left : box.left + box.width]
        assert out.shape == (3, 64, 64)
        assert out.min() >= content.min() and out.max() <= content.max()


def test_mirror_indices() -> None:
    assert mirror_indices(3, 4, 12).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]
    assert mirror_indices(1, 2, 5).tolist() == [0] * 5
    assert mirror_indices(4, 0, 4).tolist() == [0, 1, 2, 3]


def test_unknown_padding_is_refused() -> None:
    with pytest.raises(ValueError, match="padding must be 'reflect' or 'mean', not 'zero'"):
        Preprocessor((64, 64), MEAN, STD, "pad", padding="zero")


def test_descriptions_without_padding_mean_the_mean_colour() -> None:
    data = Preprocessor((64, 64), MEAN, STD, "pad").to_dict()
    assert data["padding"] == "reflect"
    assert Preprocessor.from_dict(data).padding == "reflect"
    data.pop("padding")
    assert Preprocessor.from_dict(data).padding == "mean"


def test_stretch_has_no_padding() -> None:
    pre = Preprocessor((64, 64), MEAN, STD, "stretch")
    out = pre([grey(20, 40, 0)])[0]
    torch.testing.assert_close(
        out, expected_grey(0).view(3, 1, 1).expand(3, 64, 64), atol=1e-5, rtol=0
    )


def test_pad_same_aspect_has_no_padding() -> None:
    pre = Preprocessor((32, 64), MEAN, STD, "pad")
    out = pre([grey(16, 32, 255)])[0]
    torch.testing.assert_close(
        out, expected_grey(255).view(3, 1, 1).expand(3, 32, 64), atol=1e-5, rtol=0
    )


# ------------------------------------------------------------------ to_original


def test_to_original_stretch_restores_size() -> None:
    pre = Preprocessor((32, 32), MEAN, STD, "stretch")
    maps = torch.full((2, 32, 32), 3.5)
    out = pre.to_original(maps, (50, 70))
    assert out.shape == (2, 50, 70)
    torch.testing.assert_close(out, torch.full((2, 50, 70), 3.5))


def test_to_original_same_size_is_identity() -> None:
    pre = Preprocessor((32, 32), MEAN, STD, "stretch")
    maps = torch.randn(1, 32, 32)
    assert torch.equal(pre.to_original(maps, (32, 32)), maps)


def test_to_original_stretch_keeps_layout() -> None:
    pre = Preprocessor((32, 32), MEAN, STD, "stretch")
    maps = torch.zeros(1, 32, 32)
    maps[:, :, 16:] = 1.0  # right half hot
    out = pre.to_original(maps, (16, 64))[0]
    assert out[:, :30].max() < 1e-6
    assert out[:, 34:].min() > 1 - 1e-6


def test_to_original_pad_crops_the_padding_exactly() -> None:
    pre = Preprocessor((64, 64), MEAN, STD, "pad")
    box = pre.content_box(32, 64)
    assert box == ContentBox(16, 0, 32, 64)
    maps = torch.full((1, 64, 64), 1000.0)  # padding: a value that must not survive
    content = torch.arange(32 * 64, dtype=torch.float32).view(32, 64)
    maps[0, 16:48] = content
    out = pre.to_original(maps, (32, 64))
    assert out.shape == (1, 32, 64)
    assert torch.equal(out[0], content)


def test_to_original_pad_with_rescale() -> None:
    pre = Preprocessor((64, 64), MEAN, STD, "pad")
    box = pre.content_box(80, 40)  # portrait, scale 0.8 -> box 64 x 32 at left 16
    assert box == ContentBox(0, 16, 64, 32)
    maps = torch.full((2, 64, 64), -50.0)
    maps[0, :, 16:48] = 7.0
    maps[1, :32, 16:48] = 1.0  # top half of the content
    maps[1, 32:, 16:48] = 2.0  # bottom half
    out = pre.to_original(maps, (80, 40))
    assert out.shape == (2, 80, 40)
    torch.testing.assert_close(out[0], torch.full((80, 40), 7.0))
    assert out.min() >= 1.0 - 1e-5  # no padding value leaks in
    # Rows 39 and 40 straddle the boundary (source rows 31.1 and 31.9); the rest are pure.
    torch.testing.assert_close(out[1, :39], torch.ones(39, 40))
    torch.testing.assert_close(out[1, 41:], torch.full((39, 40), 2.0))


def test_round_trip_image_to_map_alignment() -> None:
    """A bright square in the original lands in the same place after resize + to_original."""
    pre = Preprocessor((64, 64), MEAN, STD, "pad")
    image = np.zeros((40, 100, 3), dtype=np.uint8)
    image[10:30, 60:80] = 255
    normalized = pre([image])[0]
    back = pre.to_original(normalized[0:1], (40, 100))[0]
    assert back.shape == (40, 100)
    bright = back > back.mean()
    ys, xs = torch.nonzero(bright, as_tuple=True)
    assert int(ys.min()) >= 8 and int(ys.max()) <= 31
    assert int(xs.min()) >= 58 and int(xs.max()) <= 81


# ---------------------------------------------------------------- serialisation


@pytest.mark.parametrize("aspect", ["stretch", "pad"])
def test_dict_round_trip(aspect: str) -> None:
    pre = Preprocessor((96, 128), MEAN, STD, aspect)
    data = pre.to_dict()
    assert data == {
        "input_size": [96, 128],
        "mean": list(MEAN),
        "std": list(STD),
        "aspect": aspect,
        "padding": "reflect",
    }
    again = Preprocessor.from_dict(data)
    assert again.to_dict() == data
    image = np.random.default_rng(1).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    assert torch.equal(pre([image]), again([image]))


def test_from_dict_default_aspect() -> None:
    pre = Preprocessor.from_dict({"input_size": [32, 32], "mean": MEAN, "std": STD})
    assert pre.aspect == "stretch"
    assert pre.input_size == (32, 32)
