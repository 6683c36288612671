"""Reading images of any common format into one representation: RGB uint8 (H, W, 3).

Decoding is checked by content, not by extension; grayscale, RGBA, palette and 16-bit images
are converted; images over a pixel limit are refused before they are decoded.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectscope.errors import ImageLoadError

# 64 Mpx: far above any inspection camera, far below what would exhaust memory.
MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

ImageInput = str | Path | bytes | np.ndarray | Image.Image


def is_image_file(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return ``source`` as an RGB uint8 array of shape (H, W, 3).

    ``source`` may be a path, encoded bytes, a PIL image or an array (H, W), (H, W, 1|3|4) of
    uint8, uint16 or float in [0, 1].
    """
    if isinstance(source, np.ndarray):
        return to_rgb_uint8(source, name=None)
    if isinstance(source, Image.Image):
        return _from_pil(source, name=None, max_pixels=max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), name=None, max_pixels=max_pixels)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ImageLoadError(path, "file not found")
        if not path.is_file():
            raise ImageLoadError(path, "not a file")
        try:
            with path.open("rb") as handle:
                return _decode(handle, name=path, max_pixels=max_pixels)
        except OSError as exc:
            if isinstance(exc, ImageLoadError):
                raise
            raise ImageLoadError(path, f"cannot read file: {exc.strerror or exc}") from None
    raise ImageLoadError(None, f"unsupported image input of type {type(source).__name__}")


def _decode(handle: IO[bytes], name: Path | None, max_pixels: int) -> np.ndarray:
    # Our limit is checked on the header, before any pixel is decoded. PIL's own guard (an
    # error above twice its MAX_IMAGE_PIXELS) can only be relaxed globally, so it is raised
    # only when a caller explicitly allows more than PIL does.
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(handle)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    name, f"image is {width}x{height} pixels, over the limit of {max_pixels:,}"
                )
            image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageLoadError(name, f"image has {size}, over the limit of {max_pixels:,}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(name, "not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(name, f"corrupt or truncated image: {exc}") from None
    return _from_pil(image, name=name, max_pixels=max_pixels)


def _from_pil(image: Image.Image, name: Path | None, max_pixels: int) -> np.ndarray:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageLoadError(
            name, f"image is {width}x{height} pixels, over the limit of {max_pixels:,}"
        )
    if width < 1 or height < 1:
        raise ImageLoadError(name, "image has no pixels")
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return to_rgb_uint8(np.asarray(image), name=name)
    if mode == "F":
        return to_rgb_uint8(np.asarray(image, dtype=np.float32), name=name)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Flatten onto black so the backbone never sees undefined colour behind alpha.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    # np.array copies: the result is writable and independent of the PIL image.
    return np.array(image.convert("RGB"), dtype=np.uint8)


def to_rgb_uint8(array: np.ndarray, name: Path | None = None) -> np.ndarray:
    """Convert an array image of common shapes and dtypes to RGB uint8 (H, W, 3)."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ImageLoadError(name, f"unsupported image array shape {tuple(array.shape)}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageLoadError(name, "image has no pixels")
    if array.shape[-1] == 4:
        alpha = _scale_to_unit(array[..., 3:4], name)
        array = _scale_to_unit(array[..., :3], name) * alpha
    elif array.dtype != np.uint8:
        array = _scale_to_unit(array, name)
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def _scale_to_unit(array: np.ndarray, name: Path | None = None) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        # 32-bit integer images (PIL mode "I") usually hold 16-bit data.
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return np.clip(array.astype(np.float32) / top, 0.0, 1.0)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(name, "image contains NaN or infinite values")
        return np.clip(array.astype(np.float32), 0.0, 1.0)
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    raise ImageLoadError(name, f"unsupported image dtype {array.dtype}")


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageLoadError(folder, "folder not found")
    return sorted(p for p in folder.iterdir() if is_image_file(p))


def expand_image_paths(sources: Sequence[str | Path], recursive: bool = True) -> list[Path]:
    """Expand files and folders (recursively) into a sorted list of image paths."""
    paths: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            pattern = "**/*" if recursive else "*"
            paths.extend(sorted(p for p in source.glob(pattern) if is_image_file(p)))
        elif source.exists():
            paths.append(source)
        else:
            raise ImageLoadError(source, "file or folder not found")
    return paths
