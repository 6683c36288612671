"""From patch embeddings to an anomaly map and an image score.

The map is the distance of each patch to its nearest memory-bank patches, upsampled to the input
size and Gaussian-smoothed. A bank of several passes (`PatchFeatures.column_groups`: the image at
full and at half size) is searched once per pass, on that pass's columns: each pass finds its own
nearest patch, and the distances add up, each in its pass's units, so neither pass drowns the
other: the typical gap between good patches (`group_weights`) until the calibration measures
each pass's threshold on good images and makes that its unit. The image score is a reduction of
that map (so a mask drawn at the image threshold and the image decision agree), or PatchCore's
re-weighted maximum. A bank of passes scores an image per pass and adds the passes' scores in
the same units (``score_weights``): a pass that sees a defect counts in full, and one that
separates nothing on a product cannot raise every good image to a defect's score.

Upsampling and smoothing are both linear and separable, so `AnomalyScorer.to_input_maps` applies
them as two small matrix products per map (``A_h @ P @ A_w.T``) instead of interpolating and
convolving a full-size map; `gaussian_blur` is the reference it is built from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.config import ScoringConfig
from defectscope.detector.edge_profile import EdgeProfile
from defectscope.detector.knn import GroupExclusion, KnnIndex, TorchKnn, build_index
from defectscope.errors import ConfigError

# Rows of the bank whose nearest other row sets a pass's unit of distance (`group_weights`).
WEIGHT_SAMPLE_ROWS = 4096


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of (B, H, W) maps with reflected borders."""
    radius = kernel.numel() // 2
    x = maps[:, None]
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


def blur_mode(size: tuple[int, int], kernel: torch.Tensor) -> str:
    """The border rule of `gaussian_blur` for maps of ``size``."""
    return "reflect" if min(size) > kernel.numel() // 2 else "replicate"


