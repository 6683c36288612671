"""Heatmap, overlay and mask PNGs for API answers, rendered at a bounded resolution.

Colouring and blending cost tens of bytes per pixel; at full resolution a 60 Mpx upload would
need gigabytes. Maps and masks still come from `Detector.predict` at the image's own size; a
picture of a larger image is shrunk by a whole factor first (the answer's ``width`` and
``height`` stay the image's, so a client scales the picture back up by the same ratio).
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from defectscope.detector.prediction import Prediction
from defectscope.visualize import colorize, mask_to_png_array, overlay

# Rows shrunk per step: only one strip of the full-size array is ever copied.
STRIP_BLOCKS = 256


@dataclass
class RenderFlags:
    threshold: float | None
    heatmap: bool
    overlay: bool
    mask: bool

    @property
    def any(self) -> bool:
        return self.heatmap or self.overlay or self.mask


def shrink_factor(height: int, width: int, max_pixels: int) -> int:
    """The smallest whole factor that brings an image to at most ``max_pixels``."""
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


def png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render(
    image: np.ndarray,
    prediction: Prediction,
    flags: RenderFlags,
    stored_threshold: float,
    max_pixels: int,
) -> dict[str, str]:
    """The requested pictures as base64 PNGs, at most ``max_pixels`` each."""
    # Same fixed colour scale as the CLI's files: 0 .. twice the model's stored threshold (not a
    # per-request override, which may be 0 or negative and would make the scale meaningless).
    vmax = 2.0 * stored_threshold
    factor = shrink_factor(image.shape[0], image.shape[1], max_pixels)
    anomaly_map = shrink(prediction.anomaly_map.astype(np.float32, copy=False), factor)
    mask = shrink(prediction.mask, factor)
    out = {}
    if flags.heatmap:
        out["heatmap_png"] = png_base64(colorize(anomaly_map, vmin=0.0, vmax=vmax))
    if flags.overlay:
        small = shrink(image, factor)
        out["overlay_png"] = png_base64(overlay(small, anomaly_map, vmin=0.0, vmax=vmax, mask=mask))
    if flags.mask:
        out["mask_png"] = png_base64(mask_to_png_array(mask))
    return out
