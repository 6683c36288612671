"""Image reading: every format and mode to RGB uint8, and clear errors naming the file."""

from __future__ import annotations

import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.io import (
    IMAGE_SUFFIXES,
    MAX_PIXELS,
    expand_image_paths,
    is_image_file,
    list_images,
    load_image,
    to_rgb_uint8,
)
from defectscope.errors import DefectscopeError, ImageLoadError

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)


def save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG (1-bit grayscale) whose header declares ``width`` x ``height`` pixels.

    Only the header is honest: the pixel data is a few bytes, so decoding it would fail with
    "truncated"; a loader that refuses by size must therefore do so before decoding.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _chunk(b"IEND", b"")
    )


def assert_rgb(array: np.ndarray, shape: tuple[int, int]) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (*shape, 3)
    assert array.flags.c_contiguous
    assert array.flags.writeable


# ------------------------------------------------------------------ file formats


@pytest.mark.parametrize(
    ("suffix", "kwargs"),
    [
        (".png", {}),
        (".bmp", {}),
        (".tif", {}),
        (".tiff", {"compression": "tiff_lzw"}),
        (".webp", {"lossless": True}),
    ],
)
def test_lossless_formats_round_trip(tmp_path: Path, suffix: str, kwargs: dict) -> None:
    path = save(Image.fromarray(RGB), tmp_path / f"img{suffix}", **kwargs)
    out = load_image(path)
    assert_rgb(out, RGB.shape[:2])
    np.testing.assert_array_equal(out, RGB)


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg"])
def test_jpeg(tmp_path: Path, suffix: str) -> None:
    smooth = np.zeros((16, 16, 3), dtype=np.uint8)
    smooth[..., 0] = 200
    smooth[..., 1] = np.arange(16, dtype=np.uint8)[None, :] * 4
    smooth[..., 2] = 50
    path = save(Image.fromarray(smooth), tmp_path / f"img{suffix}", quality=95)
    out = load_image(path)
    assert_rgb(out, (16, 16))
    assert np.abs(out.astype(int) - smooth.astype(int)).mean() < 4


def test_str_path_and_uppercase_suffix(tmp_path: Path) -> None:
    path = save(Image.fromarray(RGB), tmp_path / "IMG.PNG")
    np.testing.assert_array_equal(load_image(str(path)), RGB)


def test_decoding_by_content_not_extension(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(Image.fromarray(RGB), "PNG"))
    np.testing.assert_array_equal(load_image(path), RGB)


# ------------------------------------------------------------------------- modes


def test_grayscale_l(tmp_path: Path) -> None:
    gray = np.array([[0, 17, 255], [100, 200, 3]], dtype=np.uint8)
    out = load_image(save(Image.fromarray(gray, mode="L"), tmp_path / "g.png"))
    assert_rgb(out, (2, 3))
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_mode_1_bilevel(tmp_path: Path) -> None:
    image = Image.new("1", (3, 2), 0)
    image.putpixel((1, 0), 1)
    out = load_image(save(image, tmp_path / "b.png"))
    assert_rgb(out, (2, 3))
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 2].tolist() == [0, 0, 0]


def test_la_alpha_composited_on_black(tmp_path: Path) -> None:
    la = np.array([[[200, 255], [200, 0], [200, 128]]], dtype=np.uint8)
    out = load_image(save(Image.fromarray(la, mode="LA"), tmp_path / "la.png"))
    assert_rgb(out, (1, 3))
    assert out[0, 0].tolist() == [200, 200, 200]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert abs(int(out[0, 2, 0]) - round(200 * 128 / 255)) <= 1


def test_rgba_alpha_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array([[[10, 200, 30, 255], [250, 250, 250, 0], [100, 50, 200, 51]]], dtype=np.uint8)
    out = load_image(save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "a.png"))
    assert_rgb(out, (1, 3))
    assert out[0, 0].tolist() == [10, 200, 30]  # opaque keeps its colour
    assert out[0, 1].tolist() == [0, 0, 0]  # fully transparent becomes black
    expected = np.round(np.array([100, 50, 200]) * 51 / 255)
    assert np.abs(out[0, 2].astype(int) - expected).max() <= 1


