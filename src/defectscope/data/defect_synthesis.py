"""Synthetic defects painted onto good images, with exact masks, for choosing a configuration.

Auto mode has only good images of the user's product. It holds a few out and paints defects of
several kinds onto them, so that candidate configurations can be compared on how well they
separate and localise defects. The kinds cover what inspection meets in practice:

* ``cutpaste``: a region of another good image pasted elsewhere (misplaced or foreign material);
* ``noise_blend``: a region shaped by smooth noise, blended with a foreign texture (DRAEM-style);
* ``scratch``: a thin curved line, darker or brighter;
* ``blotch``: a large smooth low-contrast brightness change (stain, uneven gloss);
* ``spot``: one to three small dark or bright pits.

Sizes are relative to the image's short side, so a defect survives resizing to the network
input. A mask is exactly the set of pixels that changed: nothing outside it is touched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage import draw

DEFECT_KINDS = ("cutpaste", "noise_blend", "scratch", "blotch", "spot")


@dataclass(frozen=True)
class SyntheticDefect:
    image: np.ndarray  # RGB uint8, equal to the good image outside the mask
    mask: np.ndarray  # bool (H, W): exactly the pixels that differ from the good image
    kind: str


def synthesize_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    donor: np.ndarray | None = None,
    where: np.ndarray | None = None,
) -> SyntheticDefect:
    """Paint one defect of ``kind`` onto ``image`` (RGB uint8 (H, W, 3)).

    ``donor`` (another good image, any size) supplies foreign content for ``cutpaste`` and
    ``noise_blend``; without it the image itself, flipped and shifted, is used. ``where``
    (H, W) weighs the defect's position (default: `structure_weights` of the image).
    """
    if kind not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError("image must be RGB uint8 of shape (H, W, 3)")
    clean = image.astype(np.float32)
    donor_f = _as_donor(image if donor is None else donor, image.shape[:2], rng)
    painter = {
        "cutpaste": _cutpaste,
        "noise_blend": _noise_blend,
        "scratch": _scratch,
        "blotch": _blotch,
        "spot": _spot,
    }[kind]
    if where is None:
        where = structure_weights(image)
    alpha, target = painter(clean, donor_f, rng, where)
    out = clean * (1.0 - alpha[..., None]) + target * alpha[..., None]
    result = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    mask = np.any(result != image, axis=2)
    if not mask.any():
        # A blend that happened to match the image everywhere: nudge its core so that the
        # defect exists (and the mask stays exact).
        core = alpha >= alpha.max() * 0.5
        result[core] = np.where(image[core] > 127, image[core] - 24, image[core] + 24)
        mask = np.any(result != image, axis=2)
    return SyntheticDefect(result, mask, kind)


def synthesize_defects(
    images: Sequence[np.ndarray],
    per_image: int,
    seed: int = 0,
    kinds: Sequence[str] = DEFECT_KINDS,
) -> list[SyntheticDefect]:
    """``per_image`` defects on each image, kinds taken in turn, donors from the other images.

    Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    out: list[SyntheticDefect] = []
    turn = 0
    for i, image in enumerate(images):
        where = structure_weights(image)
        for _ in range(per_image):
            kind = kinds[turn % len(kinds)]
            turn += 1
            donor = images[(i + 1 + int(rng.integers(0, max(1, len(images) - 1)))) % len(images)]
            out.append(synthesize_defect(image, kind, rng, donor=donor, where=where))
    return out


