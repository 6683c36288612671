"""Upper bounds from the float32 cluster guess (CPUs without fast bfloat16): every bound is a
real, allowed row's exact distance, never below the nearest one, equal to it for nearly every
query on features with a low-dimensional structure, and +inf only where every row is excluded."""

from __future__ import annotations

import pytest
import torch

from defectscope.detector import knn_guess
from defectscope.detector.knn import GroupExclusion, TorchKnn
from defectscope.detector.knn_guess import ClusterGuess, owners


def structured(n: int, dim: int, seed: int, rank: int = 12) -> torch.Tensor:
    """Rows near a low-dimensional subspace, like patch features (most variance in a few
    directions), plus isotropic noise."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(1, -0.5, rank, dtype=torch.float64)[:, None]
    latent = torch.randn(n, rank, generator=generator, dtype=torch.float64)
    noise = 0.05 * torch.randn(n, dim, generator=generator, dtype=torch.float64)
    return (latent @ (scales * basis) + noise).float()


def test_bounds_are_real_distances_and_nearly_always_the_nearest() -> None:
    rows = structured(3000, 96, seed=1)
    bank, queries = rows[:2000], rows[2000:]
    bounds = TorchKnn(bank, screen=False).upper_bounds(queries)
    nearest = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    assert (bounds.double() >= nearest - 1e-4).all()
    tight = (bounds.double() - nearest).abs() <= 1e-4 * (1.0 + nearest)
    # Gaussian rows without clusters are the hard case for an inverted file (88 % here; 96 % on
    # bottle's patch features): a missed row only costs map_maxima an exact search.
    assert tight.float().mean() >= 0.85, tight.float().mean()


def test_bounds_respect_group_exclusions() -> None:
    rows = structured(700, 40, seed=2)
    bank, queries = rows[:600], rows[600:]  # 100 queries in 4 groups of 25
    groups = [torch.arange(0, 300), torch.empty(0, dtype=torch.long)]
    groups += [torch.arange(600), torch.arange(100, 200)]
    bounds = TorchKnn(bank, screen=False).upper_bounds(queries, GroupExclusion(25, groups))
    full = torch.cdist(queries.double(), bank.double())
    for g, banned in enumerate(groups):
        span = slice(25 * g, 25 * (g + 1))
        allowed = full[span].clone()
        allowed[:, banned] = float("inf")
        nearest = allowed.amin(dim=1)
        if g == 2:  # every row excluded: nothing to bound with
            assert torch.isinf(bounds[span]).all()
        else:
            assert (bounds[span].double() >= nearest - 1e-4).all()


def test_leave_one_out_exclusions_are_searched_in_the_clusters() -> None:
    # Queries that are bank rows themselves, each group excluding its own rows (as calibration
    # does): a bound of 0 would mean an own row was found.
    bank = structured(2000, 48, seed=5)
    own = [torch.arange(g * 100, (g + 1) * 100) for g in range(20)]
    queries = bank.clone()
    bounds = TorchKnn(bank, screen=False).upper_bounds(queries, GroupExclusion(100, own))
    full = torch.cdist(queries.double(), bank.double())
    for g, rows in enumerate(own):
        full[g * 100 : (g + 1) * 100, rows] = float("inf")
    nearest = full.amin(dim=1)
    assert (bounds > 0).all()
    assert (bounds.double() >= nearest - 1e-4).all()
    tight = (bounds.double() - nearest).abs() <= 1e-4 * (1.0 + nearest)
    assert tight.float().mean() >= 0.85, tight.float().mean()


def test_clusters_partition_the_bank_and_are_reproducible() -> None:
    bank = structured(1500, 64, seed=3, rank=6)
    first, second = ClusterGuess(bank), ClusterGuess(bank)
    assert sorted(first.order.tolist()) == list(range(1500))
    assert sum(first.sizes) == 1500 and len(first.sizes) == round(1500**0.5)
    assert torch.equal(first.order, second.order)
    assert torch.equal(first.rows, bank[first.order])


def test_owners_refuse_groups_that_share_rows() -> None:
    cpu = torch.device("cpu")
    empty = torch.tensor([], dtype=torch.long)
    separate = owners([torch.tensor([0, 2]), empty, torch.tensor([1])], 4, cpu)
    assert separate is not None and separate.tolist() == [0, 2, 0, -1]
    assert owners([torch.tensor([0, 1]), torch.tensor([1])], 3, cpu) is None


@pytest.mark.parametrize("probes", [1, 40])
def test_any_number_of_probes_gives_valid_bounds(
    probes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One probe only loosens the bounds; probing every cluster searches the whole bank, where
    # every guess is the nearest row.
    monkeypatch.setattr(knn_guess, "GUESS_PROBES", probes)
    rows = structured(900, 32, seed=4)
    bank, queries = rows[:800], rows[800:]
    bounds = TorchKnn(bank, screen=False).upper_bounds(queries)
    nearest = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    assert (bounds.double() >= nearest - 1e-4).all()
    if probes >= 28:  # sqrt(800) clusters
        torch.testing.assert_close(bounds.double(), nearest, atol=1e-4, rtol=1e-5)
    else:
        assert (bounds.double() > nearest + 1e-3).any()  # one cluster misses some


def test_no_guess_for_a_bank_without_a_coreset() -> None:
    GUESS_MAX_BANK = knn_guess.GUESS_MAX_BANK
    assert TorchKnn(torch.zeros(GUESS_MAX_BANK, 4), screen=False).has_bounds
    assert not TorchKnn(torch.zeros(GUESS_MAX_BANK + 1, 4), screen=False).has_bounds


def test_repeated_bank_rows_leave_empty_clusters_that_are_skipped() -> None:
    # A bank of two repeated rows (as from blank training images): k-means has more centres
    # than distinct rows, so some clusters own nothing; every query still gets an exact bound.
    bank = torch.zeros(100, 8)
    bank[50:] = 1.0
    queries = torch.rand(20, 8, generator=torch.Generator().manual_seed(0))
    bounds = TorchKnn(bank, screen=False).upper_bounds(queries)
    nearest = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    torch.testing.assert_close(bounds.double(), nearest, atol=1e-5, rtol=1e-5)