def test_palette(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    out = load_image(save(image, tmp_path / "p.png"))
    assert out.tolist() == [[[255, 0, 0], [0, 255, 0]]]


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    path = save(image, tmp_path / "pt.png", transparency=0)
    assert "transparency" in Image.open(path).info
    out = load_image(path)
    assert out.tolist() == [[[0, 0, 0], [0, 255, 0]]]  # index 0 is transparent -> black


def test_16bit_grayscale_png(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 3, 257 * 100], [257 * 200, 65535, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    path = save(image, tmp_path / "g16.png")
    assert Image.open(path).mode == "I;16"
    out = load_image(path)
    assert_rgb(out, (2, 3))
    np.testing.assert_array_equal(out[..., 0], [[0, 3, 100], [200, 255, 1]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_float_tiff(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25, 1.0, 2.0, -1.0]], dtype=np.float32)
    path = save(Image.fromarray(values, mode="F"), tmp_path / "f.tif")
    out = load_image(path)
    assert out[..., 1].tolist() == [[0, 64, 255, 255, 0]]  # clipped to [0, 1]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), tmp_path / "c.jpg", quality=100)
    out = load_image(path)
    assert_rgb(out, (4, 4))
    assert out.min() >= 250  # no ink = white


# ------------------------------------------------------------------------ arrays


def test_uint8_rgb_array_is_copied_unchanged() -> None:
    out = load_image(RGB)
    np.testing.assert_array_equal(out, RGB)


def test_float_array_in_unit_range() -> None:
    out = load_image(np.array([[0.0, 0.5, 1.0, 1.5, -0.2]], dtype=np.float64))
    assert_rgb(out, (1, 5))
    assert out[..., 0].tolist() == [[0, 128, 255, 255, 0]]


def test_float32_rgb_array() -> None:
    out = load_image(RGB.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(out, RGB)


def test_uint16_array() -> None:
    out = load_image(np.array([[0, 257 * 7, 65535]], dtype=np.uint16))
    assert out[..., 2].tolist() == [[0, 7, 255]]


def test_single_channel_array() -> None:
    out = load_image(np.array([[[5], [6]]], dtype=np.uint8))
    assert out.tolist() == [[[5, 5, 5], [6, 6, 6]]]


def test_rgba_array() -> None:
    rgba = np.array([[[10, 20, 30, 255], [200, 200, 200, 0]]], dtype=np.uint8)
    assert load_image(rgba).tolist() == [[[10, 20, 30], [0, 0, 0]]]


def test_chw_array() -> None:
    chw = np.ascontiguousarray(np.moveaxis(RGB, -1, 0))
    assert chw.shape == (3, 6, 9)
    np.testing.assert_array_equal(load_image(chw), RGB)


def test_chw_single_channel_array() -> None:
    chw = np.arange(30, dtype=np.uint8).reshape(1, 5, 6) * 5
    out = load_image(chw)
    assert_rgb(out, (5, 6))
    np.testing.assert_array_equal(out[..., 1], chw[0])


def test_bool_array() -> None:
    assert load_image(np.array([[True, False]])).tolist() == [[[255, 255, 255], [0, 0, 0]]]


def test_to_rgb_uint8_non_contiguous_input() -> None:
    view = RGB[:, ::2]
    out = to_rgb_uint8(view)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, view)


# -------------------------------------------------------------- bytes and PIL


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_input(wrap: type) -> None:
    data = encode(Image.fromarray(RGB), "PNG")
    np.testing.assert_array_equal(load_image(wrap(data)), RGB)


def test_pil_input() -> None:
    np.testing.assert_array_equal(load_image(Image.fromarray(RGB)), RGB)
    rgba = Image.fromarray(np.array([[[1, 2, 3, 0], [4, 5, 6, 255]]], dtype=np.uint8), "RGBA")
    assert load_image(rgba).tolist() == [[[0, 0, 0], [4, 5, 6]]]


def test_pil_output_is_writable_copy() -> None:
    image = Image.fromarray(RGB)
    out = load_image(image)
    out[:] = 0
    assert np.asarray(image).max() > 0


# ------------------------------------------------------------------------ errors


def check_error(info: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    message = str(info.value)
    assert isinstance(info.value, DefectscopeError)
    assert path.name in message, message
    assert info.value.path == str(path)
    for word in words:
        assert word in message, message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "file not found")


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "folder.png"
    path.mkdir()
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "not a file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "not a readable image")


def test_truncated_png(tmp_path: Path) -> None:
    data = encode(Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "truncated")


def test_random_bytes_named_png(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(3).bytes(600))
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "not a readable image")


def test_text_named_jpg(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a jpeg at all\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "not a readable image")


def test_png_signature_only(tmp_path: Path) -> None:
    path = tmp_path / "sig.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file(tmp_path: Path) -> None:
    path = save(Image.fromarray(RGB), tmp_path / "locked.png")
    path.chmod(0)
    try:
        with pytest.raises(ImageLoadError) as info:
            load_image(path)
        check_error(info, path, "cannot read file")
    finally:
        path.chmod(0o644)


def test_corrupt_bytes_input_has_no_path() -> None:
    with pytest.raises(ImageLoadError, match="not a readable image") as info:
        load_image(b"garbage")
    assert info.value.path is None


@pytest.mark.parametrize(
    "array",
    [
        np.array([[np.nan, 0.5]]),
        np.array([[0.5, np.inf]], dtype=np.float32),
        np.full((2, 2, 3), -np.inf),
    ],
)
def test_non_finite_float_array(array: np.ndarray) -> None:
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        load_image(array)


def test_nan_float_tiff_error_names_file(tmp_path: Path) -> None:
    path = save(
        Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32), mode="F"), tmp_path / "n.tif"
    )
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    check_error(info, path, "NaN")


