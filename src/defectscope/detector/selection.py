"""Auto mode: choose the feature configuration per product, from its good images alone.

A few training images are held out and synthetic defects of several kinds are painted onto
them (`defectscope.data.defect_synthesis`). Every candidate configuration is then judged on how
well it separates those defects from the held-out good images (image AUROC) and localises them
(pixel AUROC), with a small bank from other training images. The candidates differ only in how
the backbone's layer maps are aggregated (per-layer normalisation, neighbourhood pooling), so
one backbone pass serves them all; the coreset, kNN and scoring are the fit's own code.

The image geometry is decided first, from the images' sizes: a set whose aspect ratios differ
is padded to keep each image undistorted, and a set of one elongated shape gets an input of the
same shape and about the configured pixel count.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from defectscope.config import DetectorConfig
from defectscope.data.io import ImageInput
from defectscope.data.loading import iter_loaded
from defectscope.detector.coreset import coreset_size, select_coreset
from defectscope.detector.parts import FeatureParts, input_multiple
from defectscope.detector.progress import ProgressFn
from defectscope.detector.ranking import auroc
from defectscope.detector.scoring import AnomalyScorer
from defectscope.features.backbones import FeatureBackbone
from defectscope.features.patches import PatchFeatures


@dataclass(frozen=True)
class Candidate:
    """One way to aggregate the backbone's layer maps into patch embeddings."""

    name: str
    normalize: str
    neighbourhood: int
    description: str

    def features(self, backbone: Any, embedding_dim: int | None) -> PatchFeatures:
        """The patch-feature module this candidate stands for, on a shared backbone."""
        return PatchFeatures(backbone, self.neighbourhood, embedding_dim, self.normalize)

    def apply(self, config: DetectorConfig) -> None:
        config.features.normalize = self.normalize  # type: ignore[assignment]
        config.features.neighbourhood = self.neighbourhood


CANDIDATES: dict[str, Candidate] = {
    c.name: c
    for c in (
        Candidate("raw", "none", 1, "raw layer features: keeps activation strength"),
        Candidate("l2", "l2", 1, "unit-length layer features: layers weigh equally"),
        Candidate("raw_pool3", "none", 3, "raw features averaged over 3x3 patches"),
        Candidate("l2_pool3", "l2", 3, "unit-length features averaged over 3x3 patches"),
    )
}
REDUCTIONS = {
    "max": "",
    "topk_mean": "; image score: mean of the top-scoring pixels, not the single highest",
}


