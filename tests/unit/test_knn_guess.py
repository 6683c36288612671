"""Upper bounds from the float32 subspace guess (CPUs without fast bfloat16): every bound is a
real row's exact distance, never below the nearest one, equal to it for nearly every query on
features with a low-dimensional structure, and +inf only where every row is excluded."""

from __future__ import annotations

import pytest
import torch

from defectscope.detector.knn import GroupExclusion, TorchKnn
from defectscope.detector.knn_guess import SubspaceGuess


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
    assert tight.float().mean() >= 0.95, tight.float().mean()


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


def test_the_subspace_keeps_the_leading_directions() -> None:
    bank = structured(1500, 64, seed=3, rank=6)
    guess = SubspaceGuess(bank, dims=6)
    centred = bank - bank.mean(dim=0, keepdim=True)
    kept = (centred @ guess.basis).square().sum() / centred.square().sum()
    assert kept > 0.99  # six directions hold nearly all of a rank-6 bank's spread
    assert torch.allclose(guess.basis.T @ guess.basis, torch.eye(6), atol=1e-4)


@pytest.mark.parametrize("dims", [1, 200])
def test_any_subspace_size_gives_valid_bounds(dims: int) -> None:
    # A poor guess (one direction) only loosens the bounds; more directions than features are
    # capped at the features, where every guess is the nearest row.
    rows = structured(900, 32, seed=4)
    bank, queries = rows[:800], rows[800:]
    index = TorchKnn(bank, screen=False)
    index._guess = SubspaceGuess(bank, dims=dims)
    bounds = index.upper_bounds(queries)
    nearest = torch.cdist(queries.double(), bank.double()).amin(dim=1)
    assert (bounds.double() >= nearest - 1e-4).all()
    if dims >= 32:
        torch.testing.assert_close(bounds.double(), nearest, atol=1e-4, rtol=1e-5)
    else:
        assert (bounds.double() > nearest + 1e-3).any()  # one direction misses some


def test_no_guess_for_a_bank_too_large_for_its_neighbour_graph() -> None:
    from defectscope.detector.knn_guess import GUESS_MAX_BANK

    assert TorchKnn(torch.zeros(GUESS_MAX_BANK, 4), screen=False).has_bounds
    assert not TorchKnn(torch.zeros(GUESS_MAX_BANK + 1, 4), screen=False).has_bounds
