"""Fitting from a few good images: augmented views in the bank, chosen like auto mode.

With fewer than ``auto.min_images`` images, auto mode has too few to hold out, and a bank of a
handful of images misses the poses a product takes. The few-shot fit instead:

* keeps every patch (up to ``few_shot.bank_size``): a 2 % coreset of one image is 20 patches;
* puts flipped or rotated views of each image in the bank when synthetic defects show that
  this helps. A view set is judged by the same test as auto mode's candidates: defects are
  painted on good content the bank has not seen and the set must separate (image AUROC) and
  localise (pixel AUROC) them better than the plain bank by ``few_shot.margin``. The unseen
  content is another training image (each fold holds one out; the bank is the others' views).
  With a single image it is the image's other half: each half is scored against the views
  of the rest of the image (a band around the cut left out, as patches see across it). That is
  the only good content one image offers that the bank has not seen, and it assumes nothing
  about which poses are normal: views win only if they make one part of the product explain
  another (rotated or mirrored structure, parts at other angles);
* calibrates on jittered views (small rotations, shifts and scales) of each image scored
  against the bank without any of that image's views (``leave_one_out``): from n images the
  plain leave-one-out threshold is the highest of n scores, which a new good image exceeds
  about 1 time in n+1, far above a 1 % target;
* calibrates without a second image when it must: ``halves`` takes the scores of the image's
  halves against the rest of it, measured by the choice above (the bank of a half is smaller
  than the fit's, so the threshold errs high); ``views`` scores jittered views of each image
  (small rotations and shifts, none of them in the bank) against the bank, which errs low, as
  the image itself is in the bank.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.config import DetectorConfig, FewShotConfig
from defectscope.data.io import ImageInput
from defectscope.data.loading import iter_loaded
from defectscope.detector.parts import FeatureParts
from defectscope.detector.scoring import AnomalyScorer
from defectscope.detector.selection import SelectionResult, _at_input_scale
from defectscope.errors import DefectscopeError
from defectscope.features.backbones import FeatureBackbone

# A view is "id", "hflip", "vflip" or "r<degrees>" (counter-clockwise rotation).
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "none": ("id",),
    "flips": ("id", "hflip", "vflip", "r180"),
    "rot90": ("id", "r90", "r180", "r270"),
    "rot45": tuple(["id"] + [f"r{a}" for a in range(45, 360, 45)]),
    "rot30": tuple(["id"] + [f"r{a}" for a in range(30, 360, 30)]),
}
DESCRIPTIONS = {
    "none": "the training images as they are",
    "flips": "plus mirror images and 180 degree turns",
    "rot90": "plus rotations by 90 degree steps",
    "rot45": "plus rotations by 45 degree steps",
    "rot30": "plus rotations by 30 degree steps",
}
# Rows of a comparison bank, for the images as they are and again for the added views: the
# comparison ranks view sets, it does not need the fit's bank.
CHECK_ROWS = 8192
# Each held-out part is also scored jittered, so that a fold has more than one good sample.
CHECK_JITTERS = 2


def applies(config: DetectorConfig, n_images: int) -> bool:
    """Whether a training set of ``n_images`` is fitted the few-shot way."""
    return config.few_shot.enabled and 0 < n_images < config.auto.min_images


def calibration_method(config: FewShotConfig, n_images: int) -> str:
    """The calibration of a few-shot fit of ``n_images`` images."""
    if config.calibration == "auto":
        # Jittered views of an image in the bank score lower than a new good image does.
        return "leave_one_out" if n_images >= config.loo_min_images else "halves"
    if config.calibration == "leave_one_out" and n_images < 2:
        raise DefectscopeError(
            "few_shot.calibration='leave_one_out' needs at least 2 good images; use 'halves', "
            "'views' or 'auto' to fit from one"
        )
    if config.calibration == "halves" and n_images != 1:
        raise DefectscopeError(
            f"few_shot.calibration='halves' splits a single image; {n_images} were given"
        )
    return config.calibration


# ---------------------------------------------------------------------------------- views
def apply_view(batch: torch.Tensor, view: str) -> torch.Tensor:
    """``batch`` (B, C, H, W) seen as ``view``; quarter turns are exact, other angles are
    resampled with reflected borders."""
    if view == "id":
        return batch
    if view == "hflip":
        return batch.flip(-1)
    if view == "vflip":
        return batch.flip(-2)
    if not view.startswith("r"):
        raise ValueError(f"unknown view {view!r}")
    degrees = float(view[1:]) % 360
    if degrees % 90 == 0:
        turns = int(degrees // 90)
        if turns % 2 and batch.shape[-1] != batch.shape[-2]:
            raise ValueError("quarter turns need a square input")
        return torch.rot90(batch, turns, dims=(-2, -1))
    return affine(batch, degrees, (0.0, 0.0), 1.0)


def affine(
    batch: torch.Tensor, degrees: float, shift: tuple[float, float], scale: float
) -> torch.Tensor:
    """Rotate (counter-clockwise), scale and shift (fractions of the side) about the centre."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor(
        [[cos, -sin, -2 * shift[1]], [sin, cos, -2 * shift[0]]],
        dtype=batch.dtype,
        device=batch.device,
    )
    grid = F.affine_grid(theta.expand(batch.shape[0], 2, 3), list(batch.shape), align_corners=False)
    return F.grid_sample(batch, grid, padding_mode="reflection", align_corners=False)