@pytest.mark.parametrize("shape", [(6, 7, 5), (6, 7, 2), (5,), (2, 3, 4, 3), (2, 5, 6)])
def test_wrong_array_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageLoadError, match="unsupported image array shape") as info:
        load_image(np.zeros(shape, dtype=np.uint8))
    assert str(shape) in str(info.value)


@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0), (0, 0, 1)])
def test_empty_array(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageLoadError, match="no pixels"):
        load_image(np.zeros(shape, dtype=np.uint8))


def test_unsupported_dtype() -> None:
    with pytest.raises(ImageLoadError, match="unsupported image dtype"):
        load_image(np.zeros((2, 2), dtype=np.complex64))


@pytest.mark.parametrize("source", [42, None, [1, 2, 3], 1.5])
def test_unsupported_input_type(source: object) -> None:
    with pytest.raises(ImageLoadError, match="unsupported image input of type") as info:
        load_image(source)  # type: ignore[arg-type]
    assert type(source).__name__ in str(info.value)


# ------------------------------------------------------------------- pixel limit


def test_max_pixels_on_file(tmp_path: Path) -> None:
    path = save(Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)), tmp_path / "small.png")
    assert load_image(path, max_pixels=120).shape == (10, 12, 3)  # exactly at the limit
    with pytest.raises(ImageLoadError) as info:
        load_image(path, max_pixels=119)
    check_error(info, path, "12x10 pixels", "over the limit of 119")


def test_max_pixels_on_bytes_and_pil() -> None:
    image = Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match="over the limit of 100"):
        load_image(encode(image, "PNG"), max_pixels=100)
    with pytest.raises(ImageLoadError, match="over the limit of 100"):
        load_image(image, max_pixels=100)


def test_default_limit_refuses_declared_size_without_decoding(tmp_path: Path) -> None:
    # 9000 x 9000 = 81 Mpx: over MAX_PIXELS (64 Mpx), under PIL's own bomb warning (~89 Mpx).
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(9000, 9000))
    assert path.stat().st_size < 200
    assert MAX_PIXELS < 9000 * 9000
    start = time.perf_counter()
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    check_error(info, path, "9000x9000 pixels", "over the limit of 64,000,000")


def test_huge_declared_png_is_refused_quickly(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_declaring(30000, 30000))
    start = time.perf_counter()
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    assert time.perf_counter() - start < 1.0
    check_error(info, path)
    message = str(info.value)
    assert "900,000,000 pixels" in message
    assert "truncated" not in message  # refused by size, not by trying to decode


