"""Cheap upper bounds of nearest-neighbour distances in float32, where bfloat16 is slow.

Any bank row a cheaper search finds is a real row, so its exact distance bounds the nearest
row's distance from above, and equals it where the cheap search found the nearest row. Here the
cheap search is an inverted file: k-means splits the bank into about sqrt(M) clusters, and each
query is compared with the cluster centres, then with the rows of its `GUESS_PROBES` nearest
clusters only (a few percent of the bank). On MVTec bottle (6 688 x 152 bank, 64 clusters) 96 %
of the bounds are the nearest distance, at a third of the time of a search in the bank's 32
principal directions (which found 92 %). `map_maxima` needs only such bounds: it searches
exactly the few patches that decide each map's maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GUESS_PROBES = 2  # clusters searched per query: one more catches most queries near a border
# Queries per pass: several hundred per cluster, so the products stay large and the loop over
# clusters runs few times (its Python overhead is measurable at 8 192).
GUESS_CHUNK = 32768
KMEANS_ROUNDS = 8  # Lloyd rounds: the clusters only steer the search, they need not converge
MAX_CLUSTERS = 1024
# Beyond this many rows (a bank without a coreset) calibration keeps the exact search, measured
# on coreset banks only.
GUESS_MAX_BANK = 20_000


class ClusterGuess:
    """The bank's rows grouped by k-means cluster, with the cluster centres."""

    def __init__(self, bank: torch.Tensor, seed: int = 0) -> None:
        count = max(1, min(MAX_CLUSTERS, round(math.sqrt(bank.shape[0]))))
        centres, assignment = _kmeans(bank, count, seed)
        self.order = torch.argsort(assignment, stable=True)
        self.rows = bank[self.order]
        self.rows_sq = (self.rows * self.rows).sum(dim=1)[None, :]
        sizes = torch.bincount(assignment, minlength=count)
        self.sizes = sizes.tolist()
        self.starts = (torch.cumsum(sizes, 0) - sizes).tolist()
        self.centres_t = centres.T.contiguous()
        self.centres_sq = (centres * centres).sum(dim=1)[None, :]

    def nearest(
        self, queries: torch.Tensor, groups: torch.Tensor | None, owner: torch.Tensor | None
    ) -> torch.Tensor:
        """Per query, the bank row nearest to it among its probed clusters' rows (Q,), or -1
        where every one of those rows is excluded. With ``owner`` (M,), bank row m is excluded
        for the queries whose entry in ``groups`` (Q,) equals ``owner[m]``."""
        n = queries.shape[0]
        probes = min(GUESS_PROBES, len(self.sizes))
        to_centres = torch.addmm(self.centres_sq, queries, self.centres_t, alpha=-2.0)
        clusters = to_centres.topk(probes, dim=1, largest=False).indices.flatten()
        query_of = torch.arange(n, device=queries.device).repeat_interleave(probes)
        by_cluster = torch.argsort(clusters, stable=True)
        clusters, query_of = clusters[by_cluster], query_of[by_cluster]
        present, counts = torch.unique_consecutive(clusters, return_counts=True)
        # Owners in the clusters' row order, once per pass rather than per cluster.
        owned = owner[self.order] if owner is not None and groups is not None else None
        best = torch.full((n * probes,), float("inf"), device=queries.device)
        found = torch.full((n * probes,), -1, dtype=torch.long, device=queries.device)
        offset = 0
        for cluster, count in zip(present.tolist(), counts.tolist(), strict=True):
            span = slice(offset, offset + count)
            offset += count
            asking = query_of[span]
            start, size = self.starts[cluster], self.sizes[cluster]
            if size == 0:  # a centre duplicated by k-means (repeated bank rows) owns no row
                continue
            block = torch.addmm(
                self.rows_sq[:, start : start + size],
                queries[asking],
                self.rows[start : start + size].T,
                alpha=-2.0,
            )
            if owned is not None and groups is not None:
                mine = owned[start : start + size][None, :] == groups[asking][:, None]
                block.masked_fill_(mine, float("inf"))
            values, columns = block.min(dim=1)
            best[span] = values
            found[span] = torch.where(torch.isinf(values), -1, self.order[start + columns])
        # The better of each query's probes (an excluded-only probe stays at +inf, row -1).
        per_query = torch.full((n,), float("inf"), device=queries.device)
        per_query.scatter_reduce_(0, query_of, best, reduce="amin")
        winner = (best == per_query[query_of]) & (found >= 0)
        rows = torch.full((n,), -1, dtype=torch.long, device=queries.device)
        rows[query_of[winner]] = found[winner]
        return rows


def owners(columns: Sequence[torch.Tensor], size: int, device: torch.device) -> torch.Tensor | None:
    """(size,) the group that excludes each bank row (-1: none), or None where groups share
    rows (one owner per row cannot say that)."""
    owner = torch.full((size,), -1, dtype=torch.long, device=device)
    for group, rows in enumerate(columns):
        if rows.numel() == 0:
            continue
        if bool((owner[rows] >= 0).any()) or rows.unique().numel() != rows.numel():
            return None
        owner[rows] = group
    return owner


def _kmeans(rows: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (count, D) and each row's cluster (M,) after `KMEANS_ROUNDS` Lloyd rounds from
    seeded random rows; a cluster left empty keeps its centre (and stays empty)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(rows.shape[0], generator=generator)[:count].to(rows.device)
    centres = rows[picks].clone()
    for _ in range(KMEANS_ROUNDS):
        assignment = _assign(rows, centres)
        sums = torch.zeros_like(centres).index_add_(0, assignment, rows)
        sizes = torch.bincount(assignment, minlength=count)
        filled = sizes > 0
        centres[filled] = sums[filled] / sizes[filled, None].to(rows.dtype)
    return centres, _assign(rows, centres)


def _assign(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    centres_sq = (centres * centres).sum(dim=1)[None, :]
    return torch.addmm(centres_sq, rows, centres.T, alpha=-2.0).argmin(dim=1)
