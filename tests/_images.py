"""Small real images for fast tests: crops of scikit-image's CC0 brick texture."""

from __future__ import annotations

import io
import socket

import numpy as np
from PIL import Image
from skimage import data as skdata

FAST_CONFIG = {
    "features": {"input_size": [128, 128]},
    # A quarter of the patches, not the default lower bound: a dozen images have fewer than it.
    "coreset": {"ratio": 0.25, "min_size": None},
    "batch_size": 8,
    "device": "cpu",
    # Tests fit a dozen images: the plain fit, unless a test asks for the few-shot one
    # (tests/test_few_shot.py), which compares view sets first and takes longer.
    "few_shot": {"enabled": False},
}


def texture_crops(n: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """``n`` RGB uint8 crops of the brick texture at random positions."""
    texture = skdata.brick()
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        y = int(rng.integers(0, texture.shape[0] - size))
        x = int(rng.integers(0, texture.shape[1] - size))
        crop = texture[y : y + size, x : x + size]
        crops.append(np.repeat(crop[..., None], 3, axis=-1).copy())
    return crops


def with_defect(image: np.ndarray, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A copy with a saturated red blob (about 2.5% of the image), and its mask."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    cy, cx = int(rng.integers(h // 4, 3 * h // 4)), int(rng.integers(w // 4, 3 * w // 4))
    radius = max(3, int(0.09 * min(h, w)))
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    out = image.copy()
    out[mask] = (220, 30, 30)
    return out, mask


def png(array: np.ndarray) -> bytes:
    """``array`` encoded as PNG bytes, as a client would upload it."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for servers the tests start."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def painted(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A copy with a disc of 15 % of the side, white or a 4 px checkerboard: a gross defect."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    cy, cx = (int(rng.integers(s // 4, 3 * s // 4)) for s in (h, w))
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (0.15 * h) ** 2
    out = image.copy()
    checker = np.where(((yy // 4 + xx // 4) % 2 == 0)[..., None], 255, 0)
    out[disc] = 255 if kind == "white" else checker[disc]
    return out
