"""Staged fit: a plan, shards of embedded images, then one bank from all shards.

``Detector.fit`` is ``FitPlan.create`` -> `extract_shard` per chunk -> `fit_from_shards`, all on
explicit parts (`FeatureParts`, the config); the last returns a `FitResult` that the detector
keeps. A distributed engine runs the very same three steps, with the shards extracted
elsewhere, so local and distributed fits give the same bank for the same plan.

Stages:

1. `FitPlan` is decided once, from the image count and the config, before any shard runs:
   which images are held out of the bank (holdout calibration), which images are the
   calibration sample (at most ``calibration.max_images``, seeded), and the chunks.
2. `extract_shard` embeds one chunk, keeps ``fit.oversample`` times the chunk's share of the
   final bank as coreset candidates (greedy k-center inside the chunk, the first level of a
   two-level coreset), the pooled embeddings for the drift reference and the full embeddings of
   the chunk's calibration-sample images. A plan of one chunk keeps every patch, so a small
   training set gets a single-level coreset.
3. `fit_from_shards` merges the candidates in global image order, selects the final coreset
   over their union (at most ``coreset.max_size`` rows), builds the scorer, calibrates on the
   calibration sample (leave-one-out bans each image's own bank rows, by global image id) and
   stores the drift reference.

Memory bound. While a chunk is embedded, its patch embeddings plus their coreset projection are
alive: about ``chunk_images * h * w * (D + projection_dim) * 4`` bytes (256 images of 32x32
patches of 152 channels: ~290 MiB). Kept between chunks, per image: the pooled embedding
(``D * 4`` bytes), name and hash (~200 bytes), its candidates (``oversample * bank / n_images``
rows of ``D * 4`` bytes: at most ``2 * max_size * D * 4`` bytes in total, 20 MiB by default);
and per calibration-sample image its embeddings (``h * w * D * 4`` bytes, 608 KiB; at most
``max_images`` of them). `ShardStore` moves candidates and calibration embeddings beyond
``fit.ram_budget_mb`` into memory-mapped temporary files, which are mapped only while a slice is
copied out (so they do not count in the resident set) and are deleted when the fit ends.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from defectscope.config import DetectorConfig
from defectscope.data.io import ImageInput
from defectscope.data.loading import LoadedImage, iter_loaded
from defectscope.detector import few_shot
from defectscope.detector.calibration import Calibration, calibrate, spread_quantile
from defectscope.detector.coreset import choose_coreset, select_coreset
from defectscope.detector.edge_profile import SAMPLE_IMAGES, learn_edge_profile
from defectscope.detector.fit_info import FitInfo, TrainingInfo
from defectscope.detector.leave_one_out import StandIns, find_stand_ins, own_rows_and_stand_ins
from defectscope.detector.map_maxima import leave_one_out_maxima
from defectscope.detector.parts import FeatureParts
from defectscope.detector.plan import FitPlan, bank_target
from defectscope.detector.progress import ProgressFn
from defectscope.detector.reference import compute_reference, pool_embeddings
from defectscope.detector.scoring import AnomalyScorer
from defectscope.detector.selection import PreparedMaps, SelectionResult
from defectscope.detector.shards import FitShard, read_rows
from defectscope.detector.suspects import calibration_images, suspect_images
from defectscope.errors import DefectscopeError


# ----------------------------------------------------------------------------- extraction
def extract_shard(
    parts: FeatureParts,
    config: DetectorConfig,
    images: Sequence[ImageInput],
    plan: FitPlan,
    offset: int,
    on_error: str = "raise",
    progress: ProgressFn | None = None,
    prepared: PreparedMaps | None = None,
) -> FitShard:
    """Embed images ``offset .. offset + len(images)`` of the plan into a `FitShard`; images
    whose backbone maps are in ``prepared`` (auto mode's pass) are not embedded again."""
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    images = list(images)
    stop = offset + len(images)
    if offset < 0 or stop > plan.n_images or not images:
        raise DefectscopeError(
            f"shard [{offset}, {stop}) is empty or outside the plan's {plan.n_images} images"
        )
    start = time.perf_counter()
    ids: list[int] = []
    names: list[str | None] = []
    hashes: list[str] = []
    skipped: list[dict] = []
    pooled: list[np.ndarray] = []
    bank_parts: list[torch.Tensor] = []
    owner_parts: list[torch.Tensor] = []
    calibration_ids: list[int] = []
    calibration_parts: list[torch.Tensor] = []
    grid = (0, 0)
    done = 0
    for batch in embedded_batches(parts, config.batch_size, images, offset, prepared):
        for item in batch.items:
            if item.error is None:
                continue
            if on_error == "raise":
                raise item.error
            warnings.warn(f"skipping unreadable image: {item.error}", stacklevel=3)
            skipped.append({"source": item.source, "error": item.error.reason})
        if batch.embeddings is not None:
            embeddings = batch.embeddings
            good_items = [batch.items[k] for k in batch.good]
            grid = (int(embeddings.shape[2]), int(embeddings.shape[3]))
            batch_ids = [offset + item.index for item in good_items]
            ids.extend(batch_ids)
            names.extend(item.source for item in good_items)
            hashes.extend(batch.hashes)
            pooled.append(pool_embeddings(embeddings))
            rows = [r for r, i in enumerate(batch_ids) if plan.in_calibration(i)]
            if rows and plan.calibration_views:
                for r in rows:
                    image_id = batch_ids[r]
                    seen = few_shot.jittered_embeddings(parts, _inputs(batch)[r], plan, image_id)
                    calibration_ids.extend([image_id] * len(seen))
                    calibration_parts.append(seen)
            elif rows:
                calibration_ids.extend(batch_ids[r] for r in rows)
                calibration_parts.append(embeddings[rows].cpu())
            rows = [r for r, i in enumerate(batch_ids) if plan.in_bank(i)]
            if rows:
                # Every view of an image is owned by it: leave-one-out bans them together.
                owners = torch.tensor([batch_ids[r] for r in rows], dtype=torch.long)
                inputs = _inputs(batch)[rows] if len(plan.views) > 1 else None
                for seen in few_shot.view_embeddings(parts, embeddings[rows], inputs, plan.views):
                    bank_parts.append(seen.flatten(2).permute(0, 2, 1).reshape(-1, seen.shape[1]))
                    owner_parts.append(owners.repeat_interleave(grid[0] * grid[1]))
        done += len(batch.items)
        if progress:
            progress("features", offset + done, plan.n_images)
    dim = parts.features.dim
    candidates = torch.cat(bank_parts) if bank_parts else torch.empty(0, dim)
    owners = torch.cat(owner_parts) if owner_parts else torch.empty(0, dtype=torch.long)
    del bank_parts
    timings = {"features_s": time.perf_counter() - start}

    t0 = time.perf_counter()
    n_patches = int(candidates.shape[0])
    quota = shard_quota(n_patches, grid, plan, config)
    if quota < n_patches:
        # First level of the two-level coreset; a seed per chunk, whichever worker runs it.
        shard_config = config.coreset.model_copy(update={"seed": config.coreset.seed + offset})
        chosen = select_coreset(candidates.to(parts.device), shard_config, n_select=quota)
        chosen = chosen.cpu()
        candidates, owners = candidates[chosen].contiguous(), owners[chosen]
    timings["coreset_s"] = time.perf_counter() - t0

    calibration = torch.cat(calibration_parts) if calibration_parts else torch.empty(0, dim, *grid)
    return FitShard(
        offset=offset,
        stop=stop,
        image_ids=ids,
        names=names,
        hashes=hashes,
        skipped=skipped,
        grid=grid,
        n_patches=n_patches,
        candidates=candidates,
        candidate_owners=owners,
        pooled=np.concatenate(pooled) if pooled else np.empty((0, dim), np.float32),
        calibration_ids=calibration_ids,
        calibration_embeddings=calibration,
        timings=timings,
    )


@dataclass
class EmbeddedBatch:
    """A batch of a shard: every image (``items``, errors included), the positions of those
    embedded, their embeddings (None when none could be read) and their content hashes."""

    items: list[Any]
    good: list[int]
    embeddings: torch.Tensor | None
    hashes: list[str]
    inputs: torch.Tensor | None = None  # the preprocessed images (None for prepared maps)


def _inputs(batch: EmbeddedBatch) -> torch.Tensor:
    if batch.inputs is None:
        raise DefectscopeError("a few-shot fit needs the images, not auto mode's prepared maps")
    return batch.inputs


def embedded_batches(
    parts: FeatureParts,
    size: int,
    images: list[ImageInput],
    offset: int,
    prepared_maps: PreparedMaps | None = None,
) -> Iterator[EmbeddedBatch]:
    """Batches of embedded images; images whose backbone maps auto mode already computed
    (``prepared_maps``) are neither decoded nor run through the backbone again."""
    prepared = prepared_maps.take(images, offset) if prepared_maps is not None else None
    if prepared is not None:
        for start in range(0, len(images), size):
            entries = prepared[start : start + size]
            maps = [
                torch.cat([e.maps[layer] for e in entries]).to(parts.device)
                for layer in range(len(entries[0].maps))
            ]
            items = [LoadedImage(start + k, e.source, None, None) for k, e in enumerate(entries)]
            yield EmbeddedBatch(
                items,
                list(range(len(items))),
                parts.features.aggregate(maps),
                [e.hash for e in entries],
            )
        return
    for batch in iter_loaded(images, size, prepare=parts.preprocessor.resize, digest=True):
        good = [k for k, item in enumerate(batch) if item.image is not None]
        inputs = parts.preprocessor.batch([batch[k].prepared for k in good]) if good else None
        yield EmbeddedBatch(
            batch,
            good,
            parts.embed(inputs) if inputs is not None else None,
            [str(batch[k].digest) for k in good],
            inputs,
        )


def shard_quota(
    n_patches: int, grid: tuple[int, int], plan: FitPlan, config: DetectorConfig
) -> int:
    """Candidates a chunk keeps: ``oversample`` x its share of the planned final bank.

    One chunk keeps everything (the final selection is then the single-level coreset), as does
    coreset method 'none'.
    """
    if plan.single_chunk or config.coreset.method == "none" or n_patches == 0:
        return n_patches
    planned_patches = plan.n_bank_images * len(plan.views) * grid[0] * grid[1]
    target = max(bank_target(planned_patches, config.coreset), min(planned_patches, plan.min_bank))
    share = target * n_patches / max(1, planned_patches)
    return min(n_patches, max(1, math.ceil(config.fit.oversample * share)))


# --------------------------------------------------------------------------------- merging
@dataclass
class FitResult:
    """What a fit learns: the scorer (memory bank and kNN index), the thresholds, and what is
    recorded about the fit (the model's metadata)."""

    scorer: AnomalyScorer
    calibration: Calibration
    info: FitInfo
    calibration_images: list[tuple[int, str]] = field(default_factory=list)  # (index, name)


def fit_from_shards(
    parts: FeatureParts,
    config: DetectorConfig,
    shards: Sequence[FitShard],
    plan: FitPlan,
    progress: ProgressFn | None = None,
    selection: SelectionResult | None = None,
) -> FitResult:
    """Final coreset, scorer, calibration and drift reference from the shards of ``plan``."""
    start = time.perf_counter()
    shards = sorted(shards, key=lambda s: s.offset)
    check_coverage(shards, plan)
    device = parts.device
    ids = [i for s in shards for i in s.image_ids]
    n_images = len(ids)
    if n_images == 0:
        raise DefectscopeError("no readable training image: every image failed to load")
    if plan.method == "leave_one_out" and n_images < 2:
        raise DefectscopeError("leave-one-out calibration needs at least 2 good images")
    n_in_bank = sum(1 for i in ids if plan.in_bank(i))
    if n_in_bank == 0:
        raise DefectscopeError("no readable training image is left for the memory bank")
    timings = {
        "features_s": sum(s.timings.get("features_s", 0.0) for s in shards),
        "shard_coreset_s": sum(s.timings.get("coreset_s", 0.0) for s in shards),
    }

    t0 = time.perf_counter()
    candidates = torch.cat([read_rows(s.candidates) for s in shards]).to(device)
    owners = torch.cat([s.candidate_owners for s in shards])
    n_patches = sum(s.n_patches for s in shards)
    report = (lambda d, t: progress("coreset", d, t)) if progress else None
    target = max(bank_target(n_patches, config.coreset), min(n_patches, plan.min_bank))
    chosen, pool = choose_coreset(candidates, config.coreset, report, n_select=target)
    bank = candidates[chosen].contiguous()
    bank_owner = owners[chosen.cpu()]
    n_candidates = int(candidates.shape[0])
    timings["final_coreset_s"] = time.perf_counter() - t0
    stand_ins = None
    if plan.method == "leave_one_out":
        t0 = time.perf_counter()
        stand_ins = find_stand_ins(bank, bank_owner, candidates[pool], owners[pool.cpu()])
        timings["stand_ins_s"] = time.perf_counter() - t0
    del candidates
    timings["coreset_s"] = timings["shard_coreset_s"] + timings["final_coreset_s"]

    scorer = AnomalyScorer(
        bank, config.scoring, config.features.input_size, parts.features.column_groups
    ).to(device)

    # The edge profile and the tail spread (see calibration) were measured from 40 images up:
    # few-shot fits learn no profile and keep their own calibration as it was.
    few_shot_fit = selection is not None and bool(selection.few_shot)
    learn_edges = config.scoring.edge_correction and scorer.groups is None and not few_shot_fit
    if plan.method == "leave_one_out" and learn_edges:
        t0 = time.perf_counter()
        sample = leave_one_out_patch_scores(
            scorer, config.batch_size, shards, bank_owner, stand_ins
        )
        scorer.set_edge_profile(learn_edge_profile(sample))
        timings["edge_profile_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if plan.method == "halves":
        halves = (selection.few_shot if selection is not None else {}).get("halves_scores")
        if not halves:
            raise DefectscopeError("'halves' calibration needs the few-shot selection's scores")
        # Image scores are map maxima inside each half: one list serves both thresholds.
        good_scores = good_maxima = np.asarray(halves, dtype=np.float64)
    else:
        good_scores, good_maxima, pass_scores = calibration_scores(
            scorer, config.batch_size, shards, bank_owner, plan, progress, stand_ins
        )
        weighed = weigh_passes(scorer, pass_scores, config.calibration.false_alarm_rate)
        if weighed is not None:
            # The map is now in the image score's units: its maxima again, under them.
            good_scores = weighed
            _, good_maxima, _ = calibration_scores(
                scorer, config.batch_size, shards, bank_owner, plan, None, stand_ins
            )
    spread = 1.0
    if plan.method == "leave_one_out" and not few_shot_fit:
        spread = config.calibration.tail_spread
    calibration = calibrate(
        good_scores, good_maxima, config.calibration.false_alarm_rate, plan.method, spread
    )
    timings["calibration_s"] = time.perf_counter() - t0

    hashes = [h for s in shards for h in s.hashes]
    names = [n for s in shards for n in s.names]
    info = FitInfo(
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        training=TrainingInfo(
            n_images=n_images,
            n_in_bank=n_in_bank,
            n_patches=n_patches,
            fingerprint=hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest()[:32],
            skipped=[entry for s in shards for entry in s.skipped],
            examples=[n for n in names[:5] if n],
            n_chunks=len(shards),
            n_candidates=n_candidates,
            n_calibration=int(good_scores.shape[0]),
        ),
        bank_size=int(bank.shape[0]),
    )
    t0 = time.perf_counter()
    pooled = np.concatenate([s.pooled for s in shards])
    reference = None
    if pooled.shape[0] >= 2:
        # Feature-distribution reference for drift monitoring (defectscope.monitoring).
        reference = compute_reference(pooled, seed=config.coreset.seed).to_dict()
    timings["reference_s"] = time.perf_counter() - t0
    timings["total_s"] = timings["features_s"] + timings["shard_coreset_s"]
    timings["total_s"] += time.perf_counter() - start
    if selection is not None:
        info.selection = selection.to_dict()
        timings["selection_s"] = selection.seconds
    info.timings = {k: round(v, 4) for k, v in timings.items()}
    info.reference = reference
    scored = calibration_images(shards) if plan.method == "leave_one_out" else []
    info.training.suspects = suspect_images(calibration.good_scores, scored)
    return FitResult(scorer, calibration, info, scored)


def check_coverage(shards: Sequence[FitShard], plan: FitPlan) -> None:
    """Shards (sorted by offset) must tile the plan's images exactly once."""
    position = 0
    for shard in shards:
        if shard.offset != position or shard.stop <= shard.offset:
            raise DefectscopeError(
                f"shards do not tile the plan: expected one starting at image {position}, got "
                f"[{shard.offset}, {shard.stop})"
            )
        position = shard.stop
    if position != plan.n_images:
        raise DefectscopeError(
            f"shards cover images [0, {position}) but the plan has {plan.n_images} images"
        )


def iter_calibration_batches(
    shards: Sequence[FitShard], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(global ids, embeddings) of the calibration sample in batches, one shard at a time."""
    for shard in shards:
        for start in range(0, len(shard.calibration_ids), batch_size):
            ids = shard.calibration_ids[start : start + batch_size]
            yield ids, read_rows(shard.calibration_embeddings, start, start + len(ids))


@torch.inference_mode()
def calibration_scores(
    scorer: AnomalyScorer,
    batch_size: int,
    shards: Sequence[FitShard],
    bank_owner: torch.Tensor,
    plan: FitPlan,
    progress: ProgressFn | None,
    stand_ins: StandIns | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Out-of-sample image scores and map maxima of the calibration sample, and for a bank of
    passes each pass's own image scores (P, N)."""
    total = sum(len(s.calibration_ids) for s in shards)
    if total == 0:
        raise DefectscopeError("no readable calibration image: every one failed to load")
    device = scorer.bank.device
    owner_on_device = bank_owner.to(device)
    scores, maxima, by_pass = [], [], []
    done = 0
    for ids, embeddings in iter_calibration_batches(shards, batch_size):
        embeddings = embeddings.to(device)
        pass_scores = None
        if plan.method == "leave_one_out":
            # Each image is scored against the bank without its own patches, which stand-ins
            # replace (see leave_one_out): an out-of-sample score for every training image from
            # a single bank. Always exact search, one search for the whole batch.
            own, extra = own_rows_and_stand_ins(ids, owner_on_device, stand_ins)
            peaks = leave_one_out_maxima(scorer, embeddings, own, extra)
            if peaks is not None:  # the image score is the map's maximum: no map needed
                map_maxima, pass_scores = peaks
                maps = map_maxima[:, None]
                weighed = scorer.weigh_pass_scores(pass_scores)
                image_scores = map_maxima if weighed is None else weighed
            else:
                maps, image_scores, pass_scores = scorer.score_excluding_by_pass(
                    embeddings, own, extra
                )
        else:
            maps, image_scores, pass_scores = scorer.score_by_pass(embeddings)
        scores.append(image_scores.cpu())
        maxima.append(maps.flatten(1).amax(1).cpu())
        if pass_scores is not None:
            by_pass.append(pass_scores.cpu())
        done += len(ids)
        if progress:
            progress("calibration", done, total)
    per_pass = torch.cat(by_pass, dim=1).numpy() if by_pass else None
    return torch.cat(scores).numpy(), torch.cat(maxima).numpy(), per_pass


@torch.inference_mode()
def leave_one_out_patch_scores(
    scorer: AnomalyScorer,
    batch_size: int,
    shards: Sequence[FitShard],
    bank_owner: torch.Tensor,
    stand_ins: StandIns | None,
) -> torch.Tensor:
    """Leave-one-out patch scores (N, h, w) of up to `SAMPLE_IMAGES` calibration images spread
    evenly over the sample, before any edge profile (what one is learned from)."""
    total = sum(len(s.calibration_ids) for s in shards)
    step = max(1, math.ceil(total / SAMPLE_IMAGES))
    owner_on_device = bank_owner.to(scorer.bank.device)
    found, position = [], 0
    for ids, embeddings in iter_calibration_batches(shards, batch_size):
        keep = [i for i in range(len(ids)) if (position + i) % step == 0]
        position += len(ids)
        if not keep:
            continue
        chosen = [ids[i] for i in keep]
        own, extra = own_rows_and_stand_ins(chosen, owner_on_device, stand_ins)
        batch = embeddings[keep].to(scorer.bank.device)
        found.append(scorer.patch_scores_excluding(batch, own, extra).cpu())
    # None at all: no profile is learned, and the calibration says why.
    return torch.cat(found) if found else torch.empty(0, 0, 0)


def weigh_passes(
    scorer: AnomalyScorer, pass_scores: np.ndarray | None, false_alarm_rate: float
) -> np.ndarray | None:
    """Set each pass's weight, in the image score and in the map, to 1 / its own threshold on
    the good images' ``pass_scores`` (P, N), and return their image scores so weighed (None:
    not a bank of passes, nothing set)."""
    if scorer.groups is None or pass_scores is None:
        return None
    q = 1.0 - false_alarm_rate
    thresholds = [spread_quantile(row, q, 1.0) for row in pass_scores]
    # A pass whose good scores are all zero (identical images) has no unit: it counts as is.
    weights = [1.0 / t if t > 0 and np.isfinite(t) else 1.0 for t in thresholds]
    scorer.set_score_weights(weights)
    scorer.group_weights = list(weights)
    return np.sum(pass_scores * np.asarray(weights)[:, None], axis=0)