# ---------------------------------------------------------------------------------- painters
def _as_donor(donor: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``donor`` flipped, shifted and tiled to ``shape``, as float RGB."""
    d = donor.astype(np.float32)
    if d.ndim == 2:
        d = np.repeat(d[..., None], 3, axis=2)
    if rng.random() < 0.5:
        d = d[:, ::-1]
    if rng.random() < 0.5:
        d = d[::-1]
    h, w = shape
    reps = (-(-h // d.shape[0]) + 1, -(-w // d.shape[1]) + 1, 1)
    tiled = np.tile(d, reps)
    top = int(rng.integers(0, tiled.shape[0] - h + 1))
    left = int(rng.integers(0, tiled.shape[1] - w + 1))
    return np.ascontiguousarray(tiled[top : top + h, left : left + w])


def _centre(weights: np.ndarray, rng: np.random.Generator, margin: int) -> tuple[int, int]:
    """A random point, drawn with probability ``weights`` (where the product is), kept
    ``margin`` pixels from the border."""
    h, w = weights.shape
    inner = weights[margin : h - margin, margin : w - margin] if min(h, w) > 2 * margin else weights
    off = margin if inner is not weights else 0
    flat = inner.ravel().astype(np.float64)
    pick = int(rng.choice(flat.size, p=flat / flat.sum()))
    return off + pick // inner.shape[1], off + pick % inner.shape[1]


def structure_weights(image: np.ndarray) -> np.ndarray:
    """Where defects go: mostly where the image has structure (the product rather than a plain
    background), with a floor so that plain surfaces get defects too."""
    gray = image.astype(np.float32).mean(axis=2)
    sigma = max(1.0, min(gray.shape) / 64)
    grad = ndimage.gaussian_gradient_magnitude(gray, sigma)
    local = ndimage.uniform_filter(grad, size=max(3, min(gray.shape) // 16))
    return (local / (local.mean() + 1e-6) + 0.25).astype(np.float32)


def _smooth_region(
    shape: tuple[int, int],
    rng: np.random.Generator,
    area: float,
    sigma: float,
    centre: tuple[int, int],
) -> np.ndarray:
    """A blob of about ``area`` (fraction of the image) from thresholded smooth noise, as a
    soft alpha in [0, 1] that is exactly zero outside the blob."""
    h, w = shape
    # Smooth noise made at a quarter of the resolution: the same shapes, 16x less filtering.
    small = (max(4, h // 4), max(4, w // 4))
    coarse = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / 4)
    field = ndimage.zoom(coarse, (h / small[0], w / small[1]), order=1)[:h, :w]
    # Keep one connected blob around the centre: the noise above a level near it.
    cy, cx = centre
    yy, xx = np.ogrid[:h, :w]
    reach = math.sqrt(area) * 0.8
    window = np.exp(-(((yy - cy) / (h * reach)) ** 2 + ((xx - cx) / (w * reach)) ** 2))
    field = (field - field.min()) / (np.ptp(field) + 1e-6) * window
    level = np.quantile(field, 1.0 - area)
    region = field > level
    labels, n = ndimage.label(region)
    if n > 1:
        sizes = ndimage.sum(region, labels, range(1, n + 1))
        region = labels == (1 + int(np.argmax(sizes)))
    soft = ndimage.gaussian_filter(region.astype(np.float32), max(1.0, sigma / 4))
    return np.where(soft > 0.25, np.clip((soft - 0.25) / 0.5, 0.0, 1.0), 0.0)


def _cutpaste(
    clean: np.ndarray, donor: np.ndarray, rng: np.random.Generator, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    h, w = clean.shape[:2]
    side = min(h, w)
    rh = max(3, int(side * rng.uniform(0.04, 0.12)))
    rw = max(3, int(side * rng.uniform(0.04, 0.12)))
    cy, cx = _centre(where, rng, max(rh, rw) // 2 + 1)
    alpha = np.zeros((h, w), np.float32)
    rr, cc = draw.ellipse(cy, cx, rh / 2, rw / 2, shape=(h, w), rotation=rng.uniform(0, np.pi))
    alpha[rr, cc] = 1.0
    # Material from elsewhere on a good part: often only its placement is wrong.
    target = np.clip(donor * rng.uniform(0.9, 1.1), 0, 255)
    return alpha, target


def _noise_blend(
    clean: np.ndarray, donor: np.ndarray, rng: np.random.Generator, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    h, w = clean.shape[:2]
    centre = _centre(where, rng, min(h, w) // 10)
    alpha = _smooth_region(
        (h, w), rng, area=rng.uniform(0.005, 0.03), sigma=min(h, w) / 48, centre=centre
    )
    # A foreign texture: the donor turned by 90 degrees, with its colours permuted.
    texture = np.rot90(donor, k=int(rng.integers(1, 4)))
    texture = _fit(np.ascontiguousarray(texture), (h, w))[..., rng.permutation(3)]
    return alpha * rng.uniform(0.3, 0.8), texture


def _scratch(
    clean: np.ndarray, donor: np.ndarray, rng: np.random.Generator, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    h, w = clean.shape[:2]
    side = min(h, w)
    length = side * rng.uniform(0.08, 0.3)
    angle = rng.uniform(0, np.pi)
    cy, cx = _centre(where, rng, int(length / 2) + 1)
    bend = rng.uniform(-0.25, 0.25) * length
    t = np.linspace(-0.5, 0.5, max(8, int(2 * length)))
    ys = cy + t * length * np.sin(angle) + bend * (1 - 4 * t * t) * np.cos(angle)
    xs = cx + t * length * np.cos(angle) - bend * (1 - 4 * t * t) * np.sin(angle)
    line = np.zeros((h, w), np.float32)
    rr = np.clip(np.rint(ys).astype(int), 0, h - 1)
    cc = np.clip(np.rint(xs).astype(int), 0, w - 1)
    line[rr, cc] = 1.0
    width = round(max(1.0, side / 256 * rng.uniform(0.8, 2.0)))
    if width >= 2:
        line = ndimage.grey_dilation(line, size=(width, width))
    shade = rng.choice([-1.0, 1.0]) * _contrast(clean) * rng.uniform(1.0, 2.5)
    return line * rng.uniform(0.6, 1.0), np.clip(clean + shade, 0, 255)


def _blotch(
    clean: np.ndarray, donor: np.ndarray, rng: np.random.Generator, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    h, w = clean.shape[:2]
    centre = _centre(where, rng, min(h, w) // 6)
    alpha = _smooth_region(
        (h, w), rng, area=rng.uniform(0.05, 0.2), sigma=min(h, w) / 16, centre=centre
    )
    # Low contrast relative to the image's own variation, as stains and uneven gloss are.
    shift = rng.choice([-1.0, 1.0]) * _contrast(clean) * rng.uniform(0.4, 1.0)
    return alpha, np.clip(clean + shift, 0, 255)


def _spot(
    clean: np.ndarray, donor: np.ndarray, rng: np.random.Generator, where: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    h, w = clean.shape[:2]
    side = min(h, w)
    alpha = np.zeros((h, w), np.float32)
    yy, xx = np.ogrid[:h, :w]
    for _ in range(int(rng.integers(1, 4))):
        radius = max(1.5, side * rng.uniform(0.006, 0.016))
        cy, cx = _centre(where, rng, int(radius) + 1)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
        alpha = np.maximum(alpha, np.clip(1.5 - d, 0.0, 1.0))
    shade = rng.choice([-1.0, 1.0]) * _contrast(clean) * rng.uniform(1.5, 3.0)
    return alpha, np.clip(clean + shade, 0, 255)


def _contrast(clean: np.ndarray) -> float:
    """The image's own grey-level spread, bounded: defect strengths are set relative to it."""
    return float(np.clip(clean.std(), 8.0, 40.0))


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Tile or crop ``image`` to ``shape``."""
    h, w = shape
    reps = (-(-h // image.shape[0]), -(-w // image.shape[1]), 1)
    return np.tile(image, reps)[:h, :w]
