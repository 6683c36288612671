"""Turning anomaly maps and masks into RGB images.

Colours are on a fixed scale, not per image: by default 0 is the bottom of the colormap and
twice the detector's threshold the top, so the same raw score has the same colour in every
image and a clean part looks dark instead of having its noise stretched to full range.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

DEFAULT_CMAP = "jet"
CONTOUR_COLOR = (0, 255, 0)


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


def save_png(array: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or a bool mask, as PNG.

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
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
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
