"""The maximum of each leave-one-out anomaly map, without every patch's exact distance.

Calibration needs each training image's map maximum (its image score under reduction 'max'),
not the map. A map is a linear function of the patch distances with non-negative weights
(upsampling, then the blur), so a map made from upper bounds of the distances lies above the
true map everywhere, and equals it at a pixel all of whose patches are exact. The bfloat16
screen, or on CPUs without it a float32 search in the bank's principal directions (`knn_guess`),
gives the bounds cheaply (`TorchKnn.upper_bounds`: one row per patch, nearly always the
nearest). Then, per image: find the pixel where the map of the current values peaks; if all its
patches are exact, that peak is the true maximum (every other pixel's true value lies below its
bound, which lies below the peak); otherwise search those patches exactly and look again.
About one or two rounds of some 50 patches replace an exact search of every patch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from defectscope.detector.knn import GroupExclusion, TorchKnn
from defectscope.detector.scoring import AnomalyScorer, sum_passes


@dataclass
class _Pass:
    """One pass's search (one column group of the bank): its queries, its distances so far
    (upper bounds, exact where searched), to its image's stand-ins, and which are exact."""

    index: TorchKnn
    queries: torch.Tensor
    values: torch.Tensor
    to_extra: torch.Tensor | None
    exact: torch.Tensor


def leave_one_out_maxima(
    scorer: AnomalyScorer,
    embeddings: torch.Tensor,
    own: Sequence[torch.Tensor],
    extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The maxima (B,) of the maps `AnomalyScorer.score_excluding` would return for the same
    arguments, and for a bank of passes those of each pass's own map (P, B; else None); or None
    where this shortcut does not apply (a search without cheap bounds, k > 1, or an image score
    other than the map's maximum). A bank of several passes adds up each pass's bound (in its
    units), a bound of the sum; a patch is exact once every pass is."""
    config = scorer.config
    indexes = scorer.group_indexes()
    if not all(isinstance(index, TorchKnn) and index.has_bounds for index in indexes):
        return None
    if config.k != 1 or config.reduction != "max":
        return None
    b, d, h, w = embeddings.shape
    patches = h * w
    queries = embeddings.permute(0, 2, 3, 1).reshape(b * patches, d)
    spans = scorer.groups or [(0, d)]
    passes = []
    for (start, stop), index in zip(spans, indexes, strict=True):
        assert isinstance(index, TorchKnn)
        part = queries if scorer.groups is None else queries[:, start:stop].contiguous()
        values = index.upper_bounds(part, GroupExclusion(patches, own)).reshape(b, patches)
        # Stand-ins are exact already: every patch's distance to its image's nearest one, once.
        to_extra = None
        if extra is not None:
            columns = [(rows[:, start:stop], reported) for rows, reported in extra]
            to_extra = _nearest_extra(part, patches, columns)
            values = torch.minimum(values, to_extra)
        exact = torch.zeros(b, patches, dtype=torch.bool, device=queries.device)
        passes.append(_Pass(index, part, values, to_extra, exact))
    if not all(bool(torch.isfinite(p.values).all()) for p in passes):
        return None  # an image with nothing left to find: the full path reports it
    maxima = _peaks(scorer, passes, scorer.group_weights, (h, w), own)
    if scorer.groups is None:
        return maxima, None
    # Each pass's own peak: exact distances found above are reused.
    return maxima, torch.stack([_peaks(scorer, [one], None, (h, w), own) for one in passes])


def _peaks(
    scorer: AnomalyScorer,
    passes: list[_Pass],
    weights: Sequence[float] | None,
    grid: tuple[int, int],
    own: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Exact maxima (B,) of the maps of ``passes``' distances summed with ``weights``: find the
    pixel where the map of the current values peaks; if all its patches are exact in every
    pass, that is the maximum, else search them exactly and look again."""
    h, w = grid
    patches = h * w
    rows, cols = scorer.map_operators(h, w)
    b = passes[0].values.shape[0]
    maxima = passes[0].values.new_empty(b)
    pending = list(range(b))
    while pending:
        values = sum_passes([p.values for p in passes], weights)
        patch_scores = scorer.correct_edges(values[pending].reshape(-1, h, w))
        maps = scorer.to_input_maps(patch_scores).flatten(1)
        peaks = maps.argmax(dim=1)
        missing: list[list[tuple[int, torch.Tensor]]] = [[] for _ in passes]
        searching: list[int] = []
        for row, image in enumerate(pending):
            pixel = int(peaks[row])
            support = _support(rows[pixel // cols.shape[0]], cols[pixel % cols.shape[0]], w)
            unknown = [support[~p.exact[image, support]] for p in passes]
            if any(found.numel() for found in unknown):
                searching.append(image)
                for number, found in enumerate(unknown):
                    if found.numel():
                        missing[number].append((image, found))
            else:
                maxima[image] = maps[row, pixel]
        for search, wanted in zip(passes, missing, strict=True):
            if wanted:
                _search_exactly(
                    search.index,
                    search.queries,
                    patches,
                    wanted,
                    own,
                    search.to_extra,
                    search.values,
                )
                for image, found in wanted:
                    search.exact[image, found] = True
        pending = searching
    return maxima


def _support(row_weights: torch.Tensor, col_weights: torch.Tensor, width: int) -> torch.Tensor:
    """Flat indices of the patches with a non-zero weight at one pixel."""
    i = row_weights.nonzero().flatten()
    j = col_weights.nonzero().flatten()
    return (i[:, None] * width + j[None, :]).flatten()


def _nearest_extra(
    queries: torch.Tensor, patches: int, extra: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """(B, patches): each patch's distance to its image's nearest extra row (+inf if none)."""
    out = torch.full((len(extra), patches), float("inf"), device=queries.device)
    for image, (rows, _) in enumerate(extra):
        if rows.shape[0]:
            span = queries[image * patches : (image + 1) * patches]
            out[image] = torch.cdist(span, rows.to(queries.dtype)).amin(dim=1)
    return out


def _search_exactly(
    index: TorchKnn,
    queries: torch.Tensor,
    patches: int,
    missing: list[tuple[int, torch.Tensor]],
    own: Sequence[torch.Tensor],
    to_extra: torch.Tensor | None,
    values: torch.Tensor,
) -> None:
    """Exact distances of the ``missing`` patches of each image (the nearer of the bank search
    and ``to_extra``, the distances to the stand-ins), in one search: every image's list is
    padded to the same length (repeating its first patch) for the group exclusion."""
    length = max(len(found) for _, found in missing)
    padded = [torch.cat([found, found[:1].expand(length - len(found))]) for _, found in missing]
    starts = [image * patches for image, _ in missing]
    flat = torch.cat([start + found for start, found in zip(starts, padded, strict=True)])
    groups = GroupExclusion(length, [own[image] for image, _ in missing])
    dist, _ = index.search(queries[flat], 1, exclude=groups)
    dist = dist[:, 0].reshape(len(missing), length)
    for row, (image, found) in enumerate(missing):
        best = dist[row, : len(found)]
        if to_extra is not None:
            best = torch.minimum(best, to_extra[image, found])
        values[image, found] = best
