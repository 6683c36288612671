"""Shards of a staged fit: what one chunk of images contributes, and where it is kept.

`FitShard` holds plain tensors and lists (picklable, so a distributed engine can return it);
`ShardStore` keeps shards for the final merge and moves their big arrays to memory-mapped
temporary files beyond a RAM budget, so a large training set fits in bounded memory.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from defectscope.config import FitConfig


class SpilledArray:
    """A float32 array in a file, read back a slice at a time through a short-lived memmap."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)

    @classmethod
    def write(cls, tensor: torch.Tensor, path: Path) -> SpilledArray:
        array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        mapped = np.memmap(path, dtype=np.float32, mode="w+", shape=array.shape or (0,))
        if array.size:
            mapped[:] = array
        mapped.flush()
        del mapped  # unmapped: the data now lives in the page cache / on disk, not in our RSS
        return cls(path, array.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        if stop <= start or math.prod(self.shape) == 0:
            return torch.empty((0, *self.shape[1:]), dtype=torch.float32)
        mapped = np.memmap(self.path, dtype=np.float32, mode="r", shape=self.shape)
        rows = np.array(mapped[start:stop])  # a copy, so the mapping can go now
        del mapped
        return torch.from_numpy(rows)


ArrayLike = torch.Tensor | SpilledArray


def read_rows(array: ArrayLike, start: int = 0, stop: int | None = None) -> torch.Tensor:
    if isinstance(array, SpilledArray):
        return array.read(start, stop)
    return array[start:stop]


@dataclass
class FitShard:
    """What one chunk of images contributes to a fit (plain tensors and lists: picklable).

    ``candidates`` (M, D) float32 are the chunk's coreset candidates, in image order;
    ``candidate_owners`` (M,) int64 their global image indices. ``image_ids``, ``names`` and
    ``hashes`` describe the readable images of the chunk (``skipped`` the unreadable ones);
    ``pooled`` (n, D) their grid-mean embeddings (drift reference); ``calibration_embeddings``
    (C, D, h, w) the embeddings of the chunk's calibration-sample images ``calibration_ids``.
    ``n_patches`` counts the bank-eligible patches before the chunk's coreset. After
    `ShardStore.keep` the two big arrays may be `SpilledArray`s, valid on this machine only.
    """

    offset: int
    stop: int
    image_ids: list[int]
    names: list[str | None]
    hashes: list[str]
    skipped: list[dict]
    grid: tuple[int, int]
    n_patches: int
    candidates: ArrayLike
    candidate_owners: torch.Tensor
    pooled: np.ndarray
    calibration_ids: list[int]
    calibration_embeddings: ArrayLike
    timings: dict[str, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of the arrays that `ShardStore` may move to disk (0 once moved)."""
        return sum(
            a.numel() * a.element_size()
            for a in (self.candidates, self.calibration_embeddings)
            if isinstance(a, torch.Tensor)
        )


class ShardStore:
    """Keeps shards for `fit_from_shards`, spilling big arrays past a RAM budget to disk.

    Use as a context manager: the temporary folder and its files go when the block ends, so
    the shards it kept must not be used after it.
    """

    def __init__(self, budget_bytes: int, directory: str | Path | None = None) -> None:
        self.budget_bytes = int(budget_bytes)
        self.parent = directory
        self.directory: Path | None = None
        self.ram_bytes = 0
        self.spilled_bytes = 0
        self._files = 0

    @classmethod
    def from_config(cls, config: FitConfig) -> ShardStore:
        return cls(config.ram_budget_mb * 1024 * 1024, config.spill_dir)

    def __enter__(self) -> ShardStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def _spill(self, tensor: torch.Tensor) -> SpilledArray:
        if self.directory is None:
            if self.parent is not None:
                Path(self.parent).mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="defectscope-fit-", dir=self.parent))
        self._files += 1
        spilled = SpilledArray.write(tensor, self.directory / f"array-{self._files}.f32")
        self.spilled_bytes += tensor.numel() * 4
        return spilled

    def keep(self, shard: FitShard) -> FitShard:
        """The shard, with its candidates and calibration embeddings on disk if over budget."""
        size = shard.nbytes()
        if self.ram_bytes + size <= self.budget_bytes:
            self.ram_bytes += size
            return shard
        if isinstance(shard.candidates, torch.Tensor):
            shard.candidates = self._spill(shard.candidates)
        if isinstance(shard.calibration_embeddings, torch.Tensor):
            shard.calibration_embeddings = self._spill(shard.calibration_embeddings)
        return shard