def reduce_maps(maps: torch.Tensor, reduction: str, topk_fraction: float) -> torch.Tensor:
    """Image scores of anomaly maps (B, H, W) by ``reduction``, as `AnomalyScorer` reduces."""
    flat = maps.flatten(1).float()
    if reduction == "max":
        return flat.amax(dim=1)
    k = max(1, math.ceil(topk_fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


# A later candidate must beat the one kept so far by this much to be chosen: differences
# measured on a few dozen synthetic defects below it are noise.
MARGIN = 0.01
# Candidate banks are ranked, not kept: their coresets use shards of this many rows, which stay
# in cache (half the coreset time; the same choice as 16 384-row shards in all ten benchmark
# categories). The fit's own bank keeps the configured shard size.
CANDIDATE_SHARD_ROWS = 4096


@dataclass
class SelectionResult:
    chosen: str | None
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    geometry: dict[str, Any] = field(default_factory=dict)
    n_bank_images: int = 0
    n_holdout_images: int = 0
    n_defects: int = 0
    defect_kinds: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # A few-shot fit's views and calibration (`defectscope.detector.few_shot`); empty otherwise.
    few_shot: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------- geometry
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


def scale_spread(sizes: Sequence[tuple[int, int]], ratio: float) -> float:
    """How unevenly a padded canvas of width/height ``ratio`` shrinks ``sizes``: the 90th over
    the 10th percentile of each image's scale (rare outliers do not count)."""
    height, width = 1.0, ratio
    scales = [min(height / h, width / w) for h, w in sizes]
    low, high = np.percentile(scales, [10, 90])
    return float(high / low)


def canvas_ratio(sizes: Sequence[tuple[int, int]]) -> float:
    """Width/height of the padded canvas for images of ``sizes``: the box most of them fit in
    (95th percentile of widths over that of heights) if it shrinks them more evenly than a
    square does, else 1. Scales a few times apart in one bank make the same surface look
    different, and a square shrinks a long image far more than a short one."""
    box = float(np.percentile([w for _, w in sizes], 95)) / float(
        np.percentile([h for h, _ in sizes], 95)
    )
    if max(box, 1 / box) < 1.25 or scale_spread(sizes, box) > 0.8 * scale_spread(sizes, 1.0):
        return 1.0
    return box


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
    short_side = float(np.median([min(h, w) for h, w in sizes]))
    # Large images: a larger input keeps small defects a few patches wide, graded by how much
    # the images would shrink (max_downscale); without it, only from 3x the input.
    if features.max_downscale is None:
        wanted = features.large_image_scale if short_side >= 3 * min(features.input_size) else 1
    else:
        wanted = short_side / features.max_downscale / min(features.input_size)
    factor = min(features.large_image_scale, wanted)
    height, width = (
        min(2048, round(side * factor / multiple) * multiple) for side in features.input_size
    )
    if min(height, width) > min(features.input_size):
        features.input_size = (height, width)
        reasons.append(f"large images (short side {short_side:.0f} px): input x{factor:.2f}")
    height, width = features.input_size
    out.update(aspect=features.aspect, input_size=[height, width])
    out["reason"] = "; ".join(reasons) + f"; input {height}x{width}"
    return out


# ------------------------------------------------------------------------------ selection
@dataclass
class PreparedImage:
    """A training image's backbone maps, computed by auto mode and reused by the fit."""

    identity: tuple[str, Any]
    source: str | None
    hash: str
    maps: list[torch.Tensor]  # one (1, C, h, w) float32 CPU tensor per layer


def identity(source: ImageInput) -> tuple[str, Any]:
    """What tells the same training input apart from another within one fit."""
    if isinstance(source, (str, Path)):
        return ("path", str(source))
    return ("object", id(source))


class PreparedMaps(dict[int, PreparedImage]):
    """Backbone maps auto mode computed, by training-image index, until the fit takes them."""

    def take(self, images: Sequence[ImageInput], offset: int) -> list[PreparedImage] | None:
        """The maps of ``images`` (training images ``offset ..``), handed over once; None
        unless every one of them is here, for the very same input."""
        keys = [offset + i for i in range(len(images))]
        entries = [self.get(k) for k in keys]
        found = [e for e, image in zip(entries, images, strict=True) if e is not None]
        if not entries or len(found) != len(entries):
            return None
        if any(e.identity != identity(image) for e, image in zip(found, images, strict=True)):
            return None
        for key in keys:
            del self[key]
        return found


def select_configuration(
    backbone: FeatureBackbone,
    config: DetectorConfig,
    device: torch.device,
    images: Sequence[ImageInput],
    progress: ProgressFn | None = None,
) -> tuple[SelectionResult, PreparedMaps]:
    """Resolve the geometry and, with ``auto.enabled``, apply the best candidate to ``config``.
    Returns what was measured (for the model's metadata) and the backbone maps of the images
    it embedded, by index, for the fit to reuse. ``progress("auto", done, total)`` counts
    embedded images, then candidates. A set of fewer than ``auto.min_images`` gets the
    few-shot choice instead (`defectscope.detector.few_shot`: views and calibration)."""
    from defectscope.detector import few_shot  # imports this module

    start = time.perf_counter()
    auto = config.auto
    rng = np.random.default_rng(auto.seed)
    order = rng.permutation(len(images))
    geometry: dict[str, Any] = {"aspect_requested": config.features.aspect}
    if config.features.aspect == "auto":
        probe = [probe_size(images[int(i)]) for i in order[: auto.size_probe_images]]
        geometry = resolve_geometry([s for s in probe if s], config, input_multiple(backbone))
    if few_shot.applies(config, len(images)):
        return few_shot.select_views(backbone, config, device, images, geometry, progress), (
            PreparedMaps()
        )
    if not auto.enabled:
        return SelectionResult(
            None, "auto mode off: configuration as given", geometry=geometry
        ), PreparedMaps()
    if len(images) < auto.min_images:
        reason = (
            f"{len(images)} training images, fewer than auto.min_images={auto.min_images}: "
            "configuration as given"
        )
        return SelectionResult(None, reason, geometry=geometry), PreparedMaps()
    # Imported here: only auto mode needs it.
    from defectscope.data.defect_synthesis import synthesize_defects

    n_holdout = max(2, min(auto.holdout_images, len(images) // 4))
    parts = FeatureParts.build(backbone, config.features, device, config.half_precision)
    features, preprocessor = parts.features, parts.preprocessor
    # One backbone pass over a sample (every image of a set up to auto.bank_images), kept for
    # the fit: candidates are compared on banks as large as the fit's, which decides the ranking.
    sample = order[: n_holdout + auto.bank_images]
    steps = len(sample) + len(auto.candidates)

    def report(done: int) -> None:
        if progress is not None:
            progress("auto", done, steps)

    prepared, decoded = _prepare_sample(parts, config.batch_size, images, sample, n_holdout, report)
    indices = list(prepared)
    holdout_ids, bank_ids = indices[:n_holdout], indices[n_holdout:]
    if len(holdout_ids) < 2 or not bank_ids:
        return SelectionResult(
            None, "too few readable images to compare", geometry=geometry
        ), PreparedMaps()
    # Defects are painted at the network's scale: what it sees is the same, at fewer pixels.
    holdout = [_at_input_scale(preprocessor, decoded[i]) for i in holdout_ids]
    defects = synthesize_defects(holdout, auto.defects_per_image, seed=auto.seed)
    # Candidates are compared on the full-size pass alone (the half-size one, if configured,
    # comes after it): with both, raw features win on synthetic blotches where real faint
    # defects want L2 (BENCHMARKS.md, "The image at half size too").
    full = len(features.backbone.channels)
    good_maps = _full_size_maps(parts, config.batch_size, holdout)
    defect_maps = _full_size_maps(parts, config.batch_size, [d.image for d in defects])
    bank_maps = [
        [torch.cat([prepared[i].maps[layer] for i in chunk]) for layer in range(full)]
        for chunk in _chunks(bank_ids, config.batch_size)
    ]
    labels = np.r_[np.zeros(len(holdout)), np.ones(len(defects))]
    truths = [np.zeros(im.shape[:2], bool) for im in holdout] + [d.mask for d in defects]

    table = []
    for number, name in enumerate(auto.candidates):
        candidate = CANDIDATES[name]
        trial = candidate.features(features.backbone, config.features.embedding_dim)
        t0 = time.perf_counter()
        bank = _bank(trial, bank_maps, config, device)
        scorer = AnomalyScorer(bank, config.scoring, preprocessor.input_size).to(device)
        maps = []
        for batch in good_maps + defect_maps:
            batch_maps, _ = scorer(trial.aggregate(batch))
            maps.append(batch_maps.float().cpu())
        all_maps = torch.cat(maps)
        pixel_auroc = _pixel_auroc(preprocessor, all_maps, truths)
        seconds = round(time.perf_counter() - t0, 3)
        for reduction in auto.reductions:
            image_scores = reduce_maps(all_maps, reduction, config.scoring.topk_fraction)
            image_auroc = auroc(labels, image_scores.numpy())
            table.append(
                {
                    "name": name if reduction == "max" else f"{name}+{reduction}",
                    "description": candidate.description + REDUCTIONS[reduction],
                    "normalize": candidate.normalize,
                    "neighbourhood": candidate.neighbourhood,
                    "reduction": reduction,
                    "image_auroc": round(image_auroc, 4),
                    "pixel_auroc": round(pixel_auroc, 4),
                    "objective": round((image_auroc + pixel_auroc) / 2, 4),
                    "seconds": seconds,
                }
            )
        report(len(sample) + number + 1)
    best = choose(table)
    CANDIDATES[best["name"].split("+")[0]].apply(config)
    config.scoring.reduction = best["reduction"]
    others = ", ".join(f"{r['name']} {r['objective']:.3f}" for r in table if r is not best)
    measured = (
        f"objective {best['objective']:.3f} (image AUROC {best['image_auroc']:.3f}, "
        f"pixel AUROC {best['pixel_auroc']:.3f}; {others})"
    )
    if all(best["objective"] >= r["objective"] for r in table):
        reason = f"{best['name']} separates synthetic defects best: {measured}"
    else:
        reason = f"{best['name']} kept: no other candidate leads it by {MARGIN}: {measured}"
    result = SelectionResult(
        chosen=best["name"],
        reason=reason,
        candidates=table,
        geometry=geometry,
        n_bank_images=len(bank_ids),
        n_holdout_images=len(holdout),
        n_defects=len(defects),
        defect_kinds=sorted({d.kind for d in defects}),
        seconds=round(time.perf_counter() - start, 3),
    )
    return result, prepared


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.inference_mode()
def _prepare_sample(
    parts: FeatureParts,
    batch_size: int,
    images: Sequence[ImageInput],
    indices: np.ndarray,
    keep: int,
    report: Callable[[int], None],
) -> tuple[PreparedMaps, dict[int, np.ndarray]]:
    """Backbone maps of the readable ``images[indices]``, in that order, decoded in background
    threads as the fit decodes; and the first ``keep`` of those images, decoded."""
    preprocessor = parts.preprocessor
    chosen = [int(i) for i in indices]
    sources = [images[i] for i in chosen]  # read once: a lazy sequence may decode on access
    out = PreparedMaps()
    decoded: dict[int, np.ndarray] = {}
    done = 0
    for batch in iter_loaded(sources, batch_size, prepare=parts.resize_and_hash):
        done += len(batch)
        report(done)
        good = [(item, image) for item in batch if (image := item.image) is not None]
        if not good:
            continue
        inputs = preprocessor.batch([item.prepared[0] for item, _ in good])
        maps = [m.cpu() for m in parts.backbone_maps(inputs)]
        for row, (item, image) in enumerate(good):
            index = chosen[item.index]
            if len(decoded) < keep:
                decoded[index] = image
            out[index] = PreparedImage(
                identity=identity(sources[item.index]),
                source=item.source,
                hash=item.prepared[1],
                maps=[m[row : row + 1].clone() for m in maps],
            )
    return out, decoded


def choose(table: list[dict[str, Any]]) -> dict[str, Any]:
    """The row with the best objective; a later row must beat an earlier one by MARGIN."""
    best = table[0]
    for row in table[1:]:
        if row["objective"] > best["objective"] + MARGIN:
            best = row
    return best


def _at_input_scale(preprocessor: Any, image: np.ndarray) -> np.ndarray:
    """``image`` resized as the preprocessor would, without its padding, as RGB uint8."""
    box = preprocessor.content_box(*image.shape[:2])
    tensor = preprocessor.resize(image)
    tensor = tensor[:, box.top : box.top + box.height, box.left : box.left + box.width]
    return tensor.mul(255.0).round_().byte().permute(1, 2, 0).contiguous().numpy()


@torch.inference_mode()
def _full_size_maps(
    parts: FeatureParts, size: int, images: list[np.ndarray]
) -> list[list[torch.Tensor]]:
    """The full-size pass's layer maps of ``images``, a list per batch (kept for every
    candidate)."""
    return [
        parts.backbone_maps(parts.preprocessor(images[start : start + size]), full_size_only=True)
        for start in range(0, len(images), size)
    ]


@torch.inference_mode()
def _bank(
    trial: PatchFeatures, maps: list[list[torch.Tensor]], config: DetectorConfig, device: Any
) -> torch.Tensor:
    patches = torch.cat(
        [trial.aggregate(batch).permute(0, 2, 3, 1).reshape(-1, trial.dim) for batch in maps]
    )
    shard_size = min(config.coreset.shard_size, CANDIDATE_SHARD_ROWS)
    coreset = config.coreset.model_copy(update={"shard_size": shard_size})
    chosen = select_coreset(patches, coreset, n_select=coreset_size(len(patches), coreset))
    return patches[chosen.to(patches.device)].to(device)


def _pixel_auroc(preprocessor: Any, maps: torch.Tensor, truths: list[np.ndarray]) -> float:
    """Pixel AUROC at each image's own size, on a strided subsample of pixels."""
    values, labels = [], []
    for amap, truth in zip(maps, truths, strict=True):
        original = preprocessor.to_original(amap[None], truth.shape)[0].numpy()
        step = max(1, int(math.sqrt(truth.size / 16384)))
        values.append(original[::step, ::step].ravel())
        labels.append(truth[::step, ::step].ravel())
    return auroc(np.concatenate(labels), np.concatenate(values))
