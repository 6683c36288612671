"""Nearest-neighbour search over the memory bank.

`TorchKnn` is exact and chunked: a distance block of ``chunk_size`` x bank rows at a time, never
the full query x bank matrix (small blocks stay in cache, which is faster than one big product).
`FaissKnn` wraps a faiss index for large banks when faiss is installed. Both return Euclidean
distances, nearest first.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import torch


class KnnIndex(Protocol):
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def pairwise_sq_dist(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor
) -> torch.Tensor:
    """Squared Euclidean distances (Q, M) via one matrix product; clamped against rounding."""
    query_sq = (queries * queries).sum(dim=1, keepdim=True)
    return torch.addmm(query_sq + bank_sq, queries, bank.T, alpha=-2.0)


class TorchKnn:
    def __init__(self, bank: torch.Tensor, chunk_size: int = 1024) -> None:
        self.bank = bank
        self.bank_sq = (bank * bank).sum(dim=1)[None, :]
        self.chunk_size = chunk_size

    def search(
        self, queries: torch.Tensor, k: int, banned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k nearest bank rows for each query; ``banned`` (M,) bool excludes bank rows."""
        k = min(k, self.bank.shape[0])
        if queries.shape[0] == 0:
            empty = queries.new_empty((0, k))
            return empty, empty.long()
        dists, indices = [], []
        for start in range(0, queries.shape[0], self.chunk_size):
            block = pairwise_sq_dist(
                queries[start : start + self.chunk_size], self.bank, self.bank_sq
            )
            if banned is not None:
                block[:, banned] = float("inf")
            if k == 1:  # min is a cheaper pass than topk
                values, idx = block.min(dim=1, keepdim=True)
            else:
                values, idx = torch.topk(block, k, dim=1, largest=False, sorted=True)
            # Clamp only the winners: rounding can make a squared distance slightly negative.
            dists.append(values.clamp_(min=0.0).sqrt_())
            indices.append(idx)
        return torch.cat(dists), torch.cat(indices)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


class FaissKnn:
    """Exact (flat) faiss index on CPU; the bank is copied once at construction."""

    def __init__(self, bank: torch.Tensor) -> None:
        import faiss

        self.device = bank.device
        self.index = faiss.IndexFlatL2(bank.shape[1])
        self.index.add(bank.detach().to("cpu", torch.float32).contiguous().numpy())

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = min(k, self.index.ntotal)
        dist, idx = self.index.search(
            queries.detach().to("cpu", torch.float32).contiguous().numpy(), k
        )
        dist_t = torch.from_numpy(dist).clamp_(min=0.0).sqrt_().to(self.device)
        return dist_t, torch.from_numpy(idx).to(self.device)


def build_index(bank: torch.Tensor, backend: str, chunk_size: int, faiss_min_bank: int) -> KnnIndex:
    if backend == "faiss" or (
        backend == "auto"
        and bank.shape[0] >= faiss_min_bank
        and bank.device.type == "cpu"
        and faiss_available()
    ):
        if not faiss_available():
            from defectscope.errors import ConfigError

            raise ConfigError(
                "scoring.knn_backend is 'faiss' but faiss is not installed: "
                "pip install 'defectscope[faiss]'"
            )
        return FaissKnn(bank)
    return TorchKnn(bank, chunk_size)