def axis_operator(n_in: int, n_out: int, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """(n_out, n_in) matrix of one axis of `to_input_maps`: linear upsampling (as bilinear with
    ``align_corners=False`` does along each axis), then the 1-D blur with ``mode`` borders."""
    basis = torch.eye(n_in, dtype=torch.float64)[:, None]
    x = F.interpolate(basis, size=n_out, mode="linear", align_corners=False)
    if kernel.numel() > 1:
        radius = kernel.numel() // 2
        x = F.conv1d(F.pad(x, (radius, radius), mode=mode), kernel.double().view(1, 1, -1))
    return x[:, 0].T.contiguous()


def merge_extra_rows(
    queries: torch.Tensor,
    dist: torch.Tensor,
    idx: torch.Tensor,
    rows_per_group: int,
    extra: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest of (found bank rows, group g's extra rows) for every query of group g."""
    dist, idx = dist.clone(), idx.clone()
    k = dist.shape[1]
    for group, (rows, reported) in enumerate(extra):
        if rows.shape[0] == 0:
            continue
        span = slice(group * rows_per_group, (group + 1) * rows_per_group)
        to_extra = torch.cdist(queries[span], rows.to(queries.dtype))
        both = torch.cat([dist[span], to_extra], dim=1)
        names = torch.cat([idx[span], reported.to(idx.device).expand(to_extra.shape[0], -1)], 1)
        best = both.topk(k, dim=1, largest=False, sorted=True).indices
        dist[span], idx[span] = both.gather(1, best), names.gather(1, best)
    return dist, idx


def group_weights(bank: torch.Tensor, groups: Sequence[tuple[int, int]]) -> list[float]:
    """1 / (median distance from a bank row to its nearest other row) in each column group: the
    unit in which that pass's distances count. Rows evenly spaced through the bank stand for all."""
    step = max(1, bank.shape[0] // WEIGHT_SAMPLE_ROWS)
    sample = torch.arange(0, bank.shape[0], step, device=bank.device)[:WEIGHT_SAMPLE_ROWS]
    weights = []
    for start, stop in groups:
        columns = bank[:, start:stop].float()
        gaps = torch.cdist(columns[sample], columns)
        gaps[torch.arange(sample.numel(), device=bank.device), sample] = float("inf")
        nearest = gaps.amin(dim=1)
        positive = nearest[torch.isfinite(nearest) & (nearest > 0)]
        # A bank of repeated rows has no gap to measure: distances count as they are.
        weights.append(1.0 / float(positive.median()) if positive.numel() else 1.0)
    return weights


def sum_passes(distances: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """The patch distances (or image scores) of a bank of passes: one pass's own, or each
    pass's values times its weight, added in pass order (the scorer, its leave-one-out peaks
    and the export agree to the bit). Traceable."""
    if weights is None or len(distances) == 1:
        return distances[0]
    total = distances[0] * weights[0]
    for dist, weight in zip(distances[1:], weights[1:], strict=True):
        total = total + dist * weight
    return total


class AnomalyScorer(nn.Module):
    """Memory bank plus the scoring rules; ``forward`` takes (B, D, h, w) patch embeddings."""

    # Registered buffers (they follow .to(device)); declared so type checkers see tensors.
    bank: torch.Tensor
    blur_kernel: torch.Tensor

    def __init__(
        self,
        bank: torch.Tensor,
        config: ScoringConfig,
        input_size: tuple[int, int],
        groups: Sequence[Sequence[int]] | None = None,
        weights: Sequence[float] | None = None,
        score_weights: Sequence[float] | None = None,
    ) -> None:
        """``groups``: column spans [start, stop) searched apart (one per pass), with their
        map ``weights`` (measured on ``bank`` when not given: a fit's; a loaded model keeps
        them) and the ``score_weights`` of their image scores (None: the image score is a
        reduction of the summed map; the calibration sets them, `set_score_weights`)."""
        super().__init__()
        self.config = config
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.register_buffer("bank", bank.float().contiguous())
        sigma = config.smoothing_sigma
        self.register_buffer(
            "blur_kernel", gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        )
        self.groups: list[tuple[int, int]] | None = None
        self.group_weights: list[float] | None = None
        self.score_weights: list[float] | None = None
        if groups is not None and len(groups) > 1:
            self.groups = [(int(start), int(stop)) for start, stop in groups]
            edges = [edge for span in self.groups for edge in span]
            if (
                edges[0] != 0
                or edges[-1] != self.bank.shape[1]
                or edges != sorted(edges)
                or any(a != b for a, b in zip(edges[1:-1:2], edges[2::2], strict=True))
            ):
                raise ConfigError(
                    f"column groups {self.groups} do not tile the bank's {self.bank.shape[1]} "
                    "columns"
                )
            if config.reduction == "patchcore":
                raise ConfigError(
                    "scoring.reduction 'patchcore' re-weights one nearest bank patch; with "
                    "features.half_scale each pass has its own: use 'max' or 'topk_mean'"
                )
            given = None if weights is None else self._checked_weights(weights, "column group")
            self.group_weights = given or group_weights(self.bank, self.groups)
            if score_weights is not None:
                self.set_score_weights(score_weights)
        # Learned by a leave-one-out fit of one pass (`edge_profile`); None scores edges as is.
        self.edge_profile: EdgeProfile | None = None
        self._index: KnnIndex | None = None
        self._group_indexes: list[KnnIndex] | None = None
        self._operators: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._edge_scales: dict[tuple, torch.Tensor] = {}

    def _checked_weights(self, weights: Sequence[float], name: str) -> list[float]:
        """One finite positive number per pass (model files are read through here)."""
        try:
            if isinstance(weights, str | bytes):
                raise TypeError
            given = [float(w) for w in weights]
        except (TypeError, ValueError):
            raise ConfigError(f"{name} weights {weights!r} are not a list of numbers") from None
        groups = self.groups or []
        if len(given) != len(groups) or not all(math.isfinite(w) and w > 0 for w in given):
            raise ConfigError(f"{name} weights {given} do not fit {self.groups}")
        return given

    def set_score_weights(self, weights: Sequence[float]) -> None:
        """The weight of each pass's image score (one positive number per pass)."""
        self.score_weights = self._checked_weights(weights, "image score")

    @property
    def index(self) -> KnnIndex:
        if (
            self._index is None
            or getattr(self._index, "device", self.bank.device) != self.bank.device
        ):
            self._index = build_index(
                self.bank,
                self.config.knn_backend,
                self.config.chunk_size,
                self.config.faiss_min_bank,
                self.config,
            )
        return self._index

    def groups_metadata(self) -> dict[str, dict[str, list]]:
        """What a model file keeps of a bank of several passes (`load_scorer` reads it back):
        their columns and units of distance; nothing for a single pass."""
        if self.groups is None or self.group_weights is None:
            return {}
        spans = [list(span) for span in self.groups]
        kept: dict[str, list] = {"spans": spans, "weights": list(self.group_weights)}
        if self.score_weights is not None:
            kept["score_weights"] = list(self.score_weights)
        return {"column_groups": kept}

    def edge_metadata(self) -> dict[str, dict[str, Any]]:
        """What a model file keeps of the edge profile (nothing without one)."""
        return {} if self.edge_profile is None else {"edge_profile": self.edge_profile.to_dict()}

    def set_edge_profile(self, profile: EdgeProfile | None) -> None:
        """Score edge patches with ``profile`` (None: as they are). One pass only: a bank of
        passes sums passes whose edges differ."""
        if profile is not None and self.groups is not None:
            raise ConfigError("an edge profile applies to a bank of one pass")
        self.edge_profile = profile
        self._edge_scales = {}

    def correct_edges(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Patch scores (B, h, w) with each edge patch's excess over the profile's centre
        divided by its ring's factor (`edge_profile`); unchanged without a profile."""
        profile = self.edge_profile
        if profile is None:
            return patch_scores
        h, w = int(patch_scores.shape[-2]), int(patch_scores.shape[-1])
        key = (h, w, patch_scores.device)
        if key not in self._edge_scales:
            self._edge_scales[key] = profile.scale_map(h, w, patch_scores.device)
        centre = profile.centre
        return (patch_scores - centre) * self._edge_scales[key] + centre

    def group_indexes(self) -> list[KnnIndex]:
        """One index per column group, on that group's columns of the bank."""
        if self.groups is None:
            return [self.index]
        if self._group_indexes is None or any(
            getattr(index, "device", self.bank.device) != self.bank.device
            for index in self._group_indexes
        ):
            self._group_indexes = [
                build_index(
                    self.bank[:, start:stop].contiguous(),
                    self.config.knn_backend,
                    self.config.chunk_size,
                    self.config.faiss_min_bank,
                    self.config,
                )
                for start, stop in self.groups
            ]
        return self._group_indexes

    def _apply(self, fn, recurse=True):
        self._index = None  # the index holds device copies; rebuild after .to()/.half()
        self._group_indexes = None
        self._operators = {}
        self._edge_scales = {}
        return super()._apply(fn, recurse)

    def _search(
        self,
        queries: torch.Tensor,
        banned: torch.Tensor | None = None,
        exclude: GroupExclusion | None = None,
        extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        rows_per_group: int = 0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per column group, its k nearest distances (N, k), and the first group's bank
        indices (N, k)."""
        spans = self.groups or [(0, self.bank.shape[1])]
        found = []
        for (start, stop), index in zip(spans, self.group_indexes(), strict=True):
            part = queries if self.groups is None else queries[:, start:stop].contiguous()
            if banned is not None or exclude is not None:
                if not isinstance(index, TorchKnn):
                    index = TorchKnn(self.bank[:, start:stop].contiguous())
                dist, idx = index.search(part, self.config.k, banned=banned, exclude=exclude)
            else:
                dist, idx = index.search(part, self.config.k)
            if extra is not None:
                columns = [(rows[:, start:stop], reported) for rows, reported in extra]
                dist, idx = merge_extra_rows(part, dist, idx, rows_per_group, columns)
            found.append((dist, idx))
        return [dist for dist, _ in found], found[0][1]

    def patch_distances(
        self, embeddings: torch.Tensor, banned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Queries (B*h*w, D), each pass's k nearest distances (B*h*w, k) and the bank indices
        (the first pass's)."""
        b, d, h, w = embeddings.shape
        queries = embeddings.permute(0, 2, 3, 1).reshape(b * h * w, d)
        passes, idx = self._search(queries, banned=banned)
        return queries, passes, idx

    def forward(
        self, embeddings: torch.Tensor, banned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (anomaly maps (B, H, W) at input size, image scores (B,))."""
        maps, scores, _ = self.score_by_pass(embeddings, banned)
        return maps, scores

    def score_by_pass(
        self, embeddings: torch.Tensor, banned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As ``forward``, plus each pass's own image scores (P, B) for a bank of passes
        (None for one pass)."""
        queries, passes, idx = self.patch_distances(embeddings, banned)
        return self.maps_and_scores(
            passes, idx, queries, (embeddings.shape[2], embeddings.shape[3])
        )

    def score_excluding(
        self,
        embeddings: torch.Tensor,
        own: Sequence[torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``forward``, but batch item i never finds the bank rows ``own[i]`` (leave-one-out
        scores of a whole batch in one exact search, the same as one ``banned`` call each).
        ``extra[i]`` = (rows (m, D), bank index of each): rows item i also searches, a hit
        reported as that bank index (leave-one-out's stand-ins)."""
        maps, scores, _ = self.score_excluding_by_pass(embeddings, own, extra)
        return maps, scores

    def score_excluding_by_pass(
        self,
        embeddings: torch.Tensor,
        own: Sequence[torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """As `score_excluding`, plus each pass's own image scores (P, B) for a bank of
        passes (None for one pass)."""
        passes, idx, queries = self._search_excluding(embeddings, own, extra)
        return self.maps_and_scores(
            passes, idx, queries, (embeddings.shape[2], embeddings.shape[3])
        )

    def patch_scores_excluding(
        self,
        embeddings: torch.Tensor,
        own: Sequence[torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The leave-one-out patch scores (B, h, w) of `score_excluding`, before the edge
        profile (what `edge_profile.learn_edge_profile` learns from); a bank of one pass."""
        if self.groups is not None:
            raise ConfigError("leave-one-out patch scores are those of a bank of one pass")
        [distances], _, _ = self._search_excluding(embeddings, own, extra)
        return distances.mean(dim=1).reshape(-1, *embeddings.shape[-2:])

    def _search_excluding(
        self,
        embeddings: torch.Tensor,
        own: Sequence[torch.Tensor],
        extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The batched leave-one-out search of (B, D, h, w) embeddings: each pass's distances,
        the bank indices and the queries (B*h*w, D), as `_search` returns them."""
        b, d, h, w = embeddings.shape
        queries = embeddings.permute(0, 2, 3, 1).reshape(b * h * w, d)
        exclude = GroupExclusion(h * w, own)
        passes, idx = self._search(queries, exclude=exclude, extra=extra, rows_per_group=h * w)
        return passes, idx, queries

    def maps_and_scores(
        self,
        passes: list[torch.Tensor],
        idx: torch.Tensor,
        queries: torch.Tensor,
        grid: tuple[int, int],
        to_maps: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each pass's k nearest distances (B*h*w, k), the bank indices and the queries
        (B*h*w, D) -> (maps, image scores, each pass's image scores (P, B) or None). Traceable
        (the export passes its own ``to_maps``, `to_input_maps` held as buffers)."""
        h, w = grid
        to_maps = to_maps or self.to_input_maps
        pass_patches = [self.correct_edges(dist.mean(dim=1).reshape(-1, h, w)) for dist in passes]
        patch_scores = sum_passes(pass_patches, self.group_weights)
        maps = to_maps(patch_scores)
        rows = queries.reshape(-1, h * w, queries.shape[-1])
        per_pass = None
        if self.groups is not None:
            per_pass = torch.stack([self.reduce(to_maps(p), p, rows, idx) for p in pass_patches])
        return maps, self.image_scores(maps, patch_scores, rows, idx, per_pass), per_pass

    def image_scores(
        self,
        maps: torch.Tensor,
        patch_scores: torch.Tensor,
        queries: torch.Tensor,
        idx: torch.Tensor,
        per_pass: torch.Tensor | None,
    ) -> torch.Tensor:
        """Image scores (B,): for a bank of passes with score weights, `weigh_pass_scores` of
        each pass's score (``per_pass`` (P, B)); else the reduction of the map. Traceable."""
        weighed = self.weigh_pass_scores(per_pass)
        return self.reduce(maps, patch_scores, queries, idx) if weighed is None else weighed

    def weigh_pass_scores(self, per_pass: torch.Tensor | None) -> torch.Tensor | None:
        """The passes' image scores (P, B), each in its units, added (None without weights)."""
        if self.score_weights is None or per_pass is None:
            return None
        return sum_passes(list(per_pass), self.score_weights)

    def map_operators(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_h (H, h), A_w (W, w)) with maps = A_h @ patch_scores @ A_w.T (cached per grid)."""
        key = (h, w, self.blur_kernel.device)
        if key not in self._operators:
            kernel = self.blur_kernel.detach().cpu()
            mode = blur_mode(self.input_size, kernel)
            rows = axis_operator(h, self.input_size[0], kernel, mode)
            cols = axis_operator(w, self.input_size[1], kernel, mode)
            device = self.blur_kernel.device
            self._operators[key] = (rows.float().to(device), cols.float().to(device))
        return self._operators[key]

    def to_input_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Patch scores (B, h, w) -> maps (B, H, W): bilinear upsampling, then the blur."""
        rows, cols = self.map_operators(patch_scores.shape[1], patch_scores.shape[2])
        return rows @ (patch_scores.float() @ cols.T)

    def reduce(
        self,
        maps: torch.Tensor,
        patch_scores: torch.Tensor,
        queries: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        """Image scores (B,) from maps (B, H, W), patch scores (B, h, w), queries (B, h*w, D)
        and nearest bank indices (B*h*w, k). Traceable: the ONNX export calls this too."""
        method = self.config.reduction
        flat = maps.flatten(1)
        if method == "max":
            return flat.amax(dim=1)
        if method == "topk_mean":
            k = max(1, math.ceil(self.config.topk_fraction * flat.shape[1]))
            return flat.topk(k, dim=1).values.mean(dim=1)
        return self._patchcore_reweight(patch_scores.flatten(1), queries, idx)

    def _patchcore_reweight(
        self, patch_scores: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        # PatchCore eq. 7: damp the max patch score when its nearest bank patch sits in a dense
        # region of the bank (the patch is unusual but its neighbourhood is well represented).
        # Gathers rather than indexing by an arange, which a tracer would bake to one batch size.
        n = patch_scores.shape[1]
        top = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
        score = patch_scores.gather(1, top)[:, 0]
        nearest = idx[:, 0].reshape(-1, n).gather(1, top)[:, 0]  # (B,)
        support_k = min(self.config.reweight_neighbours, self.bank.shape[0])
        bank_sq = (self.bank * self.bank).sum(dim=1)
        centre = self.bank.index_select(0, nearest)
        to_bank = (
            bank_sq[None] - 2.0 * centre @ self.bank.T + bank_sq.index_select(0, nearest)[:, None]
        )
        support = to_bank.topk(support_k, dim=1, largest=False).indices  # (B, S)
        d = queries.shape[2]
        query = queries.gather(1, top[:, :, None].expand(-1, 1, d))  # (B, 1, D)
        neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(-1, support_k, d)
        support_dist = (query - neighbours).norm(dim=2)
        weight = 1.0 - torch.softmax(support_dist, dim=1)[:, 0]
        return weight * score
