"""A synthetic demo dataset in the MVTec AD layout, made offline from scikit-image's CC0 textures.

Good images are random crops (with flips and a small brightness change) of ``skimage.data``'s
``brick``, ``grass`` or ``gravel`` photographs, tinted so that they are colour images. Defects are
painted onto a good image and their masks are exact: a mask pixel is a pixel that was changed,
and no pixel outside the mask was touched.

* ``scratch``: a thin (about 1% of the side) bright or dark curved line.
* ``spot``: one or two irregular dark or coloured blobs.
* ``patch``: a square pasted from another texture or, on the oriented ``brick``, sometimes a
  region of the same texture turned by 90 degrees.

Each defect covers roughly 0.2% to 5% of the image. Every image is drawn from its own generator,
seeded by (seed, texture, split, index), so the same arguments always write the same bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

from defectscope.errors import DatasetError

# Multiplied into the grey texture: a plausible colour for each material.
TEXTURES: dict[str, tuple[float, float, float]] = {
    "brick": (1.0, 0.78, 0.66),
    "grass": (0.74, 1.0, 0.6),
    "gravel": (0.96, 0.92, 0.85),
}
DEFECT_TYPES = ("scratch", "spot", "patch")
MANIFEST_NAME = "synthetic.json"
_SPLIT_CODES = {"train/good": 0, "test/good": 1, "test/scratch": 2, "test/spot": 3, "test/patch": 4}
_SPOT_COLOURS = ((165, 78, 28), (48, 78, 196), (30, 30, 30))


@dataclass(frozen=True)
class SyntheticImage:
    clean: np.ndarray  # RGB uint8, the good image the defect was painted on
    image: np.ndarray  # RGB uint8, equal to clean outside the mask
    mask: np.ndarray  # bool (H, W): exactly the pixels where image != clean
    defect_type: str  # "good" when no defect was painted


@lru_cache(maxsize=8)
def _texture(name: str, size: int) -> np.ndarray:
    """The tinted texture as float32 RGB, upscaled when a crop of ``size`` would not fit."""
    if name not in TEXTURES:
        raise DatasetError(f"unknown texture {name!r}; expected one of {', '.join(TEXTURES)}")
    gray = getattr(skdata, name)()
    if size > min(gray.shape):
        factor = -(-size // min(gray.shape))
        shape = (gray.shape[1] * factor, gray.shape[0] * factor)
        gray = np.asarray(Image.fromarray(gray).resize(shape, Image.Resampling.BICUBIC))
    rgb = gray.astype(np.float32)[..., None] * np.asarray(TEXTURES[name], dtype=np.float32)
    rgb.setflags(write=False)
    return rgb


def _crop(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(0, texture.shape[0] - size + 1))
    left = int(rng.integers(0, texture.shape[1] - size + 1))
    return texture[top : top + size, left : left + size]


def _good(texture: str, size: int, rng: np.random.Generator) -> np.ndarray:
    crop = _crop(_texture(texture, size), size, rng)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    factor = rng.uniform(0.93, 1.07)
    return np.clip(np.rint(crop * factor), 0, 255).astype(np.uint8)


def _scratch(
    clean: np.ndarray, rng: np.random.Generator, texture: str
) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    length = size * rng.uniform(0.3, 0.55)
    angle = rng.uniform(0, np.pi)
    centre = rng.uniform(0.25 * size, 0.75 * size, size=2)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    start, end = centre - direction * length / 2, centre + direction * length / 2
    # A quadratic Bezier bowed sideways: a curved, not ruler-straight, scratch.
    control = centre + normal * length * rng.uniform(-0.3, 0.3)
    t = np.linspace(0, 1, int(length * 2))[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
    margin = _margin(size)
    low, high = points.min(axis=0), points.max(axis=0)
    points += np.maximum(margin - low, 0) + np.minimum(size - 1 - margin - high, 0)
    mask = np.zeros(clean.shape[:2], dtype=bool)
    rows, cols = np.rint(points).astype(int).T
    keep = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    mask[rows[keep], cols[keep]] = True
    radius = max(1, round(size / 128))
    mask = ndimage.binary_dilation(mask, structure=_disk(radius))
    value = 245.0 if rng.random() < 0.5 else 15.0
    painted = clean.astype(np.float32)
    painted[mask] = 0.15 * painted[mask] + 0.85 * value
    return painted, mask


def _spot(
    clean: np.ndarray, rng: np.random.Generator, texture: str
) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    mask = np.zeros(clean.shape[:2], dtype=bool)
    margin = _margin(size)
    rows, cols = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(1, 3))):
        radius = size * rng.uniform(0.035, 0.065)
        cy, cx = rng.uniform(margin + radius, size - margin - radius, size=2)
        theta = np.arctan2(rows - cy, cols - cx)
        # A wobbly outline: a disk whose radius varies with a few random harmonics.
        wobble = sum(
            rng.uniform(0.05, 0.15) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
            for k in (2, 3, 5)
        )
        mask |= np.hypot(rows - cy, cols - cx) <= radius * (1 + wobble)
    colour = np.asarray(_SPOT_COLOURS[int(rng.integers(len(_SPOT_COLOURS)))], dtype=np.float32)
    painted = clean.astype(np.float32)
    # Keep a little of the texture under the stain so that it looks like a stain, not a sticker.
    painted[mask] = 0.2 * painted[mask] + 0.8 * colour
    return painted, mask


def _patch(
    clean: np.ndarray, rng: np.random.Generator, texture: str
) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    side = max(8, round(size * rng.uniform(0.1, 0.17)))
    margin = _margin(size)
    top, left = (int(v) for v in rng.integers(margin, size - margin - side + 1, size=2))
    # Turned regions are only visible on oriented textures; elsewhere paste a foreign material.
    if texture == "brick" and rng.random() < 0.5:
        # The most contrasted of a few candidates: a turned plain brick would be invisible.
        candidates = [_crop(_texture(texture, size), side, rng) for _ in range(6)]
        source = np.rot90(max(candidates, key=lambda crop: float(crop.std())))
    else:
        others = [name for name in TEXTURES if name != texture]
        source = _crop(_texture(others[int(rng.integers(len(others)))], size), side, rng)
    mask = np.zeros(clean.shape[:2], dtype=bool)
    mask[top : top + side, left : left + side] = True
    painted = clean.astype(np.float32)
    painted[top : top + side, left : left + side] = source
    return painted, mask


_DEFECTS = {"scratch": _scratch, "spot": _spot, "patch": _patch}


def _margin(size: int) -> int:
    # Defects stay off the border, where CNN features are distorted by padding anyway.
    return round(0.08 * size)


def _disk(radius: int) -> np.ndarray:
    footprint = np.zeros((2 * radius + 1,) * 2, dtype=bool)
    footprint[draw.disk((radius, radius), radius + 0.5, shape=footprint.shape)] = True
    return footprint


def render(
    texture: str, defect_type: str | None, *, size: int = 256, seed: int | Sequence[int] = 0
) -> SyntheticImage:
    """One good image and, unless ``defect_type`` is None or "good", a defect painted onto it."""
    if size < 64:
        raise DatasetError(f"synthetic images need size >= 64, got {size}")
    rng = np.random.default_rng(seed)
    clean = _good(texture, size, rng)
    if defect_type in (None, "good"):
        return SyntheticImage(clean, clean, np.zeros(clean.shape[:2], dtype=bool), "good")
    if defect_type not in _DEFECTS:
        raise DatasetError(f"unknown defect type {defect_type!r}; expected one of {DEFECT_TYPES}")
    painted, mask = _DEFECTS[defect_type](clean, rng, texture)
    image = np.clip(np.rint(painted), 0, 255).astype(np.uint8)
    image[~mask] = clean[~mask]
    # A painted pixel may round back to its old value; nudge it so the mask stays exact.
    unchanged = mask & (image == clean).all(axis=-1)
    image[unchanged] = np.where(
        clean[unchanged] > 127, clean[unchanged] - 48, clean[unchanged] + 48
    )
    return SyntheticImage(clean, image, mask, defect_type)


def make_synthetic_dataset(
    out_dir: str | Path,
    *,
    texture: str = "brick",
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_defect: int = 15,
    size: int = 256,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
    overwrite: bool = False,
) -> Path:
    """Write an MVTec AD style category to ``out_dir`` and return ``out_dir``.

    ``n_test_defect`` images are spread over ``defect_types`` in turn. ``synthetic.json`` records
    the arguments and, per image, the seed that :func:`render` reproduces it from. A non-empty
    ``out_dir`` is refused unless ``overwrite``, which replaces only train/, test/, ground_truth/.
    """
    if texture not in TEXTURES:
        raise DatasetError(f"unknown texture {texture!r}; expected one of {', '.join(TEXTURES)}")
    unknown = [d for d in defect_types if d not in _DEFECTS]
    if unknown or not defect_types:
        raise DatasetError(f"defect types must be a non-empty subset of {DEFECT_TYPES}")
    if n_train < 1 or min(n_test_good, n_test_defect) < 0:
        raise DatasetError("n_train must be >= 1 and test counts >= 0")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DatasetError(f"{out} is not empty (pass overwrite=True to replace it)")
        for sub in ("train", "test", "ground_truth", MANIFEST_NAME):
            target = out / sub
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    plan: list[tuple[str, int, str | None]] = [("train/good", i, None) for i in range(n_train)]
    plan += [("test/good", i, None) for i in range(n_test_good)]
    counters = dict.fromkeys(defect_types, 0)
    for i in range(n_test_defect):
        defect_type = defect_types[i % len(defect_types)]
        plan.append((f"test/{defect_type}", counters[defect_type], defect_type))
        counters[defect_type] += 1

    images: dict[str, dict[str, object]] = {}
    for folder, index, defect in plan:
        key = [seed, list(TEXTURES).index(texture), _SPLIT_CODES[folder], index]
        sample = render(texture, defect, size=size, seed=key)
        name = f"{index:03d}.png"
        _save(sample.image, out / folder / name)
        entry: dict[str, object] = {"seed": key}
        if defect is not None:
            _save(
                sample.mask.astype(np.uint8) * 255,
                out / "ground_truth" / defect / f"{index:03d}_mask.png",
            )
            entry["defect_area"] = round(float(sample.mask.mean()), 5)
        images[f"{folder}/{name}"] = entry

    manifest = {
        "generator": "defectscope.data.synthetic",
        "texture": texture,
        "size": size,
        "seed": seed,
        "counts": {"train": n_train, "test_good": n_test_good, "test_defect": n_test_defect},
        "images": images,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
