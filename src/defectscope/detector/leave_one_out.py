"""Leave-one-out scores that match new images: an image's own bank rows get stand-ins.

The coreset keeps about one row per region of feature space, and where it picked a training
image's patch, that image owns the region's only row. Plain leave-one-out removes the row and
leaves a hole no new image meets, so it overstates good scores (measured: about 4 % at the
median on MVTec screw at 320 px, which pushed the threshold above every good test image). A
coreset built without the image would have drawn a nearby row from another image instead: the
stand-in of a bank row is its nearest row, owned by another image, of the pool the coreset
picked from (no denser than the bank; a bank row when one is nearest, adding nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class StandIns(NamedTuple):
    """Per bank row, the row that stands in for it when its owner is left out."""

    rows: torch.Tensor  # (M, D): the bank row's stand-in (a copy of itself where there is none)
    valid: torch.Tensor  # (M,) bool: False where no other image has a row in the pool


def find_stand_ins(
    bank: torch.Tensor,
    bank_owner: torch.Tensor,
    pool: torch.Tensor,
    pool_owner: torch.Tensor,
    chunk_size: int = 1024,
) -> StandIns:
    """Nearest ``pool`` row of another owner for every bank row (one exact search). The
    pool holds the bank itself (`coreset.choose_coreset`), so it is never empty."""
    bank_owner = bank_owner.to(bank.device)
    pool_owner = pool_owner.to(bank.device)
    pool_sq = (pool * pool).sum(dim=1)[None, :]
    nearest = torch.zeros(bank.shape[0], dtype=torch.long, device=bank.device)
    valid = torch.zeros(bank.shape[0], dtype=torch.bool, device=bank.device)
    for start in range(0, bank.shape[0], chunk_size):
        rows = bank[start : start + chunk_size]
        block = torch.addmm(pool_sq, rows, pool.T, alpha=-2.0)
        same = bank_owner[start : start + chunk_size, None] == pool_owner[None, :]
        block.masked_fill_(same, float("inf"))
        values, index = block.min(dim=1)
        nearest[start : start + chunk_size] = index
        valid[start : start + chunk_size] = torch.isfinite(values)
    stand_ins = torch.where(valid[:, None], pool[nearest], bank)
    return StandIns(stand_ins, valid)


def own_rows_and_stand_ins(
    image_ids: Sequence[int], bank_owner: torch.Tensor, stand_ins: StandIns | None
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """Per image: the bank rows it must not find, and (stand-in rows, the bank row each one
    reports as found) it searches besides the rest of the bank. ``bank_owner`` on the
    stand-ins' device."""
    own = [(bank_owner == index).nonzero().flatten() for index in image_ids]
    if stand_ins is None:
        return own, None
    extra = []
    for rows in own:
        kept = rows[stand_ins.valid[rows]]
        extra.append((stand_ins.rows[kept], kept))
    return own, extra