def jittered_views(batch: torch.Tensor, count: int, seed: int) -> list[torch.Tensor]:
    """``count`` small random poses of ``batch`` (rotation up to 8 degrees, shift up to 4 %,
    scale within 4 %): good views a bank of the image itself has not seen."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append(
            affine(
                batch,
                float(rng.uniform(-8, 8)),
                (float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
                float(rng.uniform(0.96, 1.04)),
            )
        )
    return out


def view_embeddings(
    parts: FeatureParts,
    plain: torch.Tensor,
    inputs: torch.Tensor | None,
    views: Sequence[str],
) -> Iterator[torch.Tensor]:
    """Embeddings (B, D, h, w) on the CPU of each view of a batch: ``plain`` is the "id" view
    already embedded, ``inputs`` the preprocessed images (needed for any other view)."""
    for view in views:
        if view == "id":
            yield plain.cpu()
        elif inputs is None:
            raise ValueError(f"view {view!r} needs the preprocessed images")
        else:
            yield parts.embed(apply_view(inputs, view)).cpu()


def jittered_embeddings(
    parts: FeatureParts, image: torch.Tensor, plan: Any, image_id: int
) -> torch.Tensor:
    """Embeddings of ``plan.calibration_views`` jittered views of one preprocessed image
    (C, H, W), seeded by the plan and the image, for 'views' calibration."""
    views = jittered_views(image[None], plan.calibration_views, plan.seed + image_id)
    return parts.embed(torch.cat(views)).cpu()


def view_origins(view: str, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 2) position (y, x in [-1, 1]) in the original image of each patch of ``view``."""
    height, width = size
    ys = torch.linspace(-1, 1, height).view(height, 1).expand(height, width)
    xs = torch.linspace(-1, 1, width).view(1, width).expand(height, width)
    coords = apply_view(torch.stack([ys, xs])[None], view)
    pooled = F.adaptive_avg_pool2d(coords, grid)[0]
    return pooled.permute(1, 2, 0).reshape(-1, 2)


def usable_sets(names: Sequence[str], size: tuple[int, int]) -> list[str]:
    """The view sets that fit an input of ``size``: rotations need a square one."""
    return [n for n in names if n in ("none", "flips") or size[0] == size[1]]