def test_huge_declared_png_message_says_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    path.write_bytes(png_declaring(30000, 30000))
    with pytest.raises(ImageLoadError, match="900,000,000 pixels, over the limit of 64,000,000"):
        load_image(path)


def test_max_pixels_above_pil_limit_is_honoured() -> None:
    data = png_declaring(10000, 10000)  # pixel data truncated: decoding must fail, not the size
    with pytest.raises(ImageLoadError) as info:
        load_image(data, max_pixels=200_000_000)
    assert "decompression bomb" not in str(info.value)
    assert "truncated" in str(info.value)


# --------------------------------------------------------------- listing images


def make_tree(root: Path) -> None:
    png = encode(Image.fromarray(RGB), "PNG")
    (root / "sub" / "deeper").mkdir(parents=True)
    for name in ["b.png", "a.JPG", "c.bmp", "d.tiff", "e.webp", "z.tif", "f.jpeg"]:
        (root / name).write_bytes(png)
    (root / ".hidden.png").write_bytes(png)
    (root / "notes.txt").write_text("x")
    (root / "model.safetensors").write_bytes(b"x")
    (root / "noext").write_bytes(png)
    (root / "folder.png").mkdir()
    (root / "sub" / "s2.png").write_bytes(png)
    (root / "sub" / "s1.png").write_bytes(png)
    (root / "sub" / ".s0.png").write_bytes(png)
    (root / "sub" / "deeper" / "d.png").write_bytes(png)


def test_is_image_file(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert is_image_file(tmp_path / "b.png")
    assert is_image_file(tmp_path / "a.JPG")
    assert not is_image_file(tmp_path / ".hidden.png")
    assert not is_image_file(tmp_path / "notes.txt")
    assert not is_image_file(tmp_path / "folder.png")
    assert not is_image_file(tmp_path / "missing.png")
    assert set(IMAGE_SUFFIXES) >= {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def test_list_images_sorted_non_recursive(tmp_path: Path) -> None:
    make_tree(tmp_path)
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.JPG", "b.png", "c.bmp", "d.tiff", "e.webp", "f.jpeg", "z.tif"]
    assert all(p.parent == tmp_path for p in list_images(str(tmp_path)))


def test_list_images_empty_folder(tmp_path: Path) -> None:
    assert list_images(tmp_path) == []


def test_list_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match="folder not found") as info:
        list_images(tmp_path / "absent")
    assert "absent" in str(info.value)
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ImageLoadError, match="folder not found"):
        list_images(tmp_path / "file.png")


def test_expand_recursive(tmp_path: Path) -> None:
    make_tree(tmp_path)
    paths = expand_image_paths([tmp_path])
    relative = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert relative == sorted(relative)
    assert set(relative) == {
        "a.JPG",
        "b.png",
        "c.bmp",
        "d.tiff",
        "e.webp",
        "f.jpeg",
        "z.tif",
        "sub/s1.png",
        "sub/s2.png",
        "sub/deeper/d.png",
    }


def test_expand_not_recursive(tmp_path: Path) -> None:
    make_tree(tmp_path)
    assert expand_image_paths([tmp_path], recursive=False) == list_images(tmp_path)


def test_expand_keeps_source_order_and_explicit_files(tmp_path: Path) -> None:
    make_tree(tmp_path)
    explicit = tmp_path / "notes.txt"  # named explicitly: kept, loading will report it
    paths = expand_image_paths([tmp_path / "sub" / "deeper", explicit, str(tmp_path / "b.png")])
    assert paths == [tmp_path / "sub" / "deeper" / "d.png", explicit, tmp_path / "b.png"]
    assert expand_image_paths([]) == []


def test_expand_missing_path(tmp_path: Path) -> None:
    make_tree(tmp_path)
    with pytest.raises(ImageLoadError, match="file or folder not found") as info:
        expand_image_paths([tmp_path / "b.png", tmp_path / "ghost.png"])
    assert "ghost.png" in str(info.value)
