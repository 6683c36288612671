"""Auto mode: choose the feature configuration per product, from its good images alone.

A few training images are held out and synthetic defects of several kinds are painted onto
them (`defectscope.data.defect_synthesis`). Every candidate configuration is then judged on how
well it separates those defects from the held-out good images (image AUROC) and localises them
(pixel AUROC), with a small bank from other training images. The candidates differ only in how
the backbone's layer maps are aggregated (per-layer normalisation, neighbourhood pooling), so
one backbone pass serves them all; the coreset, kNN and scoring are the fit's own code. Where
the user gives a few real defective images (`auto.known_defects`), candidates are judged on them
instead, and the half-size pass is tried too (`defectscope.detector.known_defects`).

The image geometry is decided first, from the images' sizes (`defectscope.detector.geometry`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscope.config import DetectorConfig
from defectscope.data.io import ImageInput
from defectscope.data.loading import iter_loaded
from defectscope.detector.candidates import (
    CANDIDATES,
    REDUCTIONS,
    Candidate,
    balancing_weights,
    reduce_maps,
)
from defectscope.detector.coreset import coreset_size, select_coreset
from defectscope.detector.geometry import probe_size, resolve_geometry
from defectscope.detector.parts import FeatureParts, check_input, input_multiple
from defectscope.detector.progress import ProgressFn
from defectscope.detector.ranking import auroc
from defectscope.detector.scoring import AnomalyScorer
from defectscope.features.backbones import FeatureBackbone
from defectscope.features.patches import PatchFeatures

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

    def keep_layers(self, count: int) -> None:
        """Keep each image's first ``count`` layer maps: the full-size pass, when the fit's
        features have no half-size one."""
        for entry in self.values():
            entry.maps = entry.maps[:count]


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
        geometry = resolve_geometry(
            [s for s in probe if s], config, input_multiple(backbone, config.features)
        )
    from defectscope.detector import scales  # imports few_shot, which imports this module

    if scales.uses_half_scale(config, len(images)):
        # Before any backbone pass: the half-size bank is fitted last.
        check_input(backbone, scales.half_scale_config(config).features)
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
    # Imported here: only auto mode needs them.
    from defectscope.data.defect_synthesis import synthesize_defects
    from defectscope.detector.known_defect_files import known_defect_paths
    from defectscope.detector.known_defects import (
        half_scale_row,
        half_size_fits,
        load_known_defects,
    )

    known = known_defect_paths(auto.known_defects) if auto.known_defects else None
    unused = ""
    if known is not None and len(known) < auto.min_known_defects:
        unused = (
            f"; {len(known)} known defects, fewer than auto.min_known_defects="
            f"{auto.min_known_defects}: not used"
        )
        known = None
    n_holdout = max(2, min(auto.holdout_images, len(images) // 4))
    parts = FeatureParts.build(backbone, config.features, device, config.half_precision)
    # Only real defects show whether a product needs the half-size pass (known_defects.py);
    # a model with the half-size bank (features.half_size_bank) has that view already.
    try_half = (
        known is not None
        and auto.try_half_scale
        and not config.features.half_scale
        and config.features.half_size_bank == 0
        and half_size_fits(backbone, config.features.input_size)
    )
    features, preprocessor = parts.features, parts.preprocessor
    # One backbone pass over a sample (every image of a set up to auto.bank_images), kept for
    # the fit: candidates are compared on banks as large as the fit's, which decides the ranking.
    sample = order[: n_holdout + auto.bank_images]
    steps = len(sample) + len(auto.candidates)

    def report(done: int) -> None:
        if progress is not None:
            progress("auto", done, steps)

    prepared, decoded = _prepare_sample(
        parts, config.batch_size, images, sample, n_holdout, report, try_half or None
    )
    indices = list(prepared)
    holdout_ids, bank_ids = indices[:n_holdout], indices[n_holdout:]
    if len(holdout_ids) < 2 or not bank_ids:
        return SelectionResult(
            None, "too few readable images to compare", geometry=geometry
        ), PreparedMaps()
    # Defects are painted at the network's scale: what it sees is the same, at fewer pixels.
    holdout = [_at_input_scale(preprocessor, decoded[i]) for i in holdout_ids]
    # Candidates are compared on the full-size pass alone (the half-size one, if configured,
    # comes after it): with both, raw features win on synthetic blotches where real faint
    # defects want L2 (BENCHMARKS.md, "The image at half size too").
    full = len(features.backbone.channels)
    bank_maps = [_cat_layers(prepared, c, full) for c in _chunks(bank_ids, config.batch_size)]
    power, dim = config.features.norm_power, config.features.embedding_dim
    balanced: dict[str, list[float]] = {
        name: balancing_weights(
            CANDIDATES[name].features(features.backbone, dim, None, power), bank_maps
        )
        for name in auto.candidates
        if CANDIDATES[name].balanced
    }

    def judge(
        defect_images: list[np.ndarray], truths: list[np.ndarray] | None
    ) -> tuple[list[dict[str, Any]], list[list[torch.Tensor]], np.ndarray]:
        """Every candidate's rows on the held-out good images and ``defect_images``, and the
        backbone maps and labels they were judged on (the half-size trial reuses them)."""
        maps = _layer_maps(parts, config.batch_size, holdout + defect_images, try_half)
        labels = np.r_[np.zeros(len(holdout)), np.ones(len(defect_images))]
        rows: list[dict[str, Any]] = []
        for number, name in enumerate(auto.candidates):
            rows.extend(
                _candidate_rows(
                    CANDIDATES[name], features, bank_maps, maps, labels, truths,
                    config, device, preprocessor, balanced.get(name),
                )
            )  # fmt: skip
            report(len(sample) + number + 1)
        return rows, maps, labels

    n_defects = 0
    if known is not None:
        defect_images = load_known_defects(
            known, lambda image: _at_input_scale(preprocessor, image)
        )
        table, test_maps, labels = judge(defect_images, None)
        kinds, evidence, n_defects = ["known"], f"the {len(known)} known defects", len(known)
        separation = choose(table)["image_auroc"]
        if separation < auto.min_known_separation:
            # A handful that no candidate separates cannot rank them: differences are noise.
            unused = (
                f"; {len(known)} known defects, separated at image AUROC {separation:.2f} by "
                f"the candidate they favour, below auto.min_known_separation="
                f"{auto.min_known_separation}: not used"
            )
            if try_half:
                prepared.keep_layers(full)
            known, try_half = None, False
    if known is None:
        defects = synthesize_defects(holdout, auto.defects_per_image, seed=auto.seed)
        truths = [np.zeros(im.shape[:2], bool) for im in holdout] + [d.mask for d in defects]
        table, test_maps, labels = judge([d.image for d in defects], truths)
        kinds, evidence = sorted({d.kind for d in defects}), "synthetic defects"
        n_defects = len(defects)
    best = choose(table)
    candidate = CANDIDATES[best["name"].split("+")[0]]
    candidate.apply(config, balanced.get(candidate.name))
    config.scoring.reduction = best["reduction"]
    if try_half:
        trial = PatchFeatures(
            features.backbone,
            candidate.neighbourhood,
            config.features.embedding_dim,
            candidate.normalize,
            half_scale=True,
            layer_weights=config.features.layer_weights,
            norm_power=power,
        )
        layers = len(prepared[bank_ids[0]].maps)
        chunks = _chunks(bank_ids, config.batch_size)
        bank = _bank(trial, [_cat_layers(prepared, c, layers) for c in chunks], config, device)
        row = half_scale_row(
            trial, bank, config, preprocessor.input_size, test_maps, labels, best["reduction"]
        )
        described = best["description"] + "; the image at half size too"
        half_name = f"{best['name']}+half_scale"
        table.append({**best, **row, "name": half_name, "description": described, "seconds": None})
        if row["objective"] > best["objective"] + MARGIN:
            best = table[-1]
            config.features.half_scale = True
        else:
            prepared.keep_layers(full)
    others = ", ".join(f"{r['name']} {r['objective']:.3f}" for r in table if r is not best)
    pixel = "" if best["pixel_auroc"] is None else f", pixel AUROC {best['pixel_auroc']:.3f}"
    measured = (
        f"objective {best['objective']:.3f} (image AUROC {best['image_auroc']:.3f}{pixel}; "
        f"{others})"
    )
    if all(best["objective"] >= r["objective"] for r in table):
        reason = f"{best['name']} separates {evidence} best: {measured}"
    else:
        reason = (
            f"{best['name']} kept: no other candidate leads it by {MARGIN} on {evidence}: "
            f"{measured}"
        )
    result = SelectionResult(
        chosen=best["name"],
        reason=reason + unused,
        candidates=table,
        geometry=geometry,
        n_bank_images=len(bank_ids),
        n_holdout_images=len(holdout),
        n_defects=n_defects,
        defect_kinds=kinds,
        seconds=round(time.perf_counter() - start, 3),
    )
    return result, prepared


@torch.inference_mode()
def _candidate_rows(
    candidate: Candidate,
    features: PatchFeatures,
    bank_maps: list[list[torch.Tensor]],
    test_maps: list[list[torch.Tensor]],
    labels: np.ndarray,
    truths: list[np.ndarray] | None,
    config: DetectorConfig,
    device: torch.device,
    preprocessor: Any,
    weights: list[float] | None = None,
) -> list[dict[str, Any]]:
    """The table rows of one candidate, one per reduction: its bank from ``bank_maps``, the
    held-out good and defective images (``test_maps``) scored against it. Without ``truths``
    (known defects) the objective is the soft image AUROC, else the mean of image and pixel
    AUROC."""
    from defectscope.detector.known_defects import soft_auroc

    trial = candidate.features(
        features.backbone, config.features.embedding_dim, weights, config.features.norm_power
    )
    full = len(features.backbone.channels)
    t0 = time.perf_counter()
    bank = _bank(trial, bank_maps, config, device)
    scorer = AnomalyScorer(bank, config.scoring, preprocessor.input_size).to(device)
    maps = []
    for batch in test_maps:
        batch_maps, _ = scorer(trial.aggregate(batch[:full]))
        maps.append(batch_maps.float().cpu())
    all_maps = torch.cat(maps)
    pixel_auroc = None if truths is None else _pixel_auroc(preprocessor, all_maps, truths)
    seconds = round(time.perf_counter() - t0, 3)
    rows = []
    for reduction in config.auto.reductions:
        image_scores = reduce_maps(all_maps, reduction, config.scoring.topk_fraction).numpy()
        image_auroc = auroc(labels, image_scores)
        objective = (
            soft_auroc(labels, image_scores)
            if pixel_auroc is None
            else (image_auroc + pixel_auroc) / 2
        )
        rows.append(
            {
                "name": candidate.name + ("" if reduction == "max" else f"+{reduction}"),
                "description": candidate.description + REDUCTIONS[reduction],
                "normalize": candidate.normalize,
                "neighbourhood": candidate.neighbourhood,
                "reduction": reduction,
                "image_auroc": round(image_auroc, 4),
                "pixel_auroc": None if pixel_auroc is None else round(pixel_auroc, 4),
                "objective": round(objective, 4),
                "seconds": seconds,
            }
        )
    return rows


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
    half_scale: bool | None = None,
) -> tuple[PreparedMaps, dict[int, np.ndarray]]:
    """Backbone maps of the readable ``images[indices]``, in that order, decoded in background
    threads as the fit decodes; and the first ``keep`` of those images, decoded."""
    preprocessor = parts.preprocessor
    chosen = [int(i) for i in indices]
    sources = [images[i] for i in chosen]  # read once: a lazy sequence may decode on access
    out = PreparedMaps()
    decoded: dict[int, np.ndarray] = {}
    done = 0
    for batch in iter_loaded(sources, batch_size, prepare=preprocessor.resize, digest=True):
        done += len(batch)
        report(done)
        good = [(item, image) for item in batch if (image := item.image) is not None]
        if not good:
            continue
        inputs = preprocessor.batch([item.prepared for item, _ in good])
        maps = [m.cpu() for m in parts.backbone_maps(inputs, half_scale)]
        for row, (item, image) in enumerate(good):
            index = chosen[item.index]
            if len(decoded) < keep:
                decoded[index] = image
            out[index] = PreparedImage(
                identity=identity(sources[item.index]),
                source=item.source,
                hash=str(item.digest),
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
def _layer_maps(
    parts: FeatureParts, size: int, images: list[np.ndarray], half_scale: bool | None
) -> list[list[torch.Tensor]]:
    """The full-size pass's layer maps of ``images`` (then the half-size pass's, if
    ``half_scale``; None: as the features are configured), a list per batch."""
    return [
        parts.backbone_maps(parts.preprocessor(images[start : start + size]), half_scale)
        for start in range(0, len(images), size)
    ]


def _cat_layers(prepared: PreparedMaps, ids: list[int], n_layers: int) -> list[torch.Tensor]:
    return [torch.cat([prepared[i].maps[layer] for i in ids]) for layer in range(n_layers)]


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
