"""Nearest-neighbour search: chunked torch search vs brute force, faiss, backend choice."""

from __future__ import annotations

import pytest
import torch

from defectscope.detector import knn as knn_module
from defectscope.detector.knn import (
    FaissKnn,
    TorchKnn,
    build_index,
    faiss_available,
    pairwise_sq_dist,
)
from defectscope.errors import ConfigError

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def data(n_bank: int = 200, n_query: int = 77, dim: int = 12, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(n_bank, dim, generator=generator, dtype=torch.float64).float()
    queries = torch.randn(n_query, dim, generator=generator, dtype=torch.float64).float()
    return bank, queries


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int, banned=None):
    dist = torch.cdist(queries.double(), bank.double())
    if banned is not None:
        dist[:, banned] = float("inf")
    values, idx = dist.topk(min(k, bank.shape[0]), dim=1, largest=False, sorted=True)
    return values, idx


# ------------------------------------------------------------------ pairwise


def test_pairwise_sq_dist_matches_cdist() -> None:
    bank, queries = data()
    bank_sq = (bank * bank).sum(dim=1)[None, :]
    got = pairwise_sq_dist(queries, bank, bank_sq)
    expected = torch.cdist(queries.double(), bank.double()) ** 2
    assert got.shape == (77, 200)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


def test_search_distances_are_never_negative_or_nan() -> None:
    # pairwise_sq_dist may round a self-distance slightly below 0; search clamps its winners.
    bank, _ = data(n_bank=50, dim=64)
    bank = bank * 100.0
    dist, idx = TorchKnn(bank, chunk_size=16).search(bank, 3)
    assert (dist >= 0).all() and not dist.isnan().any()
    assert (idx[:, 0] == torch.arange(50)).all()


# ------------------------------------------------------------------- TorchKnn


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 64, 77, 4096])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_torch_knn_matches_brute_force(chunk_size: int, k: int) -> None:
    bank, queries = data()
    dist, idx = TorchKnn(bank, chunk_size).search(queries, k)
    ref_dist, ref_idx = brute_force(queries, bank, k)
    assert dist.shape == (77, k) and idx.shape == (77, k)
    assert idx.dtype == torch.long
    torch.testing.assert_close(dist.double(), ref_dist, atol=2e-5, rtol=1e-5)
    assert torch.equal(idx, ref_idx)  # random continuous data: no ties
    assert (dist[:, 1:] >= dist[:, :-1]).all()  # nearest first


def test_torch_knn_bank_rows_are_their_own_neighbours() -> None:
    bank, _ = data(n_bank=64)
    dist, idx = TorchKnn(bank, chunk_size=10).search(bank, 1)
    assert torch.equal(idx[:, 0], torch.arange(64))
    # sqrt of the float32 rounding residue of ||q||^2 - 2 q.b + ||b||^2 (~1e-6): ~1e-3.
    assert float(dist.max()) < 1e-2


def test_torch_knn_k_larger_than_bank_is_clamped() -> None:
    bank, queries = data(n_bank=5, n_query=9)
    dist, idx = TorchKnn(bank).search(queries, 50)
    assert dist.shape == (9, 5) and idx.shape == (9, 5)
    for row in idx:
        assert sorted(row.tolist()) == [0, 1, 2, 3, 4]
    ref_dist, _ = brute_force(queries, bank, 5)
    torch.testing.assert_close(dist.double(), ref_dist, atol=2e-5, rtol=1e-5)


