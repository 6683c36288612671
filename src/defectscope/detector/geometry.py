"""Image geometry from the training images' sizes: how a fit feeds them to the backbone.

A set whose aspect ratios differ is padded to keep each image undistorted, a set of one
elongated shape gets an input of the same shape and about the configured pixel count, and large
images get a larger input so that small defects stay a few patches wide.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from defectscope.config import DetectorConfig
from defectscope.data.io import ImageInput


def probe_size(source: ImageInput) -> tuple[int, int] | None:
    """(height, width) of an image without decoding its pixels; None if unreadable."""
    try:
        if isinstance(source, np.ndarray):
            return int(source.shape[0]), int(source.shape[1])
        if isinstance(source, Image.Image):
            return source.height, source.width
        if isinstance(source, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(source))) as image:
                return image.height, image.width
        if isinstance(source, (str, Path)):
            with Image.open(source) as image:
                return image.height, image.width
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return None


def shaped_input(area: int, ratio: float, multiple: int) -> tuple[int, int]:
    """(height, width) of about ``area`` pixels with width/height ``ratio``, both sides a
    multiple of ``multiple``."""
    return (
        max(multiple, round(math.sqrt(area / ratio) / multiple) * multiple),
        max(multiple, round(math.sqrt(area * ratio) / multiple) * multiple),
    )


def image_scales(sizes: Sequence[tuple[int, int]], height: float, width: float) -> np.ndarray:
    """Each image's scale when ``sizes`` are padded into a ``height`` x ``width`` canvas."""
    return np.array([min(height / h, width / w) for h, w in sizes])


def scale_spread(sizes: Sequence[tuple[int, int]], ratio: float) -> float:
    """How unevenly a padded canvas of width/height ``ratio`` shrinks ``sizes``: the 90th over
    the 10th percentile of each image's scale (rare outliers do not count)."""
    low, high = np.percentile(image_scales(sizes, 1.0, ratio), [10, 90])
    return float(high / low)


def median_scale(sizes: Sequence[tuple[int, int]], height: float, width: float) -> float:
    """The median image's scale when ``sizes`` are padded into a ``height`` x ``width`` canvas."""
    return float(np.median(image_scales(sizes, height, width)))


def canvas_ratio(sizes: Sequence[tuple[int, int]]) -> float:
    """Width/height of the padded canvas for images of ``sizes``: the box most of them fit in
    (95th percentile of widths over that of heights) if it shrinks them more evenly than a
    square does, or as evenly but far less, else 1. Scales a few times apart in one bank make
    the same surface look different, and a square shrinks a long image far more than a short
    one; long thin images of any length a square would feed as a sliver of its height."""
    box = float(np.percentile([w for _, w in sizes], 95)) / float(
        np.percentile([h for h, _ in sizes], 95)
    )
    if max(box, 1 / box) < 1.25:
        return 1.0
    box_spread, square_spread = scale_spread(sizes, box), scale_spread(sizes, 1.0)
    if box_spread <= 0.8 * square_spread:
        return box
    # Canvases of equal area: at least 1.5x the resolution for at most 1.25x the spread.
    sharper = median_scale(sizes, 1 / math.sqrt(box), math.sqrt(box)) >= 1.5 * median_scale(
        sizes, 1.0, 1.0
    )
    return box if sharper and box_spread <= 1.25 * square_spread else 1.0


def resolve_geometry(
    sizes: Sequence[tuple[int, int]], config: DetectorConfig, multiple: int = 32
) -> dict[str, Any]:
    """Settle ``features.aspect='auto'`` (and the input shape) from training image sizes."""
    features = config.features
    out: dict[str, Any] = {"aspect_requested": features.aspect}
    if features.aspect != "auto":
        return out
    sizes = [(h, w) for h, w in sizes if h > 0 and w > 0]
    ratios = [w / h for h, w in sizes]
    if not ratios:
        features.aspect = "stretch"
        out.update(aspect="stretch", reason="no readable size: stretch")
        return out
    spread = max(ratios) / min(ratios)
    out["aspect_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    reasons = []
    ratio = float(np.median(ratios))
    area = features.input_size[0] * features.input_size[1]
    if spread > 1.1:
        # Differently shaped images: stretching would distort each one differently.
        features.aspect = "pad"
        box = canvas_ratio(sizes)
        if box != 1.0:
            features.input_size = shaped_input(area, box, multiple)
            reasons.append(f"aspect ratios differ by {spread:.2f}x: pad into a {box:.2f}:1 box")
        else:
            reasons.append(f"aspect ratios differ by {spread:.2f}x: pad")
    else:
        features.aspect = "stretch"
        if max(ratio, 1 / ratio) >= 1.5:
            # One elongated shape: an input of that shape, about the configured pixel count.
            features.input_size = shaped_input(area, ratio, multiple)
            reasons.append(f"all images {ratio:.2f}:1, stretch to that shape")
        else:
            reasons.append("one shape, near square: stretch")
    # How much the configured input shrinks the median image: by its short side when
    # stretched, by its fit in the canvas when padded (a long image in a square is limited by
    # its length).
    if features.aspect == "pad":
        shrink = 1.0 / median_scale(sizes, *features.input_size)
    else:
        shrink = float(np.median([min(h, w) for h, w in sizes])) / min(features.input_size)
    # Large images: a larger input keeps small defects a few patches wide, graded by how much
    # the images would shrink (max_downscale); without it, only from 3x the input.
    if features.max_downscale is None:
        wanted = features.large_image_scale if shrink >= 3 else 1
    else:
        wanted = shrink / features.max_downscale
    factor = min(features.large_image_scale, wanted)
    height, width = (
        min(2048, round(side * factor / multiple) * multiple) for side in features.input_size
    )
    if min(height, width) > min(features.input_size):
        features.input_size = (height, width)
        reasons.append(
            f"large images (shrunk {shrink:.2f}x at the configured input): input x{factor:.2f}"
        )
    height, width = features.input_size
    out.update(aspect=features.aspect, input_size=[height, width])
    out["reason"] = "; ".join(reasons) + f"; input {height}x{width}"
    return out
