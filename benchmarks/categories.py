"""Synthetic benchmark categories in the MVTec AD layout, built offline and deterministically.

    python benchmarks/categories.py OUT [--seed 0] [--scale 1.0] [--names brick,gear]

Each category is written as ``OUT/<name>/train/good/*.png``, ``test/good/*.png``,
``test/<defect_type>/*.png`` and ``ground_truth/<defect_type>/<stem>_mask.png`` (binary 0/255 at
the image's own size). The categories are chosen to span the kinds of product users bring, so
that a detector change that helps one kind and hurts another shows up:

* textures: ``brick`` and ``grass`` (colour) and ``gravel`` (grayscale) from scikit-image's CC0
  photographs, plus the procedural ``knurl_tiny`` (knurled metal) and ``coated_panel``
  (orange-peel paint);
* ``brushed_steel``: grayscale brushed/rolled metal with an illumination gradient, and thin long
  scratches and hairline cracks (1-3 px);
* ``strips``: grayscale tile/strip surfaces of varying, non-square sizes with blowholes, breaks,
  cracks, frays and large low-contrast uneven regions;
* ``wire``: long thin grayscale images of varying size (up to 24:1) with small pits, short
  scratches and stains;
* ``knurl_tiny``: 1024x1024 images with 3-8 px spots;
* ``coated_panel``: large low-contrast blotches, uneven gloss and slight colour shifts;
* ``gear``: a centred object with pose jitter, missing pieces, contamination and scratches.

Masks are exact: a defect is rendered as a float image, the mask is where it differs from the
clean image by at least the defect's tolerance (1-4 grey levels), and every pixel outside the
mask is restored to the clean value. So for every defect ``mask == (image != clean)`` (any
channel) and no pixel outside the mask was touched. Region-like defects (stains, dents, uneven
areas) also change every pixel of their region by at least the tolerance, so their masks have
no pinholes where the texture happened to match the defect.

The defect models here are written independently of ``defectscope.data.synthetic`` and of the
detector's own synthetic-defect code (which the benchmark must not share): midpoint-displacement
cracks, shaded pits, re-rendered geometry for missing pieces, smooth-field regions for
low-contrast defects.

Every image is drawn from its own generator seeded by (seed, category, split/defect type,
index), so the same arguments always write the same bytes. ``build_category`` skips a category
whose stamp file (``.benchmark_category.json``, hidden, so dataset readers ignore it) records the
same generator version, seed and scale, and builds into a temporary folder that is renamed into
place, so a folder is never left half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import data as skdata

VERSION = 1
STAMP_NAME = ".benchmark_category.json"

__all__ = [
    "CATEGORIES",
    "STAMP_NAME",
    "VERSION",
    "CategorySpec",
    "Sample",
    "build_all",
    "build_category",
    "make_sample",
    "read_stamp",
]


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """A clean (good) image plus what a defect needs to re-render parts of it."""

    image: np.ndarray  # uint8, (H, W) grayscale or (H, W, 3) RGB
    info: dict[str, Any] = field(default_factory=dict)


# A defect takes the clean scene and a generator and returns the defective image as float
# (same shape as the clean one) and the tolerance in grey levels that defines its mask.
DefectFn = Callable[[_Scene, np.random.Generator], tuple[np.ndarray, float]]


@dataclass(frozen=True)
class CategorySpec:
    name: str
    kind: str  # texture / surface / object
    description: str  # one line
    color: bool
    sizes: str  # human-readable image size(s)
    n_train: int
    n_test_good: int
    defects: Mapping[str, int]  # defect type -> number of test images
    good: Callable[[np.random.Generator], _Scene] = field(repr=False, compare=False)
    defect_fns: Mapping[str, DefectFn] = field(repr=False, compare=False)
    min_area: int = 6  # a defect changing fewer pixels is redrawn

    def counts(self, scale: float = 1.0) -> dict[str, int]:
        """Images per folder ("train/good", "test/good", "test/<type>") at ``scale``."""
        out = {
            "train/good": max(2, round(self.n_train * scale)),
            "test/good": max(1, round(self.n_test_good * scale)),
        }
        for kind, n in self.defects.items():
            out[f"test/{kind}"] = max(1, round(n * scale))
        return out


@dataclass(frozen=True)
class Sample:
    clean: np.ndarray  # uint8 good image the defect was painted on (equal to image if good)
    image: np.ndarray  # uint8
    mask: np.ndarray  # bool (H, W): exactly the pixels where image != clean
    defect_type: str  # "good" for good images


# --------------------------------------------------------------------------------------------
# Noise, shapes and compositing helpers
# --------------------------------------------------------------------------------------------


def _rng(seed: int, *keys: object) -> np.random.Generator:
    words = [int(seed)] + [zlib.crc32(str(k).encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


def _gauss(rng: np.random.Generator, shape: tuple[int, ...], sigma: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape, np.float32) * np.float32(sigma)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _normalize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean()) / (x.std() + 1e-6)).astype(np.float32)


def _perlin(shape: tuple[int, int], period: float, rng: np.random.Generator) -> np.ndarray:
    """Gradient (Perlin) noise with lattice spacing ``period`` px, roughly in [-1, 1]."""
    h, w = shape
    gh, gw = int(h / period) + 3, int(w / period) + 3
    angles = rng.uniform(0.0, 2 * np.pi, (gh, gw))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    off = rng.uniform(0.0, 1.0, 2)
    ys = np.arange(h, dtype=np.float64) / period + off[0]
    xs = np.arange(w, dtype=np.float64) / period + off[1]
    y0, x0 = np.floor(ys).astype(np.intp), np.floor(xs).astype(np.intp)
    fy = (ys - y0).astype(np.float32)[:, None]
    fx = (xs - x0).astype(np.float32)[None, :]
    iy, ix = y0[:, None], x0[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gx[iy + dy, ix + dx] * (fx - dx) + gy[iy + dy, ix + dx] * (fy - dy)

    u = fx * fx * fx * (fx * (fx * 6 - 15) + 10)
    v = fy * fy * fy * (fy * (fy * 6 - 15) + 10)
    c00, c01, c10, c11 = corner(0, 0), corner(0, 1), corner(1, 0), corner(1, 1)
    top = c00 + u * (c01 - c00)
    bottom = c10 + u * (c11 - c10)
    return (top + v * (bottom - top)) * np.float32(np.sqrt(2.0))


def _fractal(
    shape: tuple[int, int], period: float, rng: np.random.Generator, octaves: int = 4
) -> np.ndarray:
    """Fractal Perlin noise normalised to zero mean, unit std."""
    out = np.zeros(shape, np.float32)
    amp = 1.0
    for _ in range(octaves):
        if period < 1.5:
            break
        out += amp * _perlin(shape, period, rng)
        amp *= 0.5
        period /= 2.0
    return _normalize(out)


def _smooth_field(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth value noise (bicubic upsampled random grid) with feature size ``scale`` px."""
    h, w = shape
    gh, gw = int(np.ceil(h / scale)) + 3, int(np.ceil(w / scale)) + 3
    grid = ndimage.gaussian_filter(_gauss(rng, (gh, gw)).astype(np.float32), 0.6)
    big = np.asarray(
        Image.fromarray(grid).resize((int(gw * scale), int(gh * scale)), Image.Resampling.BICUBIC),
        np.float32,
    )
    oy = int(rng.integers(0, big.shape[0] - h + 1))
    ox = int(rng.integers(0, big.shape[1] - w + 1))
    return _normalize(big[oy : oy + h, ox : ox + w])


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _inverse_smoothstep(y: float) -> float:
    grid = np.linspace(0.0, 1.0, 2001)
    return float(np.interp(y, _smoothstep(grid), grid))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    if x.ndim == 3:
        return ndimage.gaussian_filter(x, (sigma, sigma, 0))
    return ndimage.gaussian_filter(x, sigma)


