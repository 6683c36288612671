"""An exact nearest-neighbour search that does most of its arithmetic in bfloat16.

The distance block of an exact search is one matrix product per chunk of queries, and on CPUs
with bfloat16 dot-product instructions (AVX512-BF16, AMX) that product runs several times faster
in bfloat16 than in float32 (measured 7x here). bfloat16 keeps 8 significant bits, too few to
rank neighbours by itself, so `BankScreen` uses it only to pick a few candidates per query; their
distances are then computed in float32, and a rounding bound proves that no other bank row can
be nearer. Queries the bound cannot settle (about 2 % of MVTec bottle's test patches) are searched
again in float32, so the result is the float32 search's, not an approximation.

The bound: with unit roundoff u = 2^-8, rounding the operands of ``|c|^2 - 2 q.c`` to bfloat16,
the float32 accumulation and rounding the result to bfloat16 err by at most about
``3u (|c|^2 + 2 |q| |c|)``; `SAFETY` x u leaves room above that. Centring queries and bank on the
bank's mean (distances do not change) keeps those norms, hence the bound, small.

The block adds a per-query constant K a little above ``|q|^2 + bound`` (exact in bfloat16, so
only the result's rounding grows, by at most u K / 2; the bound adds u K): every value is then
non-negative, and non-negative bfloat16 values order as their bits do as int16. Ranking on
int16 is faster (a group minimum over 8 columns, then a top-k of those minima, then of the
chosen groups' columns: `smallest_columns`) than a bfloat16 top-k over the whole row.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = 2.0**-8  # bfloat16: 8 significant bits
SAFETY = 4.0  # the derived bound is ~3.02 u; 4 u is a proven, not a tuned, margin
EXTRA_CANDIDATES = 11  # candidates per query beyond k (12 for k = 1; 1.9 % fall back on bottle)
SCREEN_CHUNK = 512  # queries per block: measured fastest of 128-1024 (bank of 6.7k rows)
GROUP = 8  # columns per group minimum in `smallest_columns`
CONSTANT_MARGIN = 1.02  # K = 1.02 (|q|^2 + bound): non-negative, room for K's own rounding


def screen_supported(device: torch.device) -> bool:
    """Whether bfloat16 products are fast here: a CPU with AVX512-BF16 or AMX (elsewhere
    bfloat16 is emulated and slower than float32; a GPU's float32 search is fast already)."""
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def screen_bytes(bank: torch.Tensor) -> int:
    """Memory the exact search's bfloat16 copy of ``bank`` takes where the screen is on."""
    if not screen_supported(bank.device) or bank.dtype != torch.float32:
        return 0
    return bank.shape[0] * (bank.shape[1] + 2) * 2


class BankScreen:
    """A bfloat16 copy of the bank, centred, with its squared norms and ones as two more
    columns, so one product gives ``|c|^2 - 2 q.c`` (the squared distance less ``|q|^2``) or
    the whole squared distance for every row."""

    def __init__(self, bank: torch.Tensor) -> None:
        self.mean = bank.mean(dim=0, keepdim=True)
        centred = bank - self.mean
        squared = (centred * centred).sum(dim=1)
        self.max_norm = float(squared.max().sqrt()) if bank.shape[0] else 0.0
        ones = torch.ones_like(squared)
        operand = torch.cat([centred, squared[:, None], ones[:, None]], dim=1)
        self.operand = operand.to(torch.bfloat16).T.contiguous()

    def _left(self, centred: torch.Tensor, constant: torch.Tensor) -> torch.Tensor:
        """The centred queries' bfloat16 operand, with ``constant`` the value each row adds."""
        ones = torch.ones_like(constant)[:, None]
        return torch.cat([centred * -2.0, ones, constant[:, None]], dim=1).to(torch.bfloat16)

    def block(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Approximate ``|c|^2 - 2 q.c + K`` (Q, M) in bfloat16, never negative, and per query
        the offset that turns an approximate value into a lower bound of the row's squared
        distance."""
        centred = queries - self.mean
        norms = centred.norm(dim=1)
        bound = self._rounding_bound(norms)
        # Rounded to bfloat16 here, so the product adds exactly this K.
        constant = (CONSTANT_MARGIN * (norms * norms + bound)).to(torch.bfloat16).float()
        # K is exact in bfloat16: it only adds to the result's rounding, at most u K / 2.
        slack = bound + UNIT_ROUNDOFF * constant
        return self._left(centred, constant) @ self.operand, norms * norms - constant - slack

    def _rounding_bound(self, norms: torch.Tensor) -> torch.Tensor:
        """How far a bfloat16 ``|c|^2 - 2 q.c`` may be from its exact value, per query norm."""
        return SAFETY * UNIT_ROUNDOFF * (self.max_norm**2 + 2.0 * norms * self.max_norm)

    def distance_block(self, queries: torch.Tensor) -> torch.Tensor:
        """Approximate squared distances (Q, M) in bfloat16 (no bound: for `nearest_guess`)."""
        centred = queries - self.mean
        norms = centred.norm(dim=1)
        return self._left(centred, norms * norms) @ self.operand


def nearest_guess(block: torch.Tensor) -> torch.Tensor:
    """Per row of a `BankScreen.distance_block` (excluded rows set to +inf), the column with the
    smallest value, nearly always the nearest row (an excluded one only where all are)."""
    # Squared distances are >= 0 (bar rounding near 0), and non-negative bfloat16 values order
    # as their bits do: an int16 minimum is 2x faster than a bfloat16 one here.
    return block.view(torch.int16).min(dim=1).indices


def direct_distances(
    bank: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, ranked: torch.Tensor
) -> torch.Tensor:
    """Squared float32 distances (Q, C) from each query to the bank ``rows`` (Q, C) a block
    ranked for it, computed as |q - c|^2 (no cancellation); +inf where the block's ``ranked``
    values are (excluded rows stay out)."""
    exact = (queries[:, None, :] - bank[rows]).square_().sum(dim=2)
    return exact.masked_fill_(torch.isinf(ranked), float("inf"))


def smallest_columns(block: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a `BankScreen.block` (non-negative or +inf), its ``n`` smallest values in
    ascending order and their columns, as a top-k would give them (ties in any order).

    Ranked on the values' bits as int16: the minimum of each group of `GROUP` columns, the ``n``
    groups with the smallest minima, then the ``n`` smallest of those groups' columns and the
    last partial group's. A row's ``n`` smallest values lie in those groups: any column of
    another group is at least its group's minimum, hence at least ``n`` values already in."""
    keys = block.view(torch.int16)
    rows, width = keys.shape
    full = width // GROUP * GROUP
    if full < 4 * GROUP * n:  # narrow: a plain top-k is as fast
        values, columns = keys.topk(n, dim=1, largest=False, sorted=True)
        return values.view(torch.bfloat16), columns
    minima = keys[:, :full].unflatten(1, (full // GROUP, GROUP)).amin(dim=2)
    groups = minima.topk(n, dim=1, largest=False, sorted=False).indices
    offsets = torch.arange(GROUP, device=keys.device)
    columns = (groups[:, :, None] * GROUP + offsets).flatten(1)
    if full < width:  # the last, partial group's columns are always candidates
        tail = torch.arange(full, width, device=keys.device).expand(rows, width - full)
        columns = torch.cat([columns, tail], dim=1)
    values, picked = keys.gather(1, columns).topk(n, dim=1, largest=False, sorted=True)
    return values.view(torch.bfloat16), columns.gather(1, picked)


def screened_nearest(
    bank: torch.Tensor,
    queries: torch.Tensor,
    approx: torch.Tensor,
    lower_offset: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a screen's block (excluded rows already +inf): squared float32 distances (Q, k) and
    bank indices (Q, k) of the nearest candidates, and a (Q,) bool mask of the queries whose
    result is proven exact (for the others, rows outside the candidates might be nearer)."""
    n_candidates = min(approx.shape[1], k + EXTRA_CANDIDATES)
    values, candidates = smallest_columns(approx, n_candidates)
    exact = direct_distances(bank, queries, candidates, values)
    if k == 1:
        best, order = exact.min(dim=1, keepdim=True)
    else:
        best, order = exact.topk(k, dim=1, largest=False, sorted=True)
    if n_candidates == approx.shape[1]:
        proven = torch.ones(queries.shape[0], dtype=torch.bool, device=queries.device)
    else:
        # Every other row's approximate value is at least the last candidate's.
        lowest_other = values[:, -1].float() + lower_offset
        proven = lowest_other >= best[:, -1]
    return best, candidates.gather(1, order), proven
