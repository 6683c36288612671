"""Coreset selection: sizes, greedy k-center (exact and sharded), projections."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from defectscope.config import CoresetConfig
from defectscope.detector.coreset import (
    choose_coreset,
    coreset_size,
    greedy_kcenter,
    random_projection,
    select_coreset,
    sharded_kcenter,
)


def covering_radius(points: torch.Tensor, centers: torch.Tensor) -> float:
    """Max over points of the distance to the nearest center (brute force)."""
    return float(torch.cdist(points.double(), points[centers].double()).min(dim=1).values.max())


def clustered(
    n_clusters: int = 20, n: int = 20000, dim: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_clusters, dim, generator=generator) * 100.0
    labels = torch.arange(n) % n_clusters
    points = centers[labels] + torch.randn(n, dim, generator=generator)
    return points, labels


# ------------------------------------------------------------------ coreset_size


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [(1000, 0.1, 100), (1001, 0.1, 101), (10, 0.01, 1), (5, 1.0, 5), (7, 0.5, 4), (1, 0.1, 1)],
)
def test_coreset_size_ratio(n: int, ratio: float, expected: int) -> None:
    assert coreset_size(n, CoresetConfig(ratio=ratio, min_size=None)) == expected
    assert expected == max(1, min(n, math.ceil(ratio * n)))


def test_coreset_size_lower_bound_then_cap() -> None:
    # A small set keeps at least min_size rows (all of them where there are fewer) ...
    assert coreset_size(92_160, CoresetConfig()) == 5_000  # 2 % would be 1 844
    assert coreset_size(3_000, CoresetConfig()) == 3_000
    assert coreset_size(400_000, CoresetConfig()) == 8_000  # above the bound, the ratio
    # ... max_size wins over it, and an absolute size ignores it.
    assert coreset_size(92_160, CoresetConfig(min_size=5_000, max_size=2_000)) == 2_000
    assert coreset_size(92_160, CoresetConfig(size=100)) == 100
    assert coreset_size(92_160, CoresetConfig(min_size=None)) == 1_844


def test_coreset_size_absolute_overrides_ratio() -> None:
    assert coreset_size(1000, CoresetConfig(ratio=0.5, size=37)) == 37
    assert coreset_size(10, CoresetConfig(size=37)) == 10  # never more than there are


@pytest.mark.parametrize("n", [1, 10, 12345])
def test_coreset_size_none_keeps_all(n: int) -> None:
    assert coreset_size(n, CoresetConfig(method="none", ratio=0.01, size=3)) == n


# ----------------------------------------------------------------- greedy_kcenter


def test_greedy_two_clusters_and_outlier() -> None:
    points = torch.tensor(
        [[0.0], [0.5], [1.0], [100.0], [100.5], [101.0], [1000.0]], dtype=torch.float32
    )
    groups = [0, 0, 0, 1, 1, 1, 2]
    for seed in range(10):
        chosen = greedy_kcenter(points, 3, seed=seed).tolist()
        assert sorted(groups[i] for i in chosen) == [0, 1, 2], (seed, chosen)


def test_greedy_each_pick_is_the_farthest_point() -> None:
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(300, 5, generator=generator)
    chosen = greedy_kcenter(points, 25, seed=3).tolist()
    distances = torch.cdist(points.double(), points.double())
    for i in range(1, len(chosen)):
        min_dist = distances[:, chosen[:i]].min(dim=1).values
        assert min_dist[chosen[i]] == pytest.approx(float(min_dist.max()), rel=1e-5)


def test_greedy_on_a_line_picks_the_ends() -> None:
    points = torch.arange(11, dtype=torch.float32)[:, None]  # 0, 1, ..., 10
    for seed in range(8):
        chosen = greedy_kcenter(points, 2, seed=seed).tolist()
        first = chosen[0]
        farthest = 0 if first > 5 else 10
        assert chosen[1] == farthest
        if first == 5:
            assert chosen[1] in (0, 10)
    # With 3 picks from an end, the third is the midpoint.
    for seed in range(20):
        chosen = greedy_kcenter(points, 3, seed=seed).tolist()
        if chosen[0] in (0, 10):
            assert sorted(chosen) == [0, 5, 10]


def test_greedy_deterministic_and_unique() -> None:
    points = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    a = greedy_kcenter(points, 50, seed=7)
    b = greedy_kcenter(points, 50, seed=7)
    assert torch.equal(a, b)
    assert a.dtype == torch.long and a.shape == (50,)
    assert len(set(a.tolist())) == 50
    assert int(a.min()) >= 0 and int(a.max()) < 500
    others = {tuple(greedy_kcenter(points, 50, seed=s).tolist()) for s in range(5)}
    assert len(others) > 1  # the seed picks the first point


def test_greedy_unique_with_duplicate_points() -> None:
    points = torch.cat([torch.zeros(5, 3), torch.ones(5, 3)])
    chosen = greedy_kcenter(points, 4, seed=0)
    assert len(set(chosen.tolist())) == 4


def test_select_coreset_unique_with_many_identical_patches() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.cat([torch.zeros(500, 16), torch.randn(20, 16, generator=generator)])
    config = CoresetConfig(method="greedy", size=40, projection_dim=None)
    chosen = select_coreset(features, config)
    assert len(set(chosen.tolist())) == 40


def test_greedy_unique_for_large_norm_features() -> None:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, 64, generator=generator) * 100.0
    points = base + torch.randn(1000, 64, generator=generator) * 1e-3
    chosen = greedy_kcenter(points, 100, seed=0)
    assert len(set(chosen.tolist())) == 100


@pytest.mark.parametrize("n_select", [10, 11, 50])
def test_greedy_select_all(n_select: int) -> None:
    points = torch.randn(10, 2)
    assert torch.equal(greedy_kcenter(points, n_select), torch.arange(10))


def test_greedy_progress() -> None:
    calls: list[tuple[int, int]] = []
    greedy_kcenter(torch.randn(400, 4), 200, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (200, 200)
    assert all(t == 200 for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done)
    assert len(calls) > 10


@pytest.mark.parametrize("seed", range(6))
def test_greedy_is_a_2_approximation(seed: int) -> None:
    generator = torch.Generator().manual_seed(100 + seed)
    points = torch.randn(11, 2, generator=generator) * torch.tensor([3.0, 1.0])
    k = 3
    distances = torch.cdist(points.double(), points.double())
    subsets = torch.tensor(list(itertools.combinations(range(len(points)), k)))  # (165, 3)
    # For every subset: max over points of the distance to the nearest center; best subset.
    optimal = float(distances[:, subsets].min(dim=2).values.max(dim=0).values.min())
    for start_seed in range(4):
        greedy = covering_radius(points, greedy_kcenter(points, k, seed=start_seed))
        assert optimal <= greedy + 1e-9
        assert greedy <= 2.0 * optimal + 1e-6


def test_greedy_radius_decreases_with_more_centers() -> None:
    points = torch.randn(400, 3, generator=torch.Generator().manual_seed(5))
    radii = [covering_radius(points, greedy_kcenter(points, k, seed=0)) for k in (2, 8, 32, 128)]
    assert radii == sorted(radii, reverse=True)
    assert radii[-1] < radii[0] / 2


# ---------------------------------------------------------------- sharded_kcenter


@pytest.mark.parametrize(
    ("n", "n_select", "shard"), [(5000, 40, 256), (5000, 3, 256), (999, 500, 256)]
)
def test_sharded_exact_count_unique(n: int, n_select: int, shard: int) -> None:
    points = torch.randn(n, 6, generator=torch.Generator().manual_seed(n_select))
    chosen = sharded_kcenter(points, n_select, shard, seed=0).selected
    assert chosen.shape == (n_select,)
    assert len(set(chosen.tolist())) == n_select
    assert int(chosen.min()) >= 0 and int(chosen.max()) < n


def test_sharded_single_shard_equals_greedy() -> None:
    points = torch.randn(300, 4)
    assert torch.equal(
        sharded_kcenter(points, 20, 1000, seed=4).selected, greedy_kcenter(points, 20, 4)
    )


def test_sharded_select_all() -> None:
    points = torch.randn(30, 4)
    assert torch.equal(sharded_kcenter(points, 30, 256).selected, torch.arange(30))


def test_sharded_deterministic() -> None:
    points = torch.randn(3000, 4, generator=torch.Generator().manual_seed(9))
    first = sharded_kcenter(points, 60, 256, seed=1).selected
    assert torch.equal(first, sharded_kcenter(points, 60, 256, seed=1).selected)


def test_sharded_progress_ends_at_total() -> None:
    calls: list[tuple[int, int]] = []
    sharded_kcenter(torch.randn(2000, 4), 30, 256, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (30, 30)


def test_sharded_covers_every_cluster() -> None:
    points, labels = clustered()
    chosen = sharded_kcenter(points, 40, shard_size=CoresetConfig().shard_size, seed=0).selected
    assert len(set(chosen.tolist())) == 40
    assert set(labels[chosen].tolist()) == set(range(20))
    # Every point lies within a few cluster radii (std 1 in 16-D: radius ~4) of a center, far
    # below the distance between clusters (hundreds).
    assert covering_radius(points, chosen) < 20.0


def test_sharded_covers_every_cluster_with_small_shards() -> None:
    # Each of the 10 shards keeps 2 x 40 / 10 = 8 picks for 20 clusters, so no single shard can
    # cover them all: the second, global level over the union must.
    points, labels = clustered()
    chosen = sharded_kcenter(points, 40, shard_size=2048, seed=0).selected
    assert len(set(labels[chosen].tolist())) >= 18
    chosen = sharded_kcenter(points, 200, shard_size=2048, seed=0).selected
    assert set(labels[chosen].tolist()) == set(range(20))


def test_greedy_covers_every_cluster() -> None:
    points, labels = clustered(n=4000)
    chosen = greedy_kcenter(points, 20, seed=0)
    assert set(labels[chosen].tolist()) == set(range(20))


# -------------------------------------------------------------- random_projection


def test_projection_passthrough() -> None:
    features = torch.randn(10, 16)
    assert random_projection(features, None, 0) is features
    assert random_projection(features, 16, 0) is features
    assert random_projection(features, 64, 0) is features


def test_projection_shape_deterministic_linear() -> None:
    features = torch.randn(20, 64)
    a = random_projection(features, 8, 3)
    assert a.shape == (20, 8) and a.dtype == features.dtype
    assert torch.equal(a, random_projection(features, 8, 3))
    assert not torch.equal(a, random_projection(features, 8, 4))
    # Linear: the projection of a sum is the sum of projections.
    torch.testing.assert_close(
        random_projection(features[:1] + features[1:2], 8, 3), a[:1] + a[1:2], atol=1e-4, rtol=1e-4
    )


def test_projection_preserves_distances_jl() -> None:
    generator = torch.Generator().manual_seed(11)
    features = torch.randn(200, 1024, generator=generator, dtype=torch.float64)
    projected = random_projection(features, 128, seed=0)
    before = torch.pdist(features)
    after = torch.pdist(projected)
    relative = (after / before - 1.0).abs()
    assert float(relative.mean()) < 0.1  # expected ~0.05 for dim 128
    assert float(relative.max()) < 0.4


# ----------------------------------------------------------------- select_coreset


def test_select_none_keeps_everything() -> None:
    features = torch.randn(50, 4)
    assert torch.equal(select_coreset(features, CoresetConfig(method="none")), torch.arange(50))


def test_select_ratio_one_keeps_everything() -> None:
    features = torch.randn(50, 4)
    assert torch.equal(select_coreset(features, CoresetConfig(ratio=1.0)), torch.arange(50))


def test_select_random() -> None:
    features = torch.randn(1000, 4)
    config = CoresetConfig(method="random", ratio=0.05, min_size=None, seed=3)
    chosen = select_coreset(features, config)
    assert chosen.shape == (50,)
    assert torch.equal(chosen, chosen.sort().values)
    assert len(set(chosen.tolist())) == 50
    assert torch.equal(chosen, select_coreset(features, config))
    other = select_coreset(
        features, CoresetConfig(method="random", ratio=0.05, min_size=None, seed=4)
    )
    assert not torch.equal(chosen, other)


def test_select_greedy_matches_greedy_kcenter_on_projection() -> None:
    features = torch.randn(600, 256, generator=torch.Generator().manual_seed(0))
    config = CoresetConfig(method="greedy", size=30, projection_dim=16, seed=2)
    chosen = select_coreset(features, config)
    expected = greedy_kcenter(random_projection(features, 16, 2), 30, 2).sort().values
    assert torch.equal(chosen, expected)


def test_select_greedy_without_projection() -> None:
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    config = CoresetConfig(method="greedy", size=10, projection_dim=None, seed=1)
    assert torch.equal(
        select_coreset(features, config), greedy_kcenter(features, 10, 1).sort().values
    )


def test_select_sharded() -> None:
    features = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0))
    config = CoresetConfig(
        method="sharded", ratio=0.02, min_size=None, shard_size=256, projection_dim=None
    )
    chosen = select_coreset(features, config)
    assert chosen.shape == (40,)
    assert torch.equal(chosen, chosen.sort().values)
    assert len(set(chosen.tolist())) == 40
    expected = sharded_kcenter(features, 40, 256, 0).selected.sort().values
    assert torch.equal(chosen, expected)


def test_select_projection_keeps_clusters() -> None:
    points, labels = clustered(n=3000, dim=256)
    config = CoresetConfig(method="greedy", size=20, projection_dim=8)
    chosen = select_coreset(points, config)
    assert set(labels[chosen].tolist()) == set(range(20))


def test_select_progress_passed_through() -> None:
    calls: list[tuple[int, int]] = []
    select_coreset(
        torch.randn(500, 4),
        CoresetConfig(method="greedy", size=50),
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls and calls[-1] == (50, 50)


def test_choice_pool_holds_the_bank_and_at_most_as_many_other_rows() -> None:
    points = torch.randn(6000, 8, generator=torch.Generator().manual_seed(5))
    for method in ("sharded", "greedy"):
        config = CoresetConfig(method=method, size=100, shard_size=1024, projection_dim=None)
        selected, pool = choose_coreset(points, config)
        assert torch.equal(selected, select_coreset(points, config))
        assert torch.isin(selected, pool).all()
        assert len(set(pool.tolist())) == pool.numel() <= 2 * 100
    # Sharded: the rest of the pool is what the last greedy pass chose from.
    _, union = sharded_kcenter(points, 100, 1024, seed=0)
    selected, pool = choose_coreset(
        points, CoresetConfig(size=100, shard_size=1024, projection_dim=None)
    )
    assert torch.isin(pool, union).all()
    # A random coreset's stand-ins would be random rows: its pool is the bank itself.
    selected, pool = choose_coreset(points, CoresetConfig(method="random", size=100))
    assert torch.equal(selected, pool)
