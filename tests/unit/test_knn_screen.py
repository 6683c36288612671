"""The bfloat16 screen of the exact search: its rounding bound holds, queries it cannot prove are
searched again, and the result is the float32 search's on every path (k, bans, exclusions)."""

from __future__ import annotations

import pytest
import torch

from defectscope.detector.knn import GroupExclusion, TorchKnn
from defectscope.detector.knn_screen import (
    BankScreen,
    screen_bytes,
    screen_supported,
    screened_nearest,
    smallest_columns,
)


def data(n_bank: int, n_query: int, dim: int, seed: int, scale: float = 1.0, shift: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(n_bank, dim, generator=generator, dtype=torch.float64) * scale + shift
    queries = torch.randn(n_query, dim, generator=generator, dtype=torch.float64) * scale + shift
    return bank.float(), queries.float()


def brute_force(queries: torch.Tensor, bank: torch.Tensor, k: int, banned=None):
    dist = torch.cdist(queries.double(), bank.double())
    if banned is not None:
        dist[banned] = float("inf")
    return dist.topk(min(k, bank.shape[0]), dim=1, largest=False, sorted=True)


@pytest.mark.parametrize(
    ("scale", "shift"), [(1e-3, 0.0), (1.0, 0.0), (30.0, 0.0), (1.0, 50.0), (0.1, -7.0)]
)
def test_the_rounding_bound_holds_for_every_row(scale: float, shift: float) -> None:
    # The proof rests on it: approximate value + offset never exceeds a true squared distance.
    bank, queries = data(500, 300, 64, seed=1, scale=scale, shift=shift)
    screen = BankScreen(bank)
    approx, lower_offset = screen.block(queries)
    lower = approx.double() + lower_offset.double()[:, None]
    true = torch.cdist(queries.double(), bank.double()) ** 2
    assert (lower <= true + 1e-9 * true.max()).all()
    # ... and is not vacuous: it is within a few percent of the true value at this scale.
    assert float((true - lower).max() / true.max()) < 0.05


@pytest.mark.parametrize(
    ("scale", "shift"), [(1e-3, 0.0), (1.0, 0.0), (30.0, 0.0), (1.0, 50.0), (0.1, -7.0)]
)
def test_block_values_are_never_negative(scale: float, shift: float) -> None:
    # `smallest_columns` ranks the values' bits as int16, which orders non-negative values only;
    # the nearest rows (tiny distances) are where a negative would appear.
    bank, queries = data(500, 300, 64, seed=11, scale=scale, shift=shift)
    queries = torch.cat([queries, bank[:50], bank[50:100] + 1e-6 * scale])
    approx, _ = BankScreen(bank).block(queries)
    assert approx.dtype == torch.bfloat16 and bool((approx.float() >= 0).all())


@pytest.mark.parametrize("width", [5, 90, 803, 6688])
@pytest.mark.parametrize("n", [1, 12, 20])
def test_smallest_columns_are_a_top_k(width: int, n: int) -> None:
    generator = torch.Generator().manual_seed(width + n)
    block = (torch.rand(64, width, generator=generator) * 900.0).to(torch.bfloat16)
    block[::3, ::5] = float("inf")  # masked rows of the bank
    block[1] = float("inf")  # a query with every row masked
    n = min(n, width)
    values, columns = smallest_columns(block, n)
    expected = block.float().topk(n, dim=1, largest=False, sorted=True).values
    assert torch.equal(values.float(), expected)
    assert torch.equal(block.gather(1, columns), values)  # the columns hold those values
    finite = torch.isfinite(values)
    for row in range(block.shape[0]):  # distinct columns wherever a value is finite
        chosen = columns[row][finite[row]]
        assert chosen.unique().numel() == chosen.numel()
    assert bool(((columns >= 0) & (columns < width)).all())


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("chunk_size", [5, 64, 4096])
def test_screened_search_equals_the_float32_search(k: int, chunk_size: int) -> None:
    bank, queries = data(700, 150, 48, seed=2)
    screened = TorchKnn(bank, chunk_size, screen=True)
    plain = TorchKnn(bank, chunk_size, screen=False)
    assert screened.screen is not None and plain.screen is None
    dist, idx = screened.search(queries, k)
    plain_dist, plain_idx = plain.search(queries, k)
    ref_dist, ref_idx = brute_force(queries, bank, k)
    assert torch.equal(idx, ref_idx) and torch.equal(idx, plain_idx)
    torch.testing.assert_close(dist.double(), ref_dist, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist, plain_dist, atol=1e-4, rtol=1e-4)


def test_screened_search_honours_bans_and_group_exclusions() -> None:
    bank, queries = data(400, 60, 32, seed=3)
    generator = torch.Generator().manual_seed(0)
    banned = torch.zeros(400, dtype=torch.bool)
    banned[::7] = True
    # Groups of 20 queries, each excluding its own 150 random rows.
    columns = [torch.randperm(400, generator=generator)[:150] for _ in range(3)]
    mask = banned.repeat(60, 1)
    for group, cols in enumerate(columns):
        mask[group * 20 : (group + 1) * 20, cols] = True
    expected_dist, expected_idx = brute_force(queries, bank, 4, banned=mask)
    for chunk_size in (7, 20, 1000):
        dist, idx = TorchKnn(bank, chunk_size, screen=True).search(
            queries, 4, banned=banned, exclude=GroupExclusion(20, columns)
        )
        assert torch.equal(idx, expected_idx)
        torch.testing.assert_close(dist.double(), expected_dist, atol=1e-5, rtol=1e-5)


def test_queries_the_screen_cannot_rank_are_proven_or_searched_again() -> None:
    # Rows at distances 1 + i * 1e-4 from the query: bfloat16 (8 bits) cannot order them, so
    # the top candidates are a guess the bound must refuse, and the search falls back.
    generator = torch.Generator().manual_seed(4)
    query = torch.randn(1, 24, generator=generator)
    directions = torch.randn(300, 24, generator=generator, dtype=torch.float64)
    directions /= directions.norm(dim=1, keepdim=True)
    radii = 1.0 + 1e-4 * torch.randperm(300, generator=generator).double()
    bank = (query.double() + directions * radii[:, None]).float()
    screen = BankScreen(bank)
    approx, lower_offset = screen.block(query)
    _, _, proven = screened_nearest(bank, query, approx, lower_offset, 1)
    assert not bool(proven.any())
    dist, idx = TorchKnn(bank, screen=True).search(query, 1)
    assert int(idx) == int(torch.cdist(query.double(), bank.double()).argmin())
    assert float(dist) == pytest.approx(1.0, abs=1e-3)


def test_wide_banks_ranked_by_groups_honour_bans_and_exclusions() -> None:
    # 2,003 rows: ranked by group minima (and a partial last group), not by a plain top-k.
    bank, queries = data(2003, 80, 24, seed=12)
    generator = torch.Generator().manual_seed(1)
    banned = torch.zeros(2003, dtype=torch.bool)
    banned[1::3] = True
    banned[-3:] = True  # in the partial group
    columns = [torch.randperm(2003, generator=generator)[:900] for _ in range(4)]
    mask = banned.repeat(80, 1)
    for group, cols in enumerate(columns):
        mask[group * 20 : (group + 1) * 20, cols] = True
    for k in (1, 5):
        expected_dist, expected_idx = brute_force(queries, bank, k, banned=mask)
        dist, idx = TorchKnn(bank, screen=True).search(
            queries, k, banned=banned, exclude=GroupExclusion(20, columns)
        )
        assert torch.equal(idx, expected_idx)
        torch.testing.assert_close(dist.double(), expected_dist, atol=1e-5, rtol=1e-5)


def test_banned_rows_never_come_back_when_few_rows_are_left() -> None:
    bank, queries = data(30, 10, 8, seed=5)
    banned = torch.ones(30, dtype=torch.bool)
    banned[[3, 17]] = False  # fewer allowed rows than the screen's candidates
    dist, idx = TorchKnn(bank, screen=True).search(queries, 2, banned=banned)
    assert set(idx.flatten().tolist()) <= {3, 17}
    everything_banned = torch.ones(30, dtype=torch.bool)
    dist, _ = TorchKnn(bank, screen=True).search(queries, 1, banned=everything_banned)
    assert torch.isinf(dist).all()  # as the float32 search reports it


def test_the_screen_is_used_only_where_bfloat16_is_fast() -> None:
    assert screen_supported(torch.device("cuda")) is False
    assert screen_supported(torch.device("meta")) is False
    cpu = screen_supported(torch.device("cpu"))
    assert cpu == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    bank, _ = data(50, 1, 8, seed=6)
    assert (TorchKnn(bank).screen is not None) == cpu
    assert TorchKnn(bank.double()).screen is None  # float64 banks keep their precision


def test_queries_far_from_the_bank_stay_exact() -> None:
    # A clustered set far from the bank's mean: the bf16 rounding of its large norms exceeds the
    # gaps between neighbours, so the bound refuses most screens and the float32 search decides.
    bank, _ = data(600, 1, 32, seed=7)
    _, queries = data(1, 200, 32, seed=8, scale=0.3, shift=20.0)
    for k in (1, 4):
        dist, idx = TorchKnn(bank, screen=True).search(queries, k)
        ref_dist, ref_idx = brute_force(queries, bank, k)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(dist.double(), ref_dist, atol=1e-4, rtol=1e-5)
    bounds = TorchKnn(bank, screen=True).upper_bounds(queries)
    nearest = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    assert (bounds.double() >= nearest - 1e-4).all()


def test_the_screens_memory_is_counted_where_it_is_built() -> None:
    bank, _ = data(40, 1, 8, seed=9)
    index = TorchKnn(bank)
    expected = 0 if index.screen is None else index.screen.operand.numel() * 2
    assert screen_bytes(bank) == expected
    assert screen_bytes(bank.double()) == 0


def test_upper_bounds_where_a_search_is_cheaper_are_refused_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a GPU the exact search is fast: bounds are for CPUs (the screen, else knn_guess).
    bank, queries = data(20, 3, 8, seed=10)
    monkeypatch.setattr(TorchKnn, "has_bounds", property(lambda self: False))
    with pytest.raises(ValueError, match="search exactly instead"):
        TorchKnn(bank, screen=False).upper_bounds(queries)