def test_torch_knn_hand_computed() -> None:
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    queries = torch.tensor([[0.0, 0.0], [3.0, 0.0], [9.0, 0.0]])
    dist, idx = TorchKnn(bank).search(queries, 2)
    assert idx.tolist() == [[0, 1], [0, 1], [2, 1]]
    torch.testing.assert_close(
        dist, torch.tensor([[0.0, 5.0], [3.0, 4.0], [1.0, 52.0**0.5]]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("chunk_size", [3, 100])
def test_torch_knn_banned_rows_are_excluded(chunk_size: int) -> None:
    bank, queries = data()
    banned = torch.zeros(200, dtype=torch.bool)
    banned[::3] = True
    dist, idx = TorchKnn(bank, chunk_size).search(queries, 4, banned=banned)
    assert not banned[idx].any()
    ref_dist, ref_idx = brute_force(queries, bank, 4, banned=banned)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist.double(), ref_dist, atol=2e-5, rtol=1e-5)
    # Matches a search on the bank with those rows removed.
    kept = torch.nonzero(~banned, as_tuple=True)[0]
    _, sub_idx = TorchKnn(bank[kept]).search(queries, 4)
    assert torch.equal(kept[sub_idx], idx)


def test_torch_knn_banning_the_exact_match() -> None:
    bank, _ = data(n_bank=30)
    query = bank[7:8].clone()
    banned = torch.zeros(30, dtype=torch.bool)
    plain_dist, plain_idx = TorchKnn(bank).search(query, 1)
    # The winner's distance is computed directly: an exact match is 0, not rounding noise.
    assert plain_idx.item() == 7 and plain_dist.item() == 0.0
    banned[7] = True
    dist, idx = TorchKnn(bank).search(query, 1, banned=banned)
    assert idx.item() != 7
    assert dist.item() == pytest.approx(
        float(torch.cdist(query.double(), bank.double())[0, ~banned].min()), rel=1e-5
    )


def test_torch_knn_does_not_modify_inputs() -> None:
    bank, queries = data()
    bank_copy, queries_copy = bank.clone(), queries.clone()
    banned = torch.zeros(200, dtype=torch.bool)
    banned[:10] = True
    TorchKnn(bank, 8).search(queries, 2, banned=banned)
    assert torch.equal(bank, bank_copy) and torch.equal(queries, queries_copy)
    assert int(banned.sum()) == 10


def test_torch_knn_empty_queries() -> None:
    bank, _ = data()
    dist, idx = TorchKnn(bank).search(torch.empty(0, 12), 3)
    assert dist.shape == (0, 3) and idx.shape == (0, 3)


@needs_faiss
def test_faiss_empty_queries() -> None:
    bank, _ = data()
    dist, idx = FaissKnn(bank).search(torch.empty(0, 12), 3)
    assert dist.shape == (0, 3) and idx.shape == (0, 3)


# ------------------------------------------------------------------- FaissKnn


@needs_faiss
@pytest.mark.parametrize("k", [1, 4])
def test_faiss_matches_torch(k: int) -> None:
    bank, queries = data(n_bank=300, n_query=50, dim=16, seed=3)
    dist, idx = FaissKnn(bank).search(queries, k)
    ref_dist, ref_idx = TorchKnn(bank).search(queries, k)
    assert idx.dtype == torch.long
    assert dist.device == bank.device
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, atol=1e-4, rtol=1e-4)


@needs_faiss
def test_faiss_k_clamped_and_float64_inputs() -> None:
    bank, queries = data(n_bank=4, n_query=6)
    dist, idx = FaissKnn(bank.double()).search(queries.double(), 10)
    assert dist.shape == (6, 4) and idx.shape == (6, 4)
    assert (idx >= 0).all()
    ref_dist, _ = brute_force(queries, bank, 4)
    torch.testing.assert_close(dist.double(), ref_dist, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- build_index


def test_build_index_torch() -> None:
    bank, _ = data()
    index = build_index(bank, "torch", chunk_size=33, faiss_min_bank=1)
    assert isinstance(index, TorchKnn)
    assert index.chunk_size == 33


def test_build_index_auto_small_bank_uses_torch() -> None:
    bank, _ = data(n_bank=200)
    assert isinstance(build_index(bank, "auto", 64, faiss_min_bank=201), TorchKnn)


@needs_faiss
def test_build_index_auto_large_bank_uses_faiss() -> None:
    bank, _ = data(n_bank=200)
    assert isinstance(build_index(bank, "auto", 64, faiss_min_bank=200), FaissKnn)
    assert isinstance(build_index(bank, "auto", 64, faiss_min_bank=1), FaissKnn)


@needs_faiss
def test_build_index_faiss() -> None:
    bank, _ = data()
    assert isinstance(build_index(bank, "faiss", 64, faiss_min_bank=10**9), FaissKnn)


def test_build_index_auto_without_faiss_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn_module, "faiss_available", lambda: False)
    bank, _ = data()
    assert isinstance(build_index(bank, "auto", 64, faiss_min_bank=1), TorchKnn)


def test_build_index_faiss_missing_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn_module, "faiss_available", lambda: False)
    bank, _ = data()
    with pytest.raises(ConfigError) as info:
        build_index(bank, "faiss", 64, faiss_min_bank=1)
    message = str(info.value)
    assert "scoring.knn_backend" in message
    assert "faiss is not installed" in message
    assert "pip install 'defectscope[faiss]'" in message


def test_faiss_available_reflects_import_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(knn_module.importlib.util, "find_spec", lambda name: None)
    assert faiss_available() is False
