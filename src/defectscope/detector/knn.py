"""Nearest-neighbour search over the memory bank.

`TorchKnn` is exact and chunked: a distance block of ``chunk_size`` x bank rows at a time, never
the full query x bank matrix (small blocks stay in cache, which is faster than one big product).
On CPUs with fast bfloat16 each block is screened first (`knn_screen`: candidates in bfloat16,
proven in float32, the same result). `FaissKnn` wraps a faiss index for large banks when faiss
is installed: exact (flat), or approximate (IVF, HNSW, IVF-PQ: `approximate_faiss_index`), built
from the bank when a model is fitted or loaded, never stored. All return Euclidean distances,
nearest first.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import torch

from defectscope.config import ScoringConfig
from defectscope.detector.knn_guess import GUESS_CHUNK, GUESS_MAX_BANK, ClusterGuess, owners
from defectscope.detector.knn_screen import (
    SCREEN_CHUNK,
    BankScreen,
    direct_distances,
    nearest_guess,
    screen_supported,
    screened_nearest,
)
from defectscope.errors import ConfigError


class KnnIndex(Protocol):
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def pairwise_sq_dist(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor
) -> torch.Tensor:
    """Squared Euclidean distances (Q, M) via one matrix product; clamped against rounding."""
    query_sq = (queries * queries).sum(dim=1, keepdim=True)
    return torch.addmm(query_sq + bank_sq, queries, bank.T, alpha=-2.0)


class GroupExclusion(NamedTuple):
    """Bank rows each group of queries must not find: group g is query rows
    ``[g * rows, (g + 1) * rows)`` and may not find bank rows ``columns[g]`` (e.g. its own
    image's patches, for leave-one-out scores of many images in one search)."""

    rows: int
    columns: Sequence[torch.Tensor]


class TorchKnn:
    """Exact search. ``screen`` (default: where bfloat16 is fast, `knn_screen`) picks
    candidates in bfloat16 and proves them in float32; the result is the float32 search's."""

    def __init__(
        self, bank: torch.Tensor, chunk_size: int = 1024, screen: bool | None = None
    ) -> None:
        self.bank = bank
        self.bank_sq = (bank * bank).sum(dim=1)[None, :]
        self.chunk_size = chunk_size
        if screen is None:
            screen = screen_supported(bank.device) and bank.dtype == torch.float32
        self.screen = BankScreen(bank) if screen else None
        self._guess: ClusterGuess | None = None

    @property
    def has_bounds(self) -> bool:
        """Whether `upper_bounds` is cheaper than a search here: with the bfloat16 screen, or
        on a CPU for a bank of at most `GUESS_MAX_BANK` rows (a cluster guess); a GPU's exact
        search is fast already."""
        if self.screen is not None:
            return True
        return self.bank.device.type == "cpu" and self.bank.shape[0] <= GUESS_MAX_BANK

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        banned: torch.Tensor | None = None,
        exclude: GroupExclusion | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bank rows for each query; ``banned`` (M,) bool excludes bank rows for
        every query, ``exclude`` excludes rows per group of queries."""
        k = min(k, self.bank.shape[0])
        if queries.shape[0] == 0:
            empty = queries.new_empty((0, k))
            return empty, empty.long()
        dists, indices = [], []
        # The screen's block passes (top-k above all) are faster on blocks that stay in cache.
        step = self.chunk_size if self.screen is None else min(self.chunk_size, SCREEN_CHUNK)
        for start in range(0, queries.shape[0], step):
            chunk = queries[start : start + step]
            positions = torch.arange(start, start + chunk.shape[0], device=chunk.device)
            if self.screen is None:
                values, idx = self._exact(chunk, positions, k, banned, exclude)
            else:
                values, idx = self._screened(chunk, positions, k, banned, exclude)
            # Clamp only the winners: rounding can make a squared distance slightly negative.
            dists.append(values.clamp_(min=0.0).sqrt_())
            indices.append(idx)
        return torch.cat(dists), torch.cat(indices)

    def upper_bounds(
        self, queries: torch.Tensor, exclude: GroupExclusion | None = None
    ) -> torch.Tensor:
        """Per query, the exact distance to a row a cheap search ranks nearest (the bfloat16
        screen, else `knn_guess`): at least the nearest row's distance and almost always equal
        to it, at a fraction of the search's cost. +inf where every row is excluded."""
        if not self.has_bounds:
            raise ValueError("upper_bounds is for CPUs: search exactly instead")
        if self.screen is None:
            return self._guessed_bounds(queries, exclude)
        bounds = []
        for start in range(0, queries.shape[0], SCREEN_CHUNK):
            chunk = queries[start : start + SCREEN_CHUNK]
            positions = torch.arange(start, start + chunk.shape[0], device=chunk.device)
            block = self.screen.distance_block(chunk)
            _mask(block, positions, None, exclude)
            rows = nearest_guess(block)[:, None]
            # +inf where the guessed row is excluded (every row, for that query).
            squared = direct_distances(self.bank, chunk, rows, block.gather(1, rows))
            bounds.append(squared[:, 0].sqrt_())
        if not bounds:
            return queries.new_empty(0)
        return torch.cat(bounds)

    def _guessed_bounds(
        self, queries: torch.Tensor, exclude: GroupExclusion | None
    ) -> torch.Tensor:
        """`upper_bounds` from the float32 cluster guess; queries it finds no allowed row for
        (or all of them, where groups share excluded rows) are searched exactly."""
        if self._guess is None:
            self._guess = ClusterGuess(self.bank)  # built on first use: calibration only
        owner = None
        if exclude is not None:
            owner = owners(exclude.columns, self.bank.shape[0], self.bank.device)
        bounds = queries.new_full((queries.shape[0],), float("inf"))
        for start in range(0, queries.shape[0], GUESS_CHUNK):
            chunk = queries[start : start + GUESS_CHUNK]
            positions = torch.arange(start, start + chunk.shape[0], device=chunk.device)
            if exclude is not None and owner is None:
                rows = torch.full_like(positions, -1)
            else:
                groups = None if exclude is None else positions // exclude.rows
                rows = self._guess.nearest(chunk, groups, owner)
            found = (rows >= 0).nonzero().flatten()
            # Computed as |q - c|^2: an exact match is 0, not the rounding of the expanded form.
            direct = (chunk[found] - self.bank[rows[found]]).square_().sum(dim=1)
            bounds[start + found] = direct.sqrt_()
            unsure = (rows < 0).nonzero().flatten()
            if unsure.numel():
                values, _ = self._exact(chunk[unsure], positions[unsure], 1, None, exclude)
                bounds[start + unsure] = values[:, 0].clamp_(min=0.0).sqrt_()
        return bounds

    def _exact(
        self,
        chunk: torch.Tensor,
        positions: torch.Tensor,
        k: int,
        banned: torch.Tensor | None,
        exclude: GroupExclusion | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared distances and indices of the k nearest rows, from one float32 block."""
        # The block ranks by |c|^2 - 2 q.c (|q|^2 is the same for every row); the winners'
        # distances are then computed directly, so an exact match comes back as 0, not as
        # the rounding of the expanded form.
        block = torch.addmm(self.bank_sq, chunk, self.bank.T, alpha=-2.0)
        _mask(block, positions, banned, exclude)
        if k == 1:  # min is a cheaper pass than topk
            values, idx = block.min(dim=1, keepdim=True)
        else:
            values, idx = torch.topk(block, k, dim=1, largest=False, sorted=True)
        direct = direct_distances(self.bank, chunk, idx, values)
        if k > 1:
            direct, order = direct.sort(dim=1)
            idx = idx.gather(1, order)
        return direct, idx

    def _screened(
        self,
        chunk: torch.Tensor,
        positions: torch.Tensor,
        k: int,
        banned: torch.Tensor | None,
        exclude: GroupExclusion | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_exact`, from a bfloat16 screen; the queries it cannot prove go to `_exact`."""
        assert self.screen is not None
        approx, lower_offset = self.screen.block(chunk)
        _mask(approx, positions, banned, exclude)
        values, idx, proven = screened_nearest(self.bank, chunk, approx, lower_offset, k)
        if not bool(proven.all()):
            unsure = (~proven).nonzero().flatten()
            values[unsure], idx[unsure] = self._exact(
                chunk[unsure], positions[unsure], k, banned, exclude
            )
        return values, idx


def _mask(
    block: torch.Tensor,
    positions: torch.Tensor,
    banned: torch.Tensor | None,
    exclude: GroupExclusion | None,
) -> None:
    """Set the bank columns that the queries at ``positions`` (one per block row, ascending)
    must not find to infinity."""
    if banned is not None:
        block[:, banned] = float("inf")
    if exclude is None or block.shape[0] == 0:
        return
    groups = torch.div(positions, exclude.rows, rounding_mode="floor")
    for group in torch.unique_consecutive(groups).tolist():
        columns = exclude.columns[group]
        if columns.numel():
            rows = (groups == group).nonzero().flatten()
            first, last = int(rows[0]), int(rows[-1]) + 1  # a group's rows are contiguous
            block[first:last].index_fill_(1, columns.to(block.device), float("inf"))


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


class FaissKnn:
    """A faiss index on CPU (exact flat by default); the bank is copied in once.

    IVF and HNSW store the bank rows, so the distances they return are exact (only the
    neighbour may be missed); IVF-PQ returns distances between compressed codes, themselves
    approximate. Approximate indices may find fewer than k rows for a query
    (IVF lists all empty near it); those queries fall back to exact search, so callers always
    get k valid bank indices.
    """

    def __init__(self, bank: torch.Tensor, index: Any = None) -> None:
        import faiss

        self.device = bank.device
        data = bank.detach().to("cpu", torch.float32).contiguous().numpy()
        self.index = index if index is not None else faiss.IndexFlatL2(bank.shape[1])
        if not self.index.is_trained:
            self.index.train(data)
        self.index.add(data)
        self.exact = index is None
        self._bank = bank if index is not None else None

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.index.ntotal)
        dist, idx = self.index.search(
            queries.detach().to("cpu", torch.float32).contiguous().numpy(), k
        )
        dist_t = torch.from_numpy(dist).clamp_(min=0.0).sqrt_()
        idx_t = torch.from_numpy(idx)
        missing = (idx_t < 0).any(dim=1)
        if missing.any() and self._bank is not None:
            exact_dist, exact_idx = TorchKnn(self._bank.detach().cpu().float()).search(
                queries.detach().cpu().float()[missing], k
            )
            dist_t[missing], idx_t[missing] = exact_dist, exact_idx
        return dist_t.to(self.device), idx_t.to(self.device)


APPROXIMATE_BACKENDS = ("faiss_ivf", "faiss_hnsw", "faiss_ivfpq")


def ivf_lists(n_bank: int, requested: int | None) -> int:
    """IVF list count: as asked, else ~4 sqrt(n); never more than n / 39, faiss's minimum
    training points per list (fewer lists train badly rather than fail)."""
    nlist = requested if requested is not None else round(4 * math.sqrt(n_bank))
    return max(1, min(nlist, n_bank // 39 or 1))


def approximate_faiss_index(bank: torch.Tensor, backend: str, config: ScoringConfig) -> Any:
    """An untrained faiss index of kind ``backend`` for ``bank`` (M, D); ConfigError if the
    parameters cannot work for this bank."""
    import faiss

    n, dim = bank.shape
    index: Any
    if backend == "faiss_hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = max(config.hnsw_ef_search, config.k)
        return index
    nlist = ivf_lists(n, config.ivf_nlist)
    quantizer = faiss.IndexFlatL2(dim)
    if backend == "faiss_ivf":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist)
    else:
        if dim % config.pq_m:
            raise ConfigError(
                f"scoring.pq_m={config.pq_m} must divide the feature size {dim} for faiss_ivfpq"
            )
        if n < 2**config.pq_bits:
            raise ConfigError(
                f"faiss_ivfpq with pq_bits={config.pq_bits} needs a bank of at least "
                f"{2**config.pq_bits} rows to train its codebooks; this bank has {n}"
            )
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, config.pq_m, config.pq_bits)
    index.nprobe = min(config.ivf_nprobe, nlist)
    return index


def build_index(
    bank: torch.Tensor,
    backend: str,
    chunk_size: int,
    faiss_min_bank: int,
    config: ScoringConfig | None = None,
) -> KnnIndex:
    if backend in APPROXIMATE_BACKENDS:
        if not faiss_available():
            raise ConfigError(
                f"scoring.knn_backend is {backend!r} but faiss is not installed: "
                "pip install 'defectscope[faiss]'"
            )
        return FaissKnn(bank, approximate_faiss_index(bank, backend, config or ScoringConfig()))
    if backend == "faiss" or (
        backend == "auto"
        and bank.shape[0] >= faiss_min_bank
        and bank.device.type == "cpu"
        and faiss_available()
    ):
        if not faiss_available():
            raise ConfigError(
                "scoring.knn_backend is 'faiss' but faiss is not installed: "
                "pip install 'defectscope[faiss]'"
            )
        return FaissKnn(bank)
    return TorchKnn(bank, chunk_size)
