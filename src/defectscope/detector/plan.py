"""`FitPlan`: the decisions a staged fit takes once, before any shard runs.

Which images are held out of the bank, which are the calibration sample, the chunks, and for a
few-shot fit the views of each image; a distributed fit ships the same plan to every worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from defectscope.config import CoresetConfig, DetectorConfig
from defectscope.detector import few_shot
from defectscope.detector.coreset import coreset_size
from defectscope.detector.selection import SelectionResult
from defectscope.errors import DefectscopeError


@dataclass
class FitPlan:
    """Decisions taken once for the whole training set; indices are positions in the input list.

    ``holdout``: images kept out of the bank (holdout calibration), ascending.
    ``calibration``: images whose out-of-sample scores set the thresholds, ascending.
    Few-shot fits (`defectscope.detector.few_shot`): ``views`` of each bank image in the bank,
    ``calibration_views`` jittered views per calibration image ('views' and few-shot
    'leave_one_out' calibration) and
    ``min_bank``, rows up to which the bank keeps every patch (0: the coreset config decides).
    """

    n_images: int
    chunk_images: int
    method: str
    holdout: list[int]
    calibration: list[int]
    seed: int = 0
    views: tuple[str, ...] = ("id",)
    calibration_views: int = 0
    min_bank: int = 0
    _holdout_set: frozenset[int] = field(init=False, repr=False, compare=False)
    _calibration_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._holdout_set = frozenset(self.holdout)
        self._calibration_set = frozenset(self.calibration)

    @classmethod
    def create(
        cls, n_images: int, config: DetectorConfig, selection: SelectionResult | None = None
    ) -> FitPlan:
        """The plan for ``n_images`` training images under ``config`` (deterministic); a
        few-shot ``selection`` sets the views and the calibration."""
        if n_images < 1:
            raise DefectscopeError("fit needs at least one good image")
        cal = config.calibration
        few = selection.few_shot if selection is not None else {}
        method = few.get("calibration", cal.method)
        if method == "leave_one_out" and n_images < 2 and not few_shot.applies(config, n_images):
            raise DefectscopeError(
                "leave-one-out calibration needs at least 2 good images (or few_shot.enabled)"
            )
        holdout: list[int] = []
        if method == "holdout":
            n_holdout = max(1, round(cal.holdout_fraction * n_images))
            if n_holdout >= n_images:
                raise DefectscopeError(
                    f"holdout calibration needs more images: {n_images} given, {n_holdout} held out"
                )
            # Seeded by coreset.seed, so a plan is reproducible from the config alone.
            generator = torch.Generator().manual_seed(config.coreset.seed)
            holdout = sorted(torch.randperm(n_images, generator=generator)[:n_holdout].tolist())
        pool = holdout if method == "holdout" else list(range(n_images))
        if method == "halves":
            pool = []  # scored by the few-shot selection, which split the image
        if len(pool) > cal.max_images:
            generator = torch.Generator().manual_seed(config.coreset.seed + 1)
            picks = torch.randperm(len(pool), generator=generator)[: cal.max_images]
            pool = sorted(pool[i] for i in picks.tolist())
        return cls(
            n_images=n_images,
            chunk_images=config.fit.chunk_images,
            method=method,
            holdout=holdout,
            calibration=pool,
            seed=config.coreset.seed,
            views=tuple(few.get("views", ("id",))),
            # Few-shot leave-one-out scores jittered views too: a threshold from the scores of
            # a few (n) images alone is their maximum, which a new good image exceeds 1 time in n+1.
            calibration_views=(
                int(few["calibration_views"]) if few and method in ("views", "leave_one_out") else 0
            ),
            min_bank=int(few.get("bank_size", 0)),
        )

    def chunks(self) -> list[tuple[int, int]]:
        """(offset, stop) image ranges, in order, covering all images."""
        return [
            (offset, min(offset + self.chunk_images, self.n_images))
            for offset in range(0, self.n_images, self.chunk_images)
        ]

    @property
    def single_chunk(self) -> bool:
        return self.n_images <= self.chunk_images

    @property
    def n_bank_images(self) -> int:
        return self.n_images - len(self.holdout)

    def in_bank(self, index: int) -> bool:
        return index not in self._holdout_set

    def in_calibration(self, index: int) -> bool:
        return index in self._calibration_set


def bank_target(n_patches: int, config: CoresetConfig) -> int:
    """Final bank size for ``n_patches`` bank-eligible patches (ratio or size, then max_size)."""
    return coreset_size(n_patches, config) if n_patches > 0 else 0
