"""Turning anomaly maps and masks into RGB images.

Colours are on a fixed scale, not per image: by default 0 is the bottom of the colormap and
twice the detector's threshold the top, so the same raw score has the same colour in every
image and a clean part looks dark instead of having its noise stretched to full range.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from scipy import ndimage

if TYPE_CHECKING:
    from defectscope.detector.prediction import Prediction

DEFAULT_CMAP = "jet"
CONTOUR_COLOR = (0, 255, 0)
PICTURES = ("heatmap", "overlay", "mask")
# Rows shrunk per step: only one strip of the full-size array is ever copied.
STRIP_BLOCKS = 256


@lru_cache(maxsize=8)
def _lut(cmap: str) -> np.ndarray:
    # A 256-entry lookup table: indexing is much faster than calling matplotlib per image.
    from matplotlib import colormaps

    try:
        colormap = colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r}") from None
    table = colormap(np.linspace(0.0, 1.0, 256))[:, :3]
    return np.clip(np.rint(table * 255.0), 0, 255).astype(np.uint8)


def color_range(
    anomaly_map: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
) -> tuple[float, float]:
    """The (vmin, vmax) used to colour a map.

    ``vmin`` defaults to 0; ``vmax`` to ``2 * threshold`` when a threshold is known, otherwise
    to the map's own maximum (then colours are only comparable within one image).
    """
    lo = 0.0 if vmin is None else float(vmin)
    if vmax is not None:
        hi = float(vmax)
    elif threshold is not None and np.isfinite(threshold) and threshold > lo:
        hi = 2.0 * float(threshold)
    else:
        finite = np.asarray(anomaly_map)[np.isfinite(anomaly_map)]
        hi = float(finite.max()) if finite.size else lo + 1.0
    if not hi > lo:
        hi = lo + 1e-6
    return lo, hi


def colorize(
    anomaly_map: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    threshold: float | None = None,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """Colour a (H, W) anomaly map; returns RGB uint8 (H, W, 3). See ``color_range``."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W); got shape {amap.shape}")
    lo, hi = color_range(amap, vmin, vmax, threshold)
    scaled = (np.nan_to_num(amap, nan=lo) - lo) / (hi - lo)
    index = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    return _lut(cmap)[index]


def overlay(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: np.ndarray | None = None,
    *,
    threshold: float | None = None,
    cmap: str = DEFAULT_CMAP,
    contour_color: tuple[int, int, int] = CONTOUR_COLOR,
) -> np.ndarray:
    """Blend the coloured map over the image; draw ``mask``'s outline when given.

    The map and mask are resized to the image when their shapes differ. Returns RGB uint8.
    """
    image = _as_rgb_uint8(image_rgb)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    height, width = image.shape[:2]
    amap = resize_map(np.asarray(anomaly_map, dtype=np.float32), (height, width))
    heat = colorize(amap, vmin, vmax, threshold=threshold, cmap=cmap)
    blended = image.astype(np.float32) * (1.0 - alpha) + heat.astype(np.float32) * alpha
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    if mask is not None:
        outline = mask_outline(resize_mask(mask, (height, width)))
        out[outline] = np.asarray(contour_color, dtype=np.uint8)
    return out


def mask_outline(mask: np.ndarray, thickness: int | None = None) -> np.ndarray:
    """Boolean outline of a mask; thickness defaults to about 1 px per 256 px of image."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    if thickness is None:
        thickness = max(1, round(min(mask.shape) / 256))
    inner = ndimage.binary_erosion(mask, iterations=thickness, border_value=0)
    return mask & ~inner


def mask_to_png_array(mask: np.ndarray) -> np.ndarray:
    """Boolean (or nonzero) mask to a uint8 image: 255 for defect, 0 elsewhere."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W); got shape {mask.shape}")
    return np.where(mask.astype(bool), np.uint8(255), np.uint8(0))


def save_png(array: np.ndarray, path: str | Path, compress_level: int = 6) -> Path:
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or a bool mask, as PNG (zlib
    ``compress_level`` 0-9: lower is faster and larger).

    Parent folders are created. Returns the path.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = mask_to_png_array(array)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png needs uint8 or bool data; got {array.dtype}")
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"cannot save an array of shape {array.shape} as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array)).save(
        path, format="PNG", compress_level=compress_level
    )
    return path


def resize_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float map to (H, W)."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape == tuple(shape):
        return amap
    image = Image.fromarray(np.ascontiguousarray(amap))  # float32 -> mode "F"
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to (H, W)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise ValueError(f"image must be RGB (H, W, 3); got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8; got {image.dtype} (use data.io.load_image)")
    return image[..., :3]


def shrink_factor(height: int, width: int, max_pixels: int | None) -> int:
    """The smallest whole factor that brings an image to at most ``max_pixels`` (None: 1)."""
    if max_pixels is None:
        return 1
    factor = max(1, math.ceil(math.sqrt(height * width / max_pixels)))
    while math.ceil(height / factor) * math.ceil(width / factor) > max_pixels:
        factor += 1
    return factor


def shrink(array: np.ndarray, factor: int) -> np.ndarray:
    """Box-average an (H, W) float or (H, W, 3) uint8 array by ``factor``; a bool mask keeps a
    pixel where any pixel of its block is set, so a small defect never vanishes."""
    if factor == 1:
        return array
    rows = factor * STRIP_BLOCKS
    parts = []
    for top in range(0, array.shape[0], rows):
        strip = array[top : top + rows]
        if strip.dtype == np.bool_:
            parts.append(_any_pool(strip, factor))
        else:
            parts.append(np.asarray(Image.fromarray(np.ascontiguousarray(strip)).reduce(factor)))
    return np.concatenate(parts)


def _any_pool(mask: np.ndarray, factor: int) -> np.ndarray:
    height, width = mask.shape
    padded = np.zeros((-(-height // factor) * factor, -(-width // factor) * factor), bool)
    padded[:height, :width] = mask
    blocks = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return np.asarray(blocks.any(axis=(1, 3)))


def render_prediction(
    prediction: Prediction,
    image: np.ndarray | None,
    threshold: float,
    *,
    pictures: tuple[str, ...] = PICTURES,
    max_pixels: int | None = None,
) -> dict[str, np.ndarray]:
    """The heatmap, overlay and mask of one prediction as uint8 arrays, keyed by picture name.

    ``image`` is the decoded image the prediction was made from (no overlay without it).
    ``threshold`` is the model's stored image threshold, not a per-request override (which may
    be 0 or negative): one colour scale for every picture, see ``color_range``. With
    ``max_pixels``, pictures of a larger image are shrunk by a whole factor before colouring,
    which costs tens of bytes a pixel.
    """
    unknown = set(pictures) - set(PICTURES)
    if unknown:
        raise ValueError(f"unknown pictures {sorted(unknown)}; choose from {PICTURES}")
    height, width = prediction.anomaly_map.shape[:2]
    factor = shrink_factor(height, width, max_pixels)
    anomaly_map = shrink(prediction.anomaly_map.astype(np.float32, copy=False), factor)
    mask = shrink(prediction.mask, factor)
    lo, hi = color_range(anomaly_map, threshold=threshold)
    out: dict[str, np.ndarray] = {}
    if "heatmap" in pictures:
        out["heatmap"] = colorize(anomaly_map, vmin=lo, vmax=hi)
    if "overlay" in pictures and image is not None:
        out["overlay"] = overlay(shrink(image, factor), anomaly_map, vmin=lo, vmax=hi, mask=mask)
    if "mask" in pictures:
        out["mask"] = mask_to_png_array(mask)
    return out