def _lerp(a: np.ndarray, b: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    if a.ndim == 3 and alpha.ndim == 2:
        alpha = alpha[..., None]
    return a + (b - a) * alpha


def _times(x: np.ndarray, factor: np.ndarray) -> np.ndarray:
    return x * (factor[..., None] if x.ndim == 3 and factor.ndim == 2 else factor)


def _plus(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    return x + (delta[..., None] if x.ndim == 3 and delta.ndim == 2 else delta)


def _luma(x: np.ndarray) -> np.ndarray:
    return x if x.ndim == 2 else x @ np.array([0.299, 0.587, 0.114], np.float32)


def _stroke(
    shape: tuple[int, int], points: np.ndarray, widths: np.ndarray | float, ss: int = 4
) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a polyline ``points`` (N, 2) as (x, y)."""
    h, w = shape
    pts = np.asarray(points, np.float64)
    wid = np.broadcast_to(np.asarray(widths, np.float64), (len(pts),))
    pad = wid.max() / 2 + 2
    x0 = int(max(0, np.floor(pts[:, 0].min() - pad)))
    x1 = int(min(w, np.ceil(pts[:, 0].max() + pad)))
    y0 = int(max(0, np.floor(pts[:, 1].min() - pad)))
    y1 = int(min(h, np.ceil(pts[:, 1].max() + pad)))
    out = np.zeros(shape, np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    canvas = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    p = (pts - [x0, y0]) * ss
    for i in range(len(p) - 1):
        width = max(1, round((wid[i] + wid[i + 1]) / 2 * ss))
        draw.line([tuple(p[i]), tuple(p[i + 1])], fill=255, width=width)
    for i in range(len(p)):
        r = wid[i] * ss / 2
        if r >= 1.5:
            draw.ellipse([p[i, 0] - r, p[i, 1] - r, p[i, 0] + r, p[i, 1] + r], fill=255)
    out[y0:y1, x0:x1] = np.asarray(canvas.reduce(ss), np.float32) / 255.0
    return out


def _polygon(shape: tuple[int, int], points: np.ndarray, ss: int = 4) -> np.ndarray:
    """Anti-aliased coverage (H, W) of a filled polygon ``points`` (N, 2) as (x, y)."""
    h, w = shape
    canvas = Image.new("L", (w * ss, h * ss), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in np.asarray(points) * ss], fill=255)
    return np.asarray(canvas.reduce(ss), np.float32) / 255.0


def _fractal_path(
    p0: Sequence[float],
    p1: Sequence[float],
    rng: np.random.Generator,
    roughness: float,
    step: float = 3.0,
) -> np.ndarray:
    """Midpoint-displacement polyline from p0 to p1 (x, y), segments about ``step`` px."""
    pts = np.array([p0, p1], np.float64)
    for _ in range(12):
        seg = np.diff(pts, axis=0)
        lens = np.hypot(seg[:, 0], seg[:, 1])
        if lens.max() <= step:
            break
        mids = (pts[:-1] + pts[1:]) / 2
        normal = np.stack([-seg[:, 1], seg[:, 0]], 1) / np.maximum(lens, 1e-6)[:, None]
        mids += (
            normal
            * (np.clip(rng.standard_normal(len(mids)), -2.5, 2.5) * roughness * lens)[:, None]
        )
        new = np.empty((len(pts) + len(mids), 2))
        new[0::2], new[1::2] = pts, mids
        pts = new
    return pts


def _bezier(ctrl: np.ndarray, n: int = 200) -> np.ndarray:
    """Points of a cubic Bezier curve with control points ``ctrl`` (4, 2)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    c = np.asarray(ctrl, np.float64)
    return (
        (1 - t) ** 3 * c[0] + 3 * (1 - t) ** 2 * t * c[1] + 3 * (1 - t) * t**2 * c[2] + t**3 * c[3]
    )


def _blob(
    shape: tuple[int, int],
    center: Sequence[float],
    radius: float,
    rng: np.random.Generator,
    irregular: float = 0.25,
    soft: float = 0.8,
    aspect: float = 1.0,
    angle: float = 0.0,
    harmonics: int = 6,
) -> np.ndarray:
    """Coverage (H, W) of an irregular star-shaped blob; ``soft`` is the edge ramp in px."""
    h, w = shape
    cy, cx = center
    coef = irregular * rng.standard_normal(harmonics - 1) / np.arange(2, harmonics + 1)
    phase = rng.uniform(0, 2 * np.pi, harmonics - 1)
    reach = radius * (1 + np.abs(coef).sum()) * max(aspect, 1.0) + soft + 2
    y0, y1 = max(0, int(cy - reach)), min(h, int(np.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(np.ceil(cx + reach)) + 1)
    out = np.zeros(shape, np.float32)
    if y1 <= y0 or x1 <= x0:
        return out
    dy = np.arange(y0, y1, dtype=np.float64)[:, None] + 0.5 - cy
    dx = np.arange(x0, x1, dtype=np.float64)[None, :] + 0.5 - cx
    ca, sa = np.cos(angle), np.sin(angle)
    u = (dx * ca + dy * sa) / aspect
    v = -dx * sa + dy * ca
    d = np.hypot(u, v)
    theta = np.arctan2(v, u)
    k = np.arange(2, harmonics + 1)[:, None, None]
    r = radius * np.maximum(
        1 + (coef[:, None, None] * np.cos(k * theta + phase[:, None, None])).sum(0), 0.3
    )
    out[y0:y1, x0:x1] = np.clip((r - d) / soft + 0.5, 0.0, 1.0)
    return out


def _pit(
    shape: tuple[int, int],
    center: Sequence[float],
    radius: float,
    light: float,
    depth: float,
    ss: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Shading factor and coverage of a spherical pit with a low raised lip.

    Returns (factor, coverage): multiply the (dulled) surface by ``factor`` inside
    ``coverage``; the pit's far wall is lit, the wall towards the light is in shadow.
    """
    h, w = shape
    cy, cx = center
    reach = radius + 3
    y0, y1 = max(0, int(cy - reach)), min(h, int(np.ceil(cy + reach)) + 1)
    x0, x1 = max(0, int(cx - reach)), min(w, int(np.ceil(cx + reach)) + 1)
    factor = np.ones(shape, np.float32)
    cover = np.zeros(shape, np.float32)
    if y1 <= y0 or x1 <= x0:
        return factor, cover
    fy = (np.arange((y1 - y0) * ss) + 0.5) / ss + y0 - cy
    fx = (np.arange((x1 - x0) * ss) + 0.5) / ss + x0 - cx
    dy, dx = fy[:, None], fx[None, :]
    d = np.hypot(dx, dy)
    inside = d < radius
    lx, ly, lz = np.cos(light) * 0.7, np.sin(light) * 0.7, 0.714
    z = np.sqrt(np.maximum(radius**2 - d**2, 0.0))
    # Concave sphere: the normal points towards the centre and up.
    lambert = (-dx * lx - dy * ly + z * lz) / radius
    f_in = np.clip(lambert / lz, 0.15, 1.8) * (1 - depth * (z / radius) ** 0.5)
    lip = (d >= radius) & (d < radius + 1.5)
    f_lip = 1 + 0.18 * (dx * lx + dy * ly) / np.maximum(d, 1e-6)
    f = np.where(inside, f_in, np.where(lip, f_lip, 1.0))
    c = np.where(inside | lip, 1.0, 0.0)
    hh, ww = y1 - y0, x1 - x0
    factor[y0:y1, x0:x1] = f.reshape(hh, ss, ww, ss).mean((1, 3))
    cover[y0:y1, x0:x1] = c.reshape(hh, ss, ww, ss).mean((1, 3))
    return factor, cover


def _region(
    shape: tuple[int, int],
    rng: np.random.Generator,
    frac: float,
    scale: float,
    tol_ratio: float,
    soft: float = 0.7,
) -> np.ndarray:
    """Smooth alpha of a large region whose part with alpha >= ``tol_ratio`` covers ``frac``.

    A smooth random field biased towards a random centre, thresholded with a soft ramp (``soft``
    field standard deviations wide), so the region is one or two illumination-like blobs.
    """
    h, w = shape
    field_ = _smooth_field(shape, scale, rng)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    yy = (np.arange(h, dtype=np.float32)[:, None] - cy) / max(h, w)
    xx = (np.arange(w, dtype=np.float32)[None, :] - cx) / max(h, w)
    f = field_ - 6.0 * (yy**2 + xx**2)
    threshold = float(np.quantile(f, 1.0 - frac)) - soft * _inverse_smoothstep(tol_ratio)
    return _smoothstep((f - threshold) / soft).astype(np.float32)


def _finish(clean: np.ndarray, new: np.ndarray, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """Quantise a defect: mask = pixels changed by >= tol (any channel); clean elsewhere."""
    c = clean.astype(np.float32)
    n = np.clip(new, 0.0, 255.0)
    d = np.abs(n - c)
    if d.ndim == 3:
        d = d.max(-1)
    mask = d >= max(float(tol), 1.0)
    keep = mask[..., None] if c.ndim == 3 else mask
    return np.where(keep, np.rint(n), c).astype(np.uint8), mask


def _solid(
    clean: np.ndarray,
    new: np.ndarray,
    support: np.ndarray,
    tol: float,
    direction: float | np.ndarray,
) -> np.ndarray:
    """Make every ``support`` pixel change by at least ``tol`` so that the mask is solid there.

    Where a defect happens to change a pixel of its support by less than ``tol`` (texture that
    already looks like the defect, or a blur that cancels a brightening), the pixel is pushed to
    ``clean + tol * direction`` (``direction`` scaled to a largest component of 1): an invisible
    change that keeps the mask equal to the defect's region.
    """
    d = np.abs(new - clean)
    if d.ndim == 3:
        d = d.max(-1)
    weak = support & (d < tol)
    step = np.asarray(direction, np.float32)
    step = step / np.abs(step).max() * np.float32(tol * 1.001)
    pushed = clean + step
    return np.where(weak[..., None] if clean.ndim == 3 else weak, pushed, new)


def _inside_point(
    shape: tuple[int, int], rng: np.random.Generator, margin: float
) -> tuple[float, float]:
    h, w = shape
    my, mx = min(margin, h / 2 - 1), min(margin, w / 2 - 1)
    return float(rng.uniform(my, h - my)), float(rng.uniform(mx, w - mx))


def _crack(
    shape: tuple[int, int],
    rng: np.random.Generator,
    length: float,
    width: float,
    roughness: float = 0.18,
    branches: tuple[int, int] = (0, 2),
    start: Sequence[float] | None = None,
) -> np.ndarray:
    """Coverage of a tapering midpoint-displacement crack with optional side branches."""
    h, w = shape
    if start is None:
        sy, sx = _inside_point(shape, rng, 0.12 * min(h, w))
        start = (sx, sy)
    angle = rng.uniform(0, 2 * np.pi)
    end = (start[0] + length * np.cos(angle), start[1] + length * np.sin(angle))
    path = _fractal_path(start, end, rng, roughness)
    t = np.linspace(0.0, 1.0, len(path))
    widths = width * (0.35 + 0.65 * np.sin(np.pi * t) ** 0.5)
    alpha = _stroke(shape, path, widths)
    for _ in range(int(rng.integers(branches[0], branches[1] + 1))):
        i = int(rng.integers(len(path) // 5, max(len(path) // 5 + 1, 4 * len(path) // 5)))
        a = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.1)
        sub = length * rng.uniform(0.15, 0.4)
        p0 = path[i]
        branch = _fractal_path(
            p0, (p0[0] + sub * np.cos(a), p0[1] + sub * np.sin(a)), rng, roughness
        )
        tb = np.linspace(0.0, 1.0, len(branch))
        alpha = np.maximum(alpha, _stroke(shape, branch, widths[i] * (1 - 0.7 * tb)))
    return alpha


# --------------------------------------------------------------------------------------------
# Textures from scikit-image's CC0 photographs
# --------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _source(name: str) -> np.ndarray:
    image = getattr(skdata, name)().astype(np.float32)
    image.setflags(write=False)
    return image


def _texture_crop(
    name: str,
    size: int,
    rng: np.random.Generator,
    zoom: tuple[float, float] = (0.9, 1.12),
    flip_v: bool = True,
    rot: bool = False,
) -> np.ndarray:
    src = _source(name)
    z = rng.uniform(*zoom)
    side = min(src.shape[0], src.shape[1], round(size / z))
    top = int(rng.integers(0, src.shape[0] - side + 1))
    left = int(rng.integers(0, src.shape[1] - side + 1))
    crop = np.ascontiguousarray(src[top : top + side, left : left + side])
    img = np.asarray(
        Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC), np.float32
    )
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if flip_v and rng.random() < 0.5:
        img = img[::-1]
    if rot and rng.random() < 0.5:
        img = img.T
    return np.ascontiguousarray(img)


def _ramp(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A linear illumination ramp of random direction, +-amplitude over the image."""
    h, w = shape
    a = rng.uniform(0, 2 * np.pi)
    y = (np.arange(h, dtype=np.float32)[:, None] - h / 2) / max(h, w)
    x = (np.arange(w, dtype=np.float32)[None, :] - w / 2) / max(h, w)
    return (2 * amplitude * (x * np.cos(a) + y * np.sin(a))).astype(np.float32)


_BRICK = 256


def _good_brick(rng: np.random.Generator) -> _Scene:
    gray = _texture_crop("brick", _BRICK, rng, flip_v=False)
    tint = np.array([1.0, 0.76, 0.62], np.float32) + rng.normal(0, 0.012, 3).astype(np.float32)
    gray = gray * rng.uniform(0.94, 1.06) + _ramp(gray.shape, rng, rng.uniform(0, 5))
    rgb = gray[..., None] * tint + _gauss(rng, (*gray.shape, 3), 1.8)
    return _Scene(_u8(rgb))


def _brick_crack(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    alpha = _crack(
        c.shape[:2], rng, rng.uniform(0.35, 0.75) * _BRICK, rng.uniform(1.2, 2.6), roughness=0.22
    )
    return _times(c, 1 - alpha * rng.uniform(0.45, 0.65)), 2.0


def _brick_stain(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape[:2]
    center = _inside_point(shape, rng, 30)
    alpha = _blob(
        shape,
        center,
        rng.uniform(14, 40),
        rng,
        irregular=0.35,
        soft=rng.uniform(3, 6),
        aspect=rng.uniform(1, 1.6),
        angle=rng.uniform(0, 3.2),
    )
    alpha *= np.clip(0.75 + 0.3 * _fractal(shape, 24, rng, 3), 0, 1)
    if rng.random() < 0.5:  # damp patch: darker, slightly more saturated
        new = _times(c, 1 - alpha * rng.uniform(0.22, 0.35))
        new = _lerp(new, new * np.array([1.04, 0.96, 0.92], np.float32), alpha)
        direction = -1.0
    else:  # efflorescence: a whitish salt haze
        white = np.array([232, 226, 214], np.float32) * rng.uniform(0.88, 1.0)
        new = _lerp(c, white, alpha * rng.uniform(0.28, 0.45))
        direction = 1.0
    return _solid(c, new, alpha >= 0.3, 3.0, direction), 3.0


def _relief(alpha: np.ndarray, light: float, sigma: float = 1.2) -> np.ndarray:
    """Directional shading of a depression shaped like ``alpha`` (positive = lit)."""
    height = -ndimage.gaussian_filter(alpha, sigma)
    gy, gx = np.gradient(height)
    return -(gx * np.cos(light) + gy * np.sin(light))


def _brick_chip(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape[:2]
    center = _inside_point(shape, rng, 25)
    alpha = _blob(shape, center, rng.uniform(9, 24), rng, irregular=0.3, soft=0.7, harmonics=7)
    local = _blur(c, 6.0) * rng.uniform(1.12, 1.25)
    fresh = _plus(local, 9.0 * _fractal(shape, 4, rng, 2))
    new = _lerp(c, fresh, alpha)
    shade = _relief(alpha, rng.uniform(0, 2 * np.pi))
    return _solid(c, _times(new, 1 + 1.8 * shade), alpha >= 0.5, 3.0, 1.0), 3.0


_GRASS = 256


def _good_grass(rng: np.random.Generator) -> _Scene:
    gray = _texture_crop("grass", _GRASS, rng, rot=True) / 255.0
    dark = np.array([18, 42, 9], np.float32) * rng.uniform(0.92, 1.08)
    light = np.array([188, 214, 112], np.float32) * (1 + rng.normal(0, 0.02, 3)).astype(np.float32)
    gray = np.clip(gray * rng.uniform(0.95, 1.05) + _ramp(gray.shape, rng, 0.02), 0, 1.1)
    rgb = dark + (light - dark) * gray[..., None] + _gauss(rng, (*gray.shape, 3), 1.6)
    return _Scene(_u8(rgb))


def _grass_hair(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape[:2]
    size = _GRASS
    p0 = rng.uniform(0.1, 0.9, 2) * size
    a = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(0.4, 0.85) * size
    p3 = p0 + length * np.array([np.cos(a), np.sin(a)])
    bend = rng.normal(0, 0.3 * length, (2, 2))
    ctrl = np.array([p0, p0 + (p3 - p0) / 3 + bend[0], p0 + 2 * (p3 - p0) / 3 + bend[1], p3])
    alpha = _stroke(shape, _bezier(ctrl), rng.uniform(0.9, 1.6))
    colour = (
        np.array([28, 22, 16], np.float32)
        if rng.random() < 0.5
        else np.array([228, 216, 182], np.float32)
    )
    return _lerp(c, colour, alpha * rng.uniform(0.7, 0.95)), 3.0


def _grass_burn(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape[:2]
    alpha = _blob(
        shape,
        _inside_point(shape, rng, 35),
        rng.uniform(18, 42),
        rng,
        irregular=0.35,
        soft=rng.uniform(4, 8),
        aspect=rng.uniform(1, 1.5),
        angle=rng.uniform(0, 3.2),
    )
    alpha *= np.clip(0.7 + 0.35 * _fractal(shape, 20, rng, 3), 0, 1)
    tone = np.array([1.05, 0.78, 0.48], np.float32)
    brown = _luma(c)[..., None] * tone * 0.85
    new = _lerp(c, brown, alpha * rng.uniform(0.55, 0.8))
    return _solid(c, new, alpha >= 0.4, 4.0, tone - 1.0), 4.0


def _grass_debris(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape[:2]
    cy, cx = _inside_point(shape, rng, 24)
    radius = rng.uniform(6, 14)
    angle = rng.uniform(0, np.pi)
    aspect = rng.uniform(1.2, 1.8)
    alpha = _blob(
        shape, (cy, cx), radius, rng, irregular=0.15, soft=0.8, aspect=aspect, angle=angle
    )
    shadow = ndimage.shift(_blur(alpha, 1.5), (2.0, 2.5), order=1)
    stone = _texture_crop("gravel", _GRASS, rng, zoom=(1.5, 2.0)) * 0.6 + 70
    yy = np.arange(shape[0], dtype=np.float32)[:, None] - cy
    xx = np.arange(shape[1], dtype=np.float32)[None, :] - cx
    dome = 1.15 - 0.35 * np.clip((xx + yy) / (2 * radius * aspect), -1, 1)
    tone = (stone * dome)[..., None] * np.array([1.0, 0.95, 0.86], np.float32)
    new = _times(c, 1 - 0.45 * shadow * (1 - alpha))
    return _lerp(new, tone, alpha), 3.0


_GRAVEL = 320


def _good_gravel(rng: np.random.Generator) -> _Scene:
    gray = _texture_crop("gravel", _GRAVEL, rng, zoom=(0.85, 1.1), rot=True)
    gray = gray * rng.uniform(0.94, 1.06) + _ramp(gray.shape, rng, rng.uniform(0, 5))
    return _Scene(_u8(gray + _gauss(rng, gray.shape, 2.0)))


def _gravel_hole(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape
    radius = rng.uniform(6, 15)
    factor, cover = _pit(
        shape,
        _inside_point(shape, rng, 25),
        radius,
        rng.uniform(0, 2 * np.pi),
        rng.uniform(0.25, 0.45),
    )
    dull = _lerp(c, _blur(c, 3.0) * 0.85, cover * 0.8)
    return dull * factor, 3.0


def _gravel_oil(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape
    alpha = _blob(
        shape,
        _inside_point(shape, rng, 40),
        rng.uniform(25, 55),
        rng,
        irregular=0.3,
        soft=rng.uniform(6, 12),
        aspect=rng.uniform(1, 1.7),
        angle=rng.uniform(0, 3.2),
    )
    smooth = _lerp(c, _blur(c, 2.0), alpha * 0.5)
    new = smooth * (1 - alpha * rng.uniform(0.12, 0.22))
    return _solid(c, new, alpha >= 0.4, 3.0, -1.0), 3.0


def _gravel_foreign(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape
    cy, cx = _inside_point(shape, rng, 35)
    n = int(rng.integers(5, 8))
    radius = rng.uniform(10, 24)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.6, 1.2, n)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    alpha = _polygon(shape, pts)
    tone = rng.uniform(200, 228) if rng.random() < 0.5 else rng.uniform(32, 52)
    surface = tone + _ramp(shape, rng, 8) + _gauss(rng, shape, 3.0)
    shadow = ndimage.shift(_blur(alpha, 1.2), (1.5, 2.0), order=1)
    new = c * (1 - 0.5 * shadow * (1 - alpha))
    return _lerp(new, surface, alpha), 4.0


# --------------------------------------------------------------------------------------------
# Procedural surfaces
# --------------------------------------------------------------------------------------------

_STEEL = 384


def _good_steel(rng: np.random.Generator) -> _Scene:
    h = w = _STEEL
    pad = 100
    streak = ndimage.gaussian_filter1d(_gauss(rng, (h, w + 2 * pad)), 22, axis=1)
    streak = _normalize(streak[:, pad : pad + w]) * rng.uniform(4.5, 6.5)
    fine = ndimage.gaussian_filter1d(_gauss(rng, (h, w + 40)), 4, axis=1)[:, 20 : 20 + w]
    fine = _normalize(fine) * 2.0
    bands = ndimage.gaussian_filter1d(rng.standard_normal(h + 80), 10)[40 : 40 + h]
    bands = _normalize(bands)[:, None] * rng.uniform(1.5, 3.0)
    yy = (np.arange(h, dtype=np.float32)[:, None] - rng.uniform(0.3, 0.7) * h) / h
    xx = (np.arange(w, dtype=np.float32)[None, :] - rng.uniform(0.3, 0.7) * w) / w
    vignette = -rng.uniform(0, 14) * (xx**2 + yy**2)
    illum = _ramp((h, w), rng, rng.uniform(4, 10)) + vignette
    img = rng.uniform(122, 150) + streak + fine + bands + illum + _gauss(rng, (h, w), 1.5)
    return _Scene(_u8(img))


def _steel_scratch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape
    length = rng.uniform(0.5, 0.95) * _STEEL
    angle = rng.choice([-1.0, 1.0]) * rng.uniform(np.radians(15), np.radians(80))
    if rng.random() < 0.5:
        angle += np.pi
    mid = np.array(_inside_point(shape, rng, 0.3 * _STEEL))[::-1]
    d = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-d[1], d[0]])
    bend = rng.normal(0, 0.05 * length, 2)
    ctrl = np.array(
        [
            mid - d * length / 2,
            mid - d * length / 6 + normal * bend[0],
            mid + d * length / 6 + normal * bend[1],
            mid + d * length / 2,
        ]
    )
    path = _bezier(ctrl, 300)
    width = rng.uniform(1.0, 2.8)
    core = _stroke(shape, path, width)
    side = np.clip(_stroke(shape, path + normal * (width * 0.5 + 0.8), width * 0.7) - core, 0, 1)
    fade = np.clip(0.65 + 0.35 * _smooth_field(shape, 40, rng), 0.25, 1.0)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    amp = rng.uniform(22, 45)
    return c + fade * (sign * amp * core - sign * 0.45 * amp * side), 3.0


def _steel_hairline(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    alpha = _crack(
        c.shape,
        rng,
        rng.uniform(0.4, 0.8) * _STEEL,
        rng.uniform(0.8, 1.2),
        roughness=0.12,
        branches=(0, 1),
    )
    return c - alpha * rng.uniform(14, 24), 3.0


def _steel_dent(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    shape = c.shape
    cy, cx = _inside_point(shape, rng, 40)
    radius = rng.uniform(10, 26)
    aspect = rng.uniform(1.0, 1.6)
    angle = rng.uniform(0, np.pi)
    yy = np.arange(shape[0], dtype=np.float32)[:, None] - cy
    xx = np.arange(shape[1], dtype=np.float32)[None, :] - cx
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / aspect
    v = -xx * np.sin(angle) + yy * np.cos(angle)
    height = -np.exp(-2.0 * (u**2 + v**2) / radius**2)
    gy, gx = np.gradient(height)
    light = rng.uniform(0, 2 * np.pi)
    shade = -(gx * np.cos(light) + gy * np.sin(light)) * radius
    shade = shade / (np.abs(shade).max() + 1e-6) * rng.uniform(12, 24)
    depth = -height
    smooth = _lerp(c, _blur(c, 1.5), np.clip(depth * 1.5, 0, 1))
    new = smooth + shade - depth * rng.uniform(4, 7)
    return _solid(c, new, depth >= 0.3, 3.0, -1.0), 3.0


def _rolled(
    rng: np.random.Generator,
    shape: tuple[int, int],
    base: float,
    streak: tuple[float, float],
    streak_amp: tuple[float, float],
    grain: tuple[float, float],
    ramp: tuple[float, float],
    field_scale: float,
) -> np.ndarray:
    """A rolled or ground surface: marks along the rows (``streak`` = blur sigmas across and
    along), fine grain (sigma, amplitude), a linear ramp and smooth shading."""
    h, w = shape
    pad = round(2.5 * streak[1])
    marks = ndimage.gaussian_filter(_gauss(rng, (h, w + 2 * pad)), streak)[:, pad : pad + w]
    fine = ndimage.gaussian_filter(_gauss(rng, (h, w)), grain[0])
    return (
        base
        + _normalize(marks) * rng.uniform(*streak_amp)
        + _normalize(fine) * grain[1]
        + _ramp((h, w), rng, rng.uniform(*ramp))
        + 3.0 * _smooth_field((h, w), field_scale, rng)
    )


_STRIP_W = (120, 600)
_STRIP_H = (250, 280)
_STRIP_BG = 24.0


def _good_strip(rng: np.random.Generator) -> _Scene:
    w = int(rng.integers(_STRIP_W[0], _STRIP_W[1] + 1))
    # Narrow strips are taller: about 120x280 (W x H) up to 600x250.
    h_mid = _STRIP_H[1] - (w - _STRIP_W[0]) / (_STRIP_W[1] - _STRIP_W[0]) * 30
    h = int(np.clip(round(h_mid + rng.uniform(-8, 8)), *_STRIP_H))
    base = rng.uniform(84, 104)
    surface = _rolled(rng, (h, w), base, (0.7, 12), (3.0, 5.0), (0.8, 2.5), (3, 8), 70)
    # The tile's top edge: a dark gap, then a brighter chamfer band.
    xs = np.arange(w, dtype=np.float32)
    edge = rng.uniform(3, 7) + rng.uniform(-1.5, 1.5) * xs / w
    edge = edge + ndimage.gaussian_filter1d(rng.normal(0, 0.3, w), 3)
    chamfer = rng.uniform(8, 13)
    ys = np.arange(h, dtype=np.float32)[:, None]
    depth = ys - edge[None, :]
    band = 26.0 * np.clip(1 - depth / chamfer, 0, 1) ** 1.5 * (depth >= 0)
    cover = np.clip(depth + 0.5, 0, 1)
    noise = _gauss(rng, (h, w), 1.2)
    background = _STRIP_BG + _gauss(rng, (h, w), 2.0) + noise
    img = background * (1 - cover) + (surface + band + noise) * cover
    # Breaks and frays uncover this same background, so the gap they extend stays unchanged.
    return _Scene(_u8(img), {"edge": edge, "chamfer": chamfer, "background": background})


def _pits(
    c: np.ndarray,
    rng: np.random.Generator,
    count: int,
    radii: tuple[float, float],
    top: float,
    blur: float,
    dull: float,
) -> np.ndarray:
    """``count`` shaded pits below row ``top``, each dulling (blurring, darkening) its floor."""
    shape = c.shape
    new = c
    for _ in range(count):
        radius = rng.uniform(*radii)
        cy = rng.uniform(top + radius + 4, shape[0] - radius - 4)
        cx = rng.uniform(radius + 4, shape[1] - radius - 4)
        factor, cover = _pit(
            shape, (cy, cx), radius, rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.6)
        )
        new = _lerp(new, _blur(new, blur) * dull, cover) * factor
    return new


def _strip_blowhole(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    edge = scene.info["edge"].max() + scene.info["chamfer"]
    return _pits(c, rng, int(rng.integers(1, 4)), (2.0, 6.0), edge, 2.0, 0.8), 3.0


def _strip_break(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    h, w = c.shape
    edge = scene.info["edge"]
    width = min(rng.uniform(20, 80), 0.6 * w)
    x0 = rng.uniform(2, w - width - 2)
    depth = rng.uniform(14, 42)
    e0, e1 = float(edge[int(x0)]), float(edge[min(w - 1, int(x0 + width))])
    a = (x0, e0 - 2)
    b = (x0 + width, e1 - 2)
    bottom = (x0 + width * rng.uniform(0.3, 0.7), max(e0, e1) + depth)
    path = np.concatenate(
        [
            _fractal_path(a, bottom, rng, 0.2, step=2.0),
            _fractal_path(bottom, b, rng, 0.2, step=2.0)[1:],
        ]
    )
    alpha = _polygon((h, w), np.concatenate([path, [(b[0], -2.0), (a[0], -2.0)]]))
    rim = np.clip(ndimage.maximum_filter(alpha, 3) - alpha, 0, 1)
    # The fracture face shows only on the tile, not in the gap above its edge.
    rim *= np.clip(np.arange(h, dtype=np.float32)[:, None] - edge[None, :] + 0.5, 0, 1)
    return _lerp(c, scene.info["background"], alpha) + 18.0 * rim, 3.0


def _strip_crack(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    h, w = c.shape
    top = scene.info["edge"].max() + scene.info["chamfer"] + 6
    start = (rng.uniform(0.15, 0.85) * w, rng.uniform(top, h - 20))
    alpha = _crack(
        c.shape,
        rng,
        rng.uniform(40, 0.8 * max(h, w)),
        rng.uniform(1.0, 2.0),
        roughness=0.2,
        branches=(0, 2),
        start=start,
    )
    return c * (1 - alpha * rng.uniform(0.45, 0.65)), 3.0


def _strip_fray(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    h, w = c.shape
    edge = scene.info["edge"]
    span = int(rng.uniform(0.35, 0.7) * w)
    x0 = int(rng.integers(0, w - span + 1))
    ss = 4
    xs = np.arange(w * ss, dtype=np.float32) / ss
    t = np.clip((xs - x0) / span, 0, 1)
    taper = np.clip(np.sin(np.pi * t), 0, 1) ** 0.6
    rough = np.abs(ndimage.gaussian_filter1d(rng.standard_normal(w * ss), 1.5 * ss))
    rough = rough / (rough.max() + 1e-6)
    jag = np.abs(ndimage.gaussian_filter1d(rng.standard_normal(w * ss), 0.5 * ss))
    jag = jag / (jag.max() + 1e-6)
    depth = taper * (rng.uniform(3, 9) * rough + 3.0 * jag)
    new_edge = np.interp(xs, np.arange(w) + 0.5, edge) + depth
    ys = (np.arange(h * ss, dtype=np.float32)[:, None] + 0.5) / ss
    cut = (ys < new_edge[None, :]).astype(np.float32)
    alpha = cut.reshape(h, ss, w, ss).mean((1, 3))
    return _lerp(c, scene.info["background"], alpha), 3.0


def _strip_uneven(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    amp = rng.uniform(5, 9) * rng.choice([-1.0, 1.0])
    tol = max(1.5, 0.25 * abs(amp))
    alpha = _region(c.shape, rng, rng.uniform(0.1, 0.3), rng.uniform(35, 60), tol / abs(amp))
    # On the tile only: fade out across the chamfer, nothing in the gap above the edge.
    below = np.arange(c.shape[0], dtype=np.float32)[:, None] - scene.info["edge"][None, :]
    alpha = alpha * np.clip(below / scene.info["chamfer"], 0, 1)
    # Half of them are uneven gloss, which also flattens the grinding texture a little.
    glossy = rng.random() < 0.5
    base = _lerp(c, _blur(c, 1.5), alpha * 0.6) if glossy else c
    return _solid(c, base + amp * alpha, alpha * abs(amp) >= tol, tol, amp), tol


_WIRE_H = (40, 96)
_WIRE_W = (480, 960)


def _good_wire(rng: np.random.Generator) -> _Scene:
    """A flat-rolled wire seen from above: long and thin, of varying length and width."""
    h = int(rng.integers(_WIRE_H[0], _WIRE_H[1] + 1))
    w = int(rng.integers(_WIRE_W[0], _WIRE_W[1] + 1))
    base = rng.uniform(110, 140)
    surface = _rolled(rng, (h, w), base, (0.6, 16), (4.0, 7.0), (0.7, 3.0), (4, 10), 40)
    # Rounded long edges: darker towards both sides of the width.
    across = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    profile = -rng.uniform(16, 24) * across**4
    return _Scene(_u8(surface + profile[:, None] + _gauss(rng, (h, w), 1.0)))


def _wire_pit(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    return _pits(c, rng, int(rng.integers(1, 3)), (1.5, 4.0), 0.0, 1.5, 0.85), 3.0


def _wire_scratch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    h, w = c.shape
    start = (rng.uniform(0.1, 0.9) * w, rng.uniform(0.25, 0.75) * h)
    alpha = _crack(
        c.shape, rng, rng.uniform(15, 50), rng.uniform(0.8, 1.5), roughness=0.1,
        branches=(0, 0), start=start,
    )  # fmt: skip
    return c * (1 - alpha * rng.uniform(0.3, 0.5)), 3.0


def _wire_stain(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    h, w = c.shape
    amp = rng.uniform(8, 14) * rng.choice([-1.0, 1.0])
    tol = max(2.0, 0.25 * abs(amp))
    radius = rng.uniform(0.2, 0.4) * h
    center = (rng.uniform(0.3, 0.7) * h, rng.uniform(radius + 4, w - radius - 4))
    # A soft-edged blob: the tolerance contour lies inside its ramp.
    alpha = _blob(c.shape, center, radius, rng, irregular=0.3, soft=radius * 0.6, aspect=1.6)
    return _solid(c, c + amp * alpha, alpha * abs(amp) >= tol, tol, amp), tol


_KNURL = 1024


def _good_knurl(rng: np.random.Generator) -> _Scene:
    h = w = _KNURL
    period = np.float32(rng.uniform(21.5, 22.5))
    a = np.radians(30 + rng.uniform(-1, 1))
    ca, sa = np.float32(np.cos(a)), np.float32(np.sin(a))
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    pu, pv = rng.uniform(0, 1, 2).astype(np.float32)
    # Diamond knurl: pyramids between two families of grooves at +-30 degrees.
    fu = np.mod((xx * ca + yy * sa) / period + pu, 1.0) - 0.5
    fv = np.mod((xx * ca - yy * sa) / period + pv, 1.0) - 0.5
    tu, tv = 1 - 2 * np.abs(fu), 1 - 2 * np.abs(fv)
    on_u = tu < tv
    # Slope of the pyramid facet along x and y (height = min(tu, tv)).
    su = np.where(on_u, -np.sign(fu), 0).astype(np.float32)
    sv = np.where(on_u, 0, -np.sign(fv)).astype(np.float32)
    slope_x = (su + sv) * ca
    slope_y = (su - sv) * sa
    light = -(slope_x * -0.6 + slope_y * -0.8)  # light from the upper left
    groove = np.exp(-((np.minimum(tu, tv) / 0.12) ** 2))
    relief = ndimage.gaussian_filter(0.16 * light - 0.35 * groove, 0.7)
    base = rng.uniform(120, 140)
    grain = _normalize(ndimage.gaussian_filter(_gauss(rng, (h, w)), 1.0))
    img = (
        base * (1 + relief)
        + 2.5 * grain
        + _ramp((h, w), rng, rng.uniform(4, 12))
        + 4.0 * _smooth_field((h, w), 200, rng)
        + _gauss(rng, (h, w), 2.0)
    )
    return _Scene(_u8(img))


def _knurl_spot(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    new = c
    for _ in range(int(rng.integers(1, 3))):
        diameter = rng.uniform(3, 8)
        alpha = _blob(
            c.shape, _inside_point(c.shape, rng, 40), diameter / 2, rng, irregular=0.15, soft=0.9
        )
        new = new * (1 - alpha * rng.uniform(0.3, 0.55))
    return new, 3.0


def _knurl_speck(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    diameter = rng.uniform(3, 6.5)
    center = _inside_point(c.shape, rng, 40)
    alpha = _blob(
        c.shape,
        center,
        diameter / 2,
        rng,
        irregular=0.4,
        soft=0.7,
        harmonics=5,
        aspect=rng.uniform(1, 1.6),
        angle=rng.uniform(0, 3.2),
    )
    shadow = np.clip(ndimage.shift(alpha, (1.2, 1.0), order=1) - alpha, 0, 1)
    new = c * (1 - 0.35 * shadow)
    return _lerp(new, rng.uniform(205, 240), alpha * rng.uniform(0.75, 0.95)), 3.0


_PANEL = 320


def _good_panel(rng: np.random.Generator) -> _Scene:
    h = w = _PANEL
    colour = np.array([92, 110, 134], np.float32) * (1 + rng.normal(0, 0.012, 3)).astype(np.float32)
    peel = _fractal((h, w), rng.uniform(8, 12), rng, 3) * rng.uniform(2.0, 3.0)
    # A broad highlight band along a random line, as from a strip light.
    a = rng.uniform(0, np.pi)
    yy = np.arange(h, dtype=np.float32)[:, None] - rng.uniform(0.2, 0.8) * h
    xx = np.arange(w, dtype=np.float32)[None, :] - rng.uniform(0.2, 0.8) * w
    dist = xx * np.cos(a) + yy * np.sin(a)
    highlight = rng.uniform(5, 12) * np.exp(-((dist / rng.uniform(60, 110)) ** 2))
    light = _ramp((h, w), rng, rng.uniform(5, 11)) + highlight + peel
    rgb = colour * (1 + light / 110.0)[..., None] + _gauss(rng, (h, w, 3), 1.2)
    return _Scene(_u8(rgb))


def _panel_blotch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    amp = rng.uniform(4, 7) * rng.choice([-1.0, 1.0])
    tol = max(1.0, 0.25 * abs(amp))
    alpha = _region(c.shape[:2], rng, rng.uniform(0.1, 0.3), rng.uniform(45, 80), tol / abs(amp))
    ratio = c / c.mean((0, 1))  # keep the hue: an illumination change
    new = c + amp * alpha[..., None] * ratio
    return _solid(c, new, alpha * abs(amp) >= tol, tol, amp), tol


def _panel_gloss(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    amp = rng.uniform(3, 5)
    tol = 1.5
    alpha = _region(c.shape[:2], rng, rng.uniform(0.08, 0.25), rng.uniform(35, 60), tol / amp)
    hazy = _lerp(c, _blur(c, 2.5), alpha * 0.7)
    return _solid(c, hazy + amp * alpha[..., None], alpha * amp >= tol, tol, 1.0), tol


def _panel_tint(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    e1 = np.array([1, -1, 0], np.float32) / np.sqrt(2)
    e2 = np.array([1, 1, -2], np.float32) / np.sqrt(6)
    shift = (np.cos(a) * e1 + np.sin(a) * e2) * rng.uniform(5, 8)
    peak = float(np.abs(shift).max())
    tol = max(1.5, 0.3 * peak)
    alpha = _region(c.shape[:2], rng, rng.uniform(0.05, 0.2), rng.uniform(30, 55), tol / peak)
    new = c + alpha[..., None] * shift
    return _solid(c, new, alpha * peak >= tol, tol, shift), tol


# --------------------------------------------------------------------------------------------
# Object: a gear on a mat
# --------------------------------------------------------------------------------------------

_GEAR = 320
_GEAR_TEETH = 18


def _gear_layers(p: dict[str, Any], bite: np.ndarray | None = None) -> dict[str, np.ndarray]:
    n = _GEAR
    yy = np.arange(n, dtype=np.float32)[:, None] + 0.5 - p["cy"]
    xx = np.arange(n, dtype=np.float32)[None, :] + 0.5 - p["cx"]
    r = np.hypot(xx, yy)
    rot = p["rot"]
    u = xx * np.cos(rot) + yy * np.sin(rot)  # gear coordinates
    v = -xx * np.sin(rot) + yy * np.cos(rot)
    theta = np.arctan2(v, u)
    big_r, th = p["R"], p["th"]
    t = np.mod(theta * _GEAR_TEETH / (2 * np.pi), 1.0)
    prof = np.clip((0.3 - np.abs(t - 0.5)) / 0.1, 0, 1)
    r_out = big_r - th + th * prof
    outer = np.clip(r_out - r + 0.5, 0, 1)
    rb = 0.25 * big_r
    bore = np.clip(rb - r + 0.5, 0, 1)
    key = (
        np.clip(0.05 * big_r - np.abs(v) + 0.5, 0, 1)
        * np.clip(rb + 0.09 * big_r - u + 0.5, 0, 1)
        * (u > 0)
    )
    bore = np.maximum(bore, key)
    holes = np.zeros_like(r)
    for k in range(5):
        ang = 2 * np.pi * k / 5 + np.pi / 5
        hx, hy = 0.6 * big_r * np.cos(ang), 0.6 * big_r * np.sin(ang)
        holes = np.maximum(holes, np.clip(0.13 * big_r - np.hypot(u - hx, v - hy) + 0.5, 0, 1))
    cover = outer * (1 - bore) * (1 - holes)
    if bite is not None:
        cover = cover * (1 - bite)
    # Face shading: a shallow cone lit from p["light"], a brighter hub, a groove at the root.
    world = np.arctan2(yy, xx)
    face = 0.9 + 0.12 * np.cos(world - p["light"]) * np.clip(r / big_r, 0, 1)
    hub = np.clip(r - rb + 0.5, 0, 1) * np.clip(0.4 * big_r - r + 0.5, 0, 1)
    groove = np.clip(1.5 - np.abs(r - (big_r - th - 5)), 0, 1)
    edge = np.clip(r_out - r, 0, 3) / 3
    shade = face * (1 + 0.12 * hub) * (1 - 0.18 * groove) * (0.78 + 0.22 * edge)
    return {"cover": cover.astype(np.float32), "shade": shade.astype(np.float32)}


def _gear_render(p: dict[str, Any], bite: np.ndarray | None = None) -> np.ndarray:
    layers = _gear_layers(p, bite)
    cover = layers["cover"]
    shadow = ndimage.shift(ndimage.gaussian_filter(cover, 3.5), (5.0, 4.0), order=1)
    bg = p["bg"] * (1 + p["bg_ramp"])[..., None] * (1 - 0.45 * shadow)[..., None]
    metal = p["tint"] * (layers["shade"] * (1 + 0.03 * p["grain"]))[..., None]
    return bg * (1 - cover)[..., None] + metal * cover[..., None] + p["noise"]


def _good_gear(rng: np.random.Generator) -> _Scene:
    s = rng.uniform(0.96, 1.04)
    shape = (_GEAR, _GEAR)
    p: dict[str, Any] = {
        "cx": _GEAR / 2 + rng.uniform(-10, 10),
        "cy": _GEAR / 2 + rng.uniform(-10, 10),
        "R": 108.0 * s,
        "th": 13.0 * s,
        "rot": rng.uniform(-0.35, 0.35),
        "light": -2.3 + rng.uniform(-0.2, 0.2),
        "tint": np.array([192, 152, 84], np.float32)
        * (1 + rng.normal(0, 0.015, 3)).astype(np.float32),
        "bg": np.array([60, 70, 74], np.float32) * rng.uniform(0.94, 1.06),
        "bg_ramp": _ramp(shape, rng, 0.06),
        "grain": _fractal(shape, 6, rng, 2),
        "noise": _gauss(rng, (*shape, 3), 2.0),
    }
    return _Scene(_u8(_gear_render(p)), {"params": p})


def _gear_missing(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    p = scene.info["params"]
    ang = rng.uniform(0, 2 * np.pi)
    rad = p["R"] - p["th"] * rng.uniform(0.1, 0.6)
    center = (p["cy"] + rad * np.sin(ang), p["cx"] + rad * np.cos(ang))
    bite = _blob(
        (_GEAR, _GEAR),
        center,
        p["th"] * rng.uniform(0.9, 1.8),
        rng,
        irregular=0.4,
        soft=0.7,
        harmonics=8,
    )
    return _gear_render(p, bite), 3.0


def _gear_face_point(p: dict[str, Any], rng: np.random.Generator) -> tuple[float, float]:
    ang = rng.uniform(0, 2 * np.pi)
    rad = p["R"] * rng.uniform(0.32, 0.78)
    return p["cy"] + rad * np.sin(ang), p["cx"] + rad * np.cos(ang)


def _gear_contamination(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    p = scene.info["params"]
    shape = c.shape[:2]
    cy, cx = _gear_face_point(p, rng)
    if rng.random() < 0.6:  # an oily or dirty smear
        alpha = _blob(
            shape,
            (cy, cx),
            rng.uniform(4, 12),
            rng,
            irregular=0.45,
            soft=1.2,
            aspect=rng.uniform(1, 2),
            angle=rng.uniform(0, 3.2),
        )
        colour = np.array([46, 34, 24], np.float32) * rng.uniform(0.8, 1.2)
        return _lerp(c, colour, alpha * rng.uniform(0.5, 0.85)), 3.0
    # a fibre
    a = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(30, 70)
    p0 = np.array([cx, cy])
    p3 = p0 + length * np.array([np.cos(a), np.sin(a)])
    bend = rng.normal(0, 0.3 * length, (2, 2))
    ctrl = np.array([p0, p0 + (p3 - p0) / 3 + bend[0], p0 + 2 * (p3 - p0) / 3 + bend[1], p3])
    alpha = _stroke(shape, _bezier(ctrl), rng.uniform(1.0, 1.6))
    return _lerp(c, np.array([30, 30, 34], np.float32), alpha * 0.85), 3.0


def _gear_scratch(scene: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    c = scene.image.astype(np.float32)
    p = scene.info["params"]
    shape = c.shape[:2]
    cy, cx = _gear_face_point(p, rng)
    a = rng.uniform(0, 2 * np.pi)
    length = rng.uniform(20, 55)
    d = np.array([np.cos(a), np.sin(a)])
    mid = np.array([cx, cy])
    bend = rng.normal(0, 0.06 * length)
    normal = np.array([-d[1], d[0]])
    ctrl = np.array(
        [
            mid - d * length / 2,
            mid - d * length / 6 + normal * bend,
            mid + d * length / 6 + normal * bend,
            mid + d * length / 2,
        ]
    )
    alpha = _stroke(shape, _bezier(ctrl, 120), rng.uniform(0.9, 1.6))
    solid = ndimage.minimum_filter(_gear_layers(p)["cover"], 5)
    return _plus(c, alpha * solid * rng.uniform(35, 60)), 3.0


# --------------------------------------------------------------------------------------------
# The categories
# --------------------------------------------------------------------------------------------


def _spec(
    name: str,
    kind: str,
    description: str,
    color: bool,
    sizes: str,
    n_train: int,
    n_test_good: int,
    good: Callable[[np.random.Generator], _Scene],
    defects: Mapping[str, tuple[int, DefectFn]],
    min_area: int = 6,
) -> CategorySpec:
    return CategorySpec(
        name=name,
        kind=kind,
        description=description,
        color=color,
        sizes=sizes,
        n_train=n_train,
        n_test_good=n_test_good,
        defects={k: n for k, (n, _) in defects.items()},
        good=good,
        defect_fns={k: fn for k, (_, fn) in defects.items()},
        min_area=min_area,
    )


CATEGORIES: dict[str, CategorySpec] = {
    s.name: s
    for s in (
        _spec(
            "brick",
            "texture",
            "texture, colour: brick wall photo crops; branching cracks, damp/salt stains, "
            "chipped spalls",
            True,
            "256x256",
            100,
            25,
            _good_brick,
            {"crack": (15, _brick_crack), "stain": (15, _brick_stain), "chip": (15, _brick_chip)},
        ),
        _spec(
            "grass",
            "texture",
            "texture, colour: grass photo crops; thin foreign hairs, brown burnt patches, "
            "pebble debris",
            True,
            "256x256",
            90,
            25,
            _good_grass,
            {"hair": (12, _grass_hair), "burn": (12, _grass_burn), "debris": (12, _grass_debris)},
        ),
        _spec(
            "gravel",
            "texture",
            "texture, grayscale: gravel photo crops; shaded pits, oily darkening, flat "
            "foreign shards",
            False,
            "320x320",
            90,
            25,
            _good_gravel,
            {
                "hole": (12, _gravel_hole),
                "oil": (12, _gravel_oil),
                "foreign": (12, _gravel_foreign),
            },
        ),
        _spec(
            "brushed_steel",
            "surface",
            "surface, grayscale: brushed/rolled steel with illumination gradients; long "
            "1-3 px scratches, faint hairline cracks, shaded dents",
            False,
            "384x384",
            100,
            25,
            _good_steel,
            {
                "scratch": (15, _steel_scratch),
                "hairline": (15, _steel_hairline),
                "dent": (15, _steel_dent),
            },
        ),
        _spec(
            "strips",
            "surface",
            "surface, grayscale, varying non-square sizes (W 120-600 x H 250-280): tile "
            "strips with a chamfered edge; blowholes, edge breaks, cracks, frayed edges, "
            "large low-contrast uneven regions",
            False,
            "W 120-600 x H 250-280",
            100,
            25,
            _good_strip,
            {
                "blowhole": (10, _strip_blowhole),
                "break": (10, _strip_break),
                "crack": (10, _strip_crack),
                "fray": (10, _strip_fray),
                "uneven": (10, _strip_uneven),
            },
        ),
        _spec(
            "wire",
            "surface",
            "surface, grayscale, long and thin of varying size (W 480-960 x H 40-96): "
            "flat-rolled wire; small pits, short scratches, low-contrast stains",
            False,
            "W 480-960 x H 40-96",
            100,
            25,
            _good_wire,
            {
                "pit": (10, _wire_pit),
                "scratch": (10, _wire_scratch),
                "stain": (10, _wire_stain),
            },
        ),
        _spec(
            "knurl_tiny",
            "surface",
            "surface/procedural texture, grayscale, 1024x1024 knurled metal; tiny 3-8 px "
            "dark spots and bright specks",
            False,
            "1024x1024",
            40,
            12,
            _good_knurl,
            {"spot": (10, _knurl_spot), "speck": (10, _knurl_speck)},
        ),
        _spec(
            "coated_panel",
            "surface",
            "surface/procedural texture, colour: orange-peel painted panel with varying "
            "highlights; low-contrast blotches, uneven gloss, slight colour shifts",
            True,
            "320x320",
            100,
            25,
            _good_panel,
            {"blotch": (12, _panel_blotch), "gloss": (12, _panel_gloss), "tint": (12, _panel_tint)},
            min_area=200,
        ),
        _spec(
            "gear",
            "object",
            "object, colour: a brass gear on a mat with pose jitter (shift, rotation, "
            "scale); missing pieces, contamination, small scratches",
            True,
            "320x320",
            100,
            25,
            _good_gear,
            {
                "missing": (12, _gear_missing),
                "contamination": (12, _gear_contamination),
                "scratch": (12, _gear_scratch),
            },
        ),
    )
}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _spec_for(name: str) -> CategorySpec:
    if name not in CATEGORIES:
        raise ValueError(f"unknown category {name!r}; expected one of {', '.join(CATEGORIES)}")
    return CATEGORIES[name]


def make_sample(
    name: str, defect_type: str, index: int, seed: int = 0, split: str = "test"
) -> Sample:
    """One image of a category, exactly as ``build_category`` writes it.

    ``defect_type`` "good" gives a good image of ``split`` ("train" or "test"); any other type
    gives a defective test image together with the clean image it was painted on.
    """
    spec = _spec_for(name)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if defect_type == "good":
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {split!r}")
        scene = spec.good(_rng(seed, name, f"{split}/good", index))
        empty = np.zeros(scene.image.shape[:2], bool)
        return Sample(scene.image, scene.image, empty, "good")
    if defect_type not in spec.defect_fns:
        raise ValueError(
            f"{name} has no defect type {defect_type!r}; expected one of "
            f"{', '.join(spec.defect_fns)}"
        )
    rng = _rng(seed, name, f"test/{defect_type}", index)
    scene = spec.good(rng)
    for _ in range(20):
        new, tol = spec.defect_fns[defect_type](scene, rng)
        image, mask = _finish(scene.image, new, tol)
        if mask.sum() >= spec.min_area:
            return Sample(scene.image, image, mask, defect_type)
    raise RuntimeError(f"{name}/{defect_type}/{index}: no visible defect in 20 tries")


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp of a built category folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(path) / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _save(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, compress_level=3)


def _stamp_matches(stamp: dict[str, Any] | None, name: str, seed: int, scale: float) -> bool:
    return bool(
        stamp
        and stamp.get("version") == VERSION
        and stamp.get("category") == name
        and stamp.get("seed") == seed
        and stamp.get("scale") == scale
    )


def build_category(name: str, root: str | Path, seed: int = 0, scale: float = 1.0) -> Path:
    """Write category ``name`` under ``root/name`` (skipped when already built identically).

    ``scale`` multiplies the image counts (at least 2 train, 1 test good and 1 per defect
    type), for quick tests; image sizes do not change.
    """
    spec = _spec_for(name)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    scale = float(scale)
    root = Path(root)
    dest = root / name
    if _stamp_matches(read_stamp(dest), name, seed, scale):
        return dest
    if dest.exists() and read_stamp(dest) is None and any(dest.iterdir()):
        raise FileExistsError(
            f"{dest} exists and was not written by benchmarks/categories.py "
            f"(no {STAMP_NAME}); refusing to replace it"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{name}.building-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    started = time.perf_counter()
    counts = spec.counts(scale)
    sizes: set[tuple[int, int]] = set()
    mask_fraction: dict[str, list[float]] = {}
    try:
        for folder, n in counts.items():
            out = tmp / folder
            out.mkdir(parents=True)
            kind = folder.split("/")[1]
            if kind != "good":
                (tmp / "ground_truth" / kind).mkdir(parents=True)
            for i in range(n):
                split = folder.split("/")[0]
                sample = make_sample(name, kind, i, seed, split=split)
                sizes.add(sample.image.shape[:2])
                _save(sample.image, out / f"{i:03d}.png")
                if kind != "good":
                    _save(
                        sample.mask.astype(np.uint8) * 255,
                        tmp / "ground_truth" / kind / f"{i:03d}_mask.png",
                    )
                    mask_fraction.setdefault(kind, []).append(float(sample.mask.mean()))
        heights = [s[0] for s in sizes]
        widths = [s[1] for s in sizes]
        stamp = {
            "generator": "benchmarks/categories.py",
            "version": VERSION,
            "category": name,
            "seed": seed,
            "scale": scale,
            "kind": spec.kind,
            "description": spec.description,
            "color": spec.color,
            "counts": counts,
            "defect_types": list(spec.defects),
            "distinct_sizes": len(sizes),
            "height_range": [min(heights), max(heights)],
            "width_range": [min(widths), max(widths)],
            "mean_mask_fraction": {
                k: round(float(np.mean(v)), 5) for k, v in mask_fraction.items()
            },
            "build_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same category first.
            if not _stamp_matches(read_stamp(dest), name, seed, scale):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_all(
    root: str | Path, seed: int = 0, names: Sequence[str] | None = None, scale: float = 1.0
) -> list[Path]:
    """Build every category (or ``names``) under ``root``; returns their folders."""
    chosen = list(CATEGORIES) if names is None else list(names)
    for name in chosen:
        _spec_for(name)
    return [build_category(name, root, seed=seed, scale=scale) for name in chosen]


def _summary_line(path: Path) -> str:
    s = read_stamp(path) or {}
    counts = s.get("counts", {})
    defective = {
        k.split("/")[1]: v for k, v in counts.items() if k.startswith("test/") and k != "test/good"
    }
    h, w = s.get("height_range", [0, 0]), s.get("width_range", [0, 0])
    size = (
        f"{w[0]}x{h[0]}"
        if h[0] == h[1] and w[0] == w[1]
        else (f"{s.get('distinct_sizes')} sizes, W {w[0]}-{w[1]} x H {h[0]}-{h[1]}")
    )
    types = ", ".join(
        f"{k} {n} ({100 * s.get('mean_mask_fraction', {}).get(k, 0):.2f}%)"
        for k, n in defective.items()
    )
    return (
        f"{path.name:14s} {s.get('kind', '?'):8s} {'RGB ' if s.get('color') else 'gray'} "
        f"train {counts.get('train/good', 0):3d}  test good {counts.get('test/good', 0):3d}  "
        f"defective {sum(defective.values()):3d}  {size}\n"
        f"{'':14s} defects (mean mask area): {types}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to build the categories in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the image counts")
    parser.add_argument(
        "--names", default=None, help=f"comma-separated subset of: {', '.join(CATEGORIES)}"
    )
    args = parser.parse_args(argv)
    names = args.names.split(",") if args.names else None
    started = time.perf_counter()
    try:
        paths = build_all(args.root, seed=args.seed, names=names, scale=args.scale)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(_summary_line(path))
    print(f"{len(paths)} categories in {args.root} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