# ------------------------------------------------------------------------------ selection
def select_views(
    backbone: FeatureBackbone,
    config: DetectorConfig,
    device: torch.device,
    images: Sequence[ImageInput],
    geometry: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> SelectionResult:
    """The few-shot choice for ``images``: view set and calibration, with what was measured."""
    start = time.perf_counter()
    fs = config.few_shot
    n_given = len(images)
    calibration = calibration_method(fs, n_given)
    parts = FeatureParts.build(backbone, config.features, device, config.half_precision)
    size = parts.preprocessor.input_size
    head = (
        f"{n_given} training image{'s' if n_given != 1 else ''}, fewer than "
        f"auto.min_images={config.auto.min_images}: few-shot fit (every patch up to "
        f"{fs.bank_size} in the bank, {calibration} calibration)"
    )

    def result(
        chosen: str, reason: str, goods: dict[str, list[float]] | None = None, **extra: Any
    ) -> SelectionResult:
        info: dict[str, Any] = {
            "views": list(VIEW_SETS[chosen]),
            "calibration": calibration,
            "calibration_views": fs.calibration_views,
            "bank_size": fs.bank_size,
        }
        if n_given == 1 and goods and goods.get(chosen):
            # Each half of the image scored against the rest of it: 'halves' calibration.
            info["halves_scores"] = [round(v, 6) for v in goods[chosen]]
        elif calibration == "halves":
            raise DefectscopeError("'halves' calibration needs one readable image to split")
        seconds = round(time.perf_counter() - start, 3)
        return SelectionResult(
            chosen, f"{head}; {reason}", geometry=geometry, few_shot=info, seconds=seconds, **extra
        )

    forced = fs.augmentation != "auto"
    if forced and fs.augmentation not in usable_sets([fs.augmentation], size):
        raise DefectscopeError(
            f"few_shot.augmentation={fs.augmentation!r} rotates by less than a half turn, "
            f"which needs a square input, not {size[0]}x{size[1]}"
        )
    names: list[str] = [fs.augmentation] if forced else usable_sets(["none", *fs.candidates], size)
    decoded = [item.image for batch in iter_loaded(list(images), 8) for item in batch]
    small = [_at_input_scale(parts.preprocessor, im) for im in decoded if im is not None]
    goods: dict[str, list[float]] = {}
    if n_given == 1 and small and (forced or len(names) == 1):
        # One image: its halves are scored all the same, for 'halves' calibration.
        _, _, goods = compare_view_sets(parts, config, small, names[:1], progress)
    if forced:
        return result(fs.augmentation, f"views: {fs.augmentation} as configured", goods)
    if not small or len(names) == 1:
        return result("none", "views: none (nothing to compare)", goods)
    table, counts, goods = compare_view_sets(parts, config, small, names, progress)
    best = table[0]
    for row in table[1:]:
        if row["objective"] > best["objective"] + fs.margin:
            best = row
    measured = ", ".join(
        f"{r['name']} {r['objective']:.3f} ({r['image_auroc']:.3f}/{r['pixel_auroc']:.3f})"
        for r in table
    )
    verdict = (
        f"views: {best['name']} separates synthetic defects best"
        if best["name"] != "none"
        else f"views: none kept, no view set leads it by {fs.margin}"
    )
    return result(best["name"], f"{verdict}: {measured}", goods, candidates=table, **counts)


@torch.inference_mode()
def compare_view_sets(
    parts: FeatureParts,
    config: DetectorConfig,
    images: list[np.ndarray],
    names: list[str],
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, list[float]]]:
    """Image and pixel AUROC of synthetic defects on held-out content, per view set; and the
    scores of the held-out good content (with one image: its halves), per view set."""
    from sklearn.metrics import roc_auc_score  # a second to import: only here

    from defectscope.data.defect_synthesis import (
        DEFECT_KINDS,
        structure_weights,
        synthesize_defect,
    )

    fs, pre = config.few_shot, parts.preprocessor
    size = pre.input_size
    inputs = pre(images)  # one shape: the images are at input scale
    views = sorted({v for n in names for v in VIEW_SETS[n]})
    embedded = {v: _embed(parts, apply_view(inputs, v), config.batch_size) for v in views}
    dim, h, w = embedded["id"].shape[1:]
    rows = {v: e.permute(0, 2, 3, 1).reshape(len(images), h * w, dim) for v, e in embedded.items()}
    origins = {v: view_origins(v, size, (h, w)) for v in views}
    rng = np.random.default_rng(fs.seed)
    folds = _folds(len(images), fs.folds, rng)
    scores: dict[str, list[float]] = {n: [] for n in names}
    goods: dict[str, list[float]] = {n: [] for n in names}
    pixels: dict[str, list[np.ndarray]] = {n: [] for n in names}
    labels: list[float] = []
    truths: list[np.ndarray] = []
    n_defects, turn = 0, 0
    for number, (held, side) in enumerate(folds):
        image = images[held]
        shape = image.shape[:2]
        region = _region_mask(side, shape)
        where = structure_weights(image) * _shrink(region, 0.06)
        defects = []
        for _ in range(fs.defects_per_image):
            kind = DEFECT_KINDS[turn % len(DEFECT_KINDS)]
            turn += 1
            donor = images[(held + 1) % len(images)] if len(images) > 1 else None
            defects.append(synthesize_defect(image, kind, rng, donor=donor, where=where))
        n_defects += len(defects)
        good = [inputs[held : held + 1], *jittered_views(inputs[held : held + 1], CHECK_JITTERS, 7)]
        batch = torch.cat([*good, pre([d.image for d in defects])])
        queries = _embed(parts, batch, config.batch_size)
        labels += [0.0] * len(good) + [1.0] * len(defects)
        step = max(1, int(math.sqrt(shape[0] * shape[1] / 4096)))
        fold_truths = [np.zeros(shape, bool)] * len(good) + [d.mask for d in defects]
        truths += [t[region][::step] for t in fold_truths]
        for name in names:
            bank = _fold_bank(rows, origins, VIEW_SETS[name], held, side, len(images), fs.seed)
            scorer = AnomalyScorer(bank, config.scoring, size, parts.features.column_groups).to(
                parts.device
            )
            maps = pre.to_original(scorer(queries)[0].float().cpu(), shape).numpy()
            for amap in maps:
                values = amap[region]
                scores[name].append(float(values.max()))
                pixels[name].append(values[::step])
            goods[name] += scores[name][-len(maps) : -len(defects)]
        if progress is not None:
            progress("auto", number + 1, len(folds))
    y = np.asarray(labels)
    pixel_truth = np.concatenate(truths)
    table = []
    for name in names:
        image_auroc = float(roc_auc_score(y, scores[name]))
        pixel_auroc = float(roc_auc_score(pixel_truth, np.concatenate(pixels[name])))
        table.append(
            {
                "name": name,
                "description": DESCRIPTIONS[name],
                "views": len(VIEW_SETS[name]),
                "image_auroc": round(image_auroc, 4),
                "pixel_auroc": round(pixel_auroc, 4),
                "objective": round((image_auroc + pixel_auroc) / 2, 4),
            }
        )
    counts = {
        "n_bank_images": len(images) - (1 if len(images) > 1 else 0),
        "n_holdout_images": len(folds),
        "n_defects": n_defects,
        "defect_kinds": sorted(DEFECT_KINDS),
    }
    return table, counts, goods


