"""Memory bank subsampling: greedy k-center coreset (PatchCore), exact or sharded.

Exact greedy costs O(N * k) distance evaluations and streams the whole feature matrix through
memory k times. The sharded variant is two-level: greedy within random shards that fit in cache
(each keeping ``oversample`` times its share), then greedy over the union of those picks. That
cuts the work by about the number of shards, keeps memory bounded, and the second level restores
the global view a plain union lacks; its quality cost is measured in BENCHMARKS.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch

from defectscope.config import CoresetConfig

ProgressFn = Callable[[int, int], None]


def coreset_size(n_total: int, config: CoresetConfig) -> int:
    if config.method == "none":
        return n_total
    target = config.size if config.size is not None else math.ceil(config.ratio * n_total)
    if config.size is None and config.min_size is not None:
        target = max(target, config.min_size)
    if config.max_size is not None:
        target = min(target, config.max_size)
    return max(1, min(n_total, target))


def random_projection(features: torch.Tensor, dim: int | None, seed: int) -> torch.Tensor:
    """Johnson-Lindenstrauss projection: distances roughly kept, selection cheaper."""
    if dim is None or dim >= features.shape[1]:
        return features
    generator = torch.Generator(device="cpu").manual_seed(seed)
    matrix = torch.randn(features.shape[1], dim, generator=generator) / math.sqrt(dim)
    return features @ matrix.to(features.device, features.dtype)


def greedy_kcenter(
    features: torch.Tensor, n_select: int, seed: int = 0, progress: ProgressFn | None = None
) -> torch.Tensor:
    """Indices of ``n_select`` rows chosen by greedy farthest-point selection."""
    n = features.shape[0]
    if n_select >= n:
        return torch.arange(n, device=features.device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = int(torch.randint(n, (1,), generator=generator))
    # Centring keeps norms small, so ||x||^2 - 2x.c + ||c||^2 does not cancel catastrophically.
    features = features - features.mean(dim=0, keepdim=True)
    if features.device.type == "cpu" and features.dtype == torch.float32:
        # numpy's BLAS matrix-vector product, the whole cost of a step, is 2-3x torch's here.
        x = features.detach().numpy()
        squared = np.einsum("ij,ij->i", x, x)
        min_dist = squared - 2.0 * (x @ x[first]) + squared[first]
        step = np.empty_like(min_dist)

        def add_center(index: Any) -> None:
            np.matmul(x, x[index], out=step)
            np.multiply(step, -2.0, out=step)
            np.add(step, squared, out=step)
            np.add(step, squared[index], out=step)
            np.minimum(min_dist, step, out=min_dist)

        picks = _farthest_first(n_select, first, min_dist, np.argmax, add_center, progress)
        return torch.tensor(picks, dtype=torch.long)
    squared_t = (features * features).sum(dim=1)
    min_dist_t = squared_t - 2.0 * (features @ features[first]) + squared_t[first]
    step_t = torch.empty_like(min_dist_t)

    def add_center_t(index: Any) -> None:
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, in one fused matrix-vector product.
        torch.addmv(squared_t + squared_t[index], features, features[index], alpha=-2.0, out=step_t)
        torch.minimum(min_dist_t, step_t, out=min_dist_t)

    # Indices stay on the device: no host round trip per step on a GPU.
    picks_t = _farthest_first(n_select, first, min_dist_t, torch.argmax, add_center_t, progress)
    return torch.stack([torch.as_tensor(i, device=features.device) for i in picks_t])


def _farthest_first(
    n_select: int,
    first: int,
    min_dist: Any,
    argmax: Callable[[Any], Any],
    add_center: Callable[[Any], None],
    progress: ProgressFn | None,
) -> list[Any]:
    """The greedy loop, on numpy or torch arrays: ``min_dist`` holds each row's squared
    distance to the nearest pick, ``add_center`` lowers it for a new pick."""
    picks = [first]
    min_dist[first] = -1.0  # never pick a point twice, whatever rounding says
    report_every = max(1, n_select // 100)
    for i in range(1, n_select):
        index = argmax(min_dist)
        picks.append(index)
        add_center(index)
        min_dist[index] = -1.0
        if progress is not None and i % report_every == 0:
            progress(i, n_select)
    if progress is not None:
        progress(n_select, n_select)
    return picks


class CoresetChoice(NamedTuple):
    """The bank rows, and the pool the last greedy pass picked them from: the rows a coreset
    built without some image would have drawn that image's bank rows' stand-ins from."""

    selected: torch.Tensor
    pool: torch.Tensor


def sharded_kcenter(
    features: torch.Tensor,
    n_select: int,
    shard_size: int,
    seed: int = 0,
    progress: ProgressFn | None = None,
    oversample: float = 2.0,
) -> CoresetChoice:
    """Greedy k-center inside random shards, then greedy over the union of their picks (the
    pool; every row when there is one shard)."""
    n = features.shape[0]
    everything = torch.arange(n, device=features.device)
    if n_select >= n:
        return CoresetChoice(everything, everything)
    n_shards = max(1, math.ceil(n / shard_size))
    if n_shards == 1:
        return CoresetChoice(greedy_kcenter(features, n_select, seed, progress), everything)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(features.device)
    shards = torch.tensor_split(order, n_shards)
    first_level = min(n, math.ceil(oversample * n_select))
    # Spread the budget in proportion to shard size, exactly first_level in total.
    quotas = [len(s) * first_level // n for s in shards]
    for i in range(first_level - sum(quotas)):
        quotas[i % n_shards] += 1
    jobs = [
        (shard, quota, seed + shard_index)
        for shard_index, (shard, quota) in enumerate(zip(shards, quotas, strict=True))
        if quota > 0
    ]
    chosen = []
    done = 0
    for (shard, quota, _), local in zip(jobs, _first_level(features, jobs), strict=True):
        chosen.append(shard[local])
        done += quota
        if progress is not None:
            progress(done * n_select // (first_level + n_select), n_select)
    union = torch.cat(chosen)
    final = greedy_kcenter(features[union], n_select, seed)
    if progress is not None:
        progress(n_select, n_select)
    return CoresetChoice(union[final], union)


def _first_level(
    features: torch.Tensor, jobs: list[tuple[torch.Tensor, int, int]]
) -> Iterator[torch.Tensor]:
    """Greedy picks inside each (shard, quota, seed), in order. On the CPU the shards run in
    parallel, one single-threaded BLAS each: a shard's matrix-vector products are too small to
    spread over cores, so this is 1.5x faster on two cores (the picks do not change)."""

    def run(job: tuple[torch.Tensor, int, int]) -> torch.Tensor:
        shard, quota, seed = job
        return greedy_kcenter(features[shard], quota, seed)

    workers = min(len(jobs), torch.get_num_threads())
    if features.device.type != "cpu" or workers < 2:
        yield from map(run, jobs)
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
        yield from pool.map(run, jobs)


def select_coreset(
    features: torch.Tensor,
    config: CoresetConfig,
    progress: ProgressFn | None = None,
    n_select: int | None = None,
) -> torch.Tensor:
    """Indices into ``features`` (N, D) that form the memory bank, sorted ascending.

    ``n_select`` overrides the size the config gives for N rows: a staged fit selects from
    candidates already thinned per chunk, with the size planned from all patches.
    """
    return _pick(features, config, progress, n_select).selected


def choose_coreset(
    features: torch.Tensor,
    config: CoresetConfig,
    progress: ProgressFn | None = None,
    n_select: int | None = None,
) -> CoresetChoice:
    """`select_coreset`'s rows (sorted) and the pool they were picked from, the rows outside
    the bank thinned to at most as many as the bank holds, so the pool is no denser than the
    bank itself (a random coreset's pool is the bank: its stand-ins would be random rows)."""
    selected, pool = _pick(features, config, progress, n_select)
    outside = pool[~torch.isin(pool, selected)]
    if outside.numel() > selected.numel():
        generator = torch.Generator(device="cpu").manual_seed(config.seed + 1)
        keep = torch.randperm(outside.numel(), generator=generator)[: selected.numel()]
        outside = outside[keep.to(outside.device)]
    return CoresetChoice(selected, torch.cat([selected, outside.sort().values]))


def _pick(
    features: torch.Tensor,
    config: CoresetConfig,
    progress: ProgressFn | None,
    n_select: int | None,
) -> CoresetChoice:
    """The bank rows (sorted) and the whole pool the last greedy pass picked them from."""
    n = features.shape[0]
    n_select = coreset_size(n, config) if n_select is None else max(1, n_select)
    everything = torch.arange(n, device=features.device)
    if n_select >= n:
        return CoresetChoice(everything, everything)
    if config.method == "random":
        generator = torch.Generator(device="cpu").manual_seed(config.seed)
        picked = torch.randperm(n, generator=generator)[:n_select].sort().values
        picked = picked.to(features.device)
        return CoresetChoice(picked, picked)
    projected = random_projection(features, config.projection_dim, config.seed)
    if config.method == "greedy":
        selected, pool = greedy_kcenter(projected, n_select, config.seed, progress), everything
    else:
        selected, pool = sharded_kcenter(
            projected, n_select, config.shard_size, config.seed, progress
        )
    return CoresetChoice(selected.sort().values, pool)
