"""Heatmap, overlay and mask PNGs for API answers, rendered at a bounded resolution.

Colouring and blending cost tens of bytes per pixel; at full resolution a 60 Mpx upload would
need gigabytes. Maps and masks still come from `Detector.predict` at the image's own size; a
picture of a larger image is shrunk by a whole factor first (the answer's ``width`` and
``height`` stay the image's, so a client scales the picture back up by the same ratio). The
pictures themselves are `visualize.render_prediction`'s, the same as the CLI writes to files.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from defectscope.detector.prediction import Prediction
from defectscope.visualize import render_prediction


@dataclass
class RenderFlags:
    threshold: float | None
    heatmap: bool
    overlay: bool
    mask: bool

    @property
    def pictures(self) -> tuple[str, ...]:
        wanted = {"heatmap": self.heatmap, "overlay": self.overlay, "mask": self.mask}
        return tuple(name for name, asked in wanted.items() if asked)

    @property
    def any(self) -> bool:
        return bool(self.pictures)


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
    """The requested pictures as base64 PNGs (``heatmap_png``...), at most ``max_pixels`` each."""
    pictures = render_prediction(
        prediction, image, stored_threshold, pictures=flags.pictures, max_pixels=max_pixels
    )
    return {f"{name}_png": png_base64(array) for name, array in pictures.items()}