def _embed(parts: FeatureParts, batch: torch.Tensor, size: int) -> torch.Tensor:
    return torch.cat([parts.embed(batch[i : i + size]).cpu() for i in range(0, len(batch), size)])


def _folds(n: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(held-out image, side) per fold: side -1 scores the whole image (the bank holds the
    other images); with one image, sides 0-3 score its left, right, top or bottom half."""
    if n >= 2:
        return [(int(i), -1) for i in rng.permutation(n)[:count]]
    return [(0, side) for side in range(4)][:count]


def _region_mask(side: int, shape: tuple[int, int]) -> np.ndarray:
    height, width = shape
    ys, xs = np.mgrid[0:height, 0:width]
    halves = [xs < width // 2, xs >= width // 2, ys < height // 2, ys >= height // 2]
    return np.ones(shape, bool) if side < 0 else halves[side]


def _shrink(mask: np.ndarray, fraction: float) -> np.ndarray:
    """``mask`` without a border of ``fraction`` of the side (defects stay inside it)."""
    from scipy import ndimage

    radius = max(1, round(fraction * min(mask.shape)))
    return ndimage.binary_erosion(mask, iterations=radius, border_value=0).astype(np.float32)


def _fold_bank(
    rows: dict[str, torch.Tensor],
    origins: dict[str, torch.Tensor],
    views: Sequence[str],
    held: int,
    side: int,
    n_images: int,
    seed: int,
) -> torch.Tensor:
    """Bank rows of ``views`` that do not show the held-out content: the images as they are
    at most CHECK_ROWS (the same rows for every view set), the other views at most CHECK_ROWS
    together, so that a view set is compared on the plain set's rows plus what it adds.
    With one image: the patches from beyond a band around the cut (a quarter of the side
    each way), as a patch sees well past its own cell."""
    plain: list[torch.Tensor] = []
    added: list[torch.Tensor] = []
    for view in views:
        if n_images > 1:
            part = torch.cat([rows[view][i] for i in range(n_images) if i != held])
        else:
            y, x = origins[view][:, 0], origins[view][:, 1]
            keep = [x > 0.25, x < -0.25, y > 0.25, y < -0.25][side]
            part = rows[view][0][keep]
        (plain if view == "id" else added).append(part)
    generator = torch.Generator().manual_seed(seed)
    bank = [_at_most(torch.cat(group), CHECK_ROWS, generator) for group in (plain, added) if group]
    return torch.cat(bank)


def _at_most(rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``rows``, or ``n`` of them drawn at random."""
    if len(rows) <= n:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:n]]
