"""Patches at the edge of the input, scored on the same scale as the rest of the image.

A patch in the outer rings of the grid sees the backbone's zero padding, and the coreset keeps
few such patches, so good edge patches lie farther from the bank than good inner ones: on
textures most good images had their map's maximum within a patch of the edge (knurled metal:
12 of 12), where it hides small defects inside the image. The profile is learned from the
leave-one-out patch scores of the training images (good images only): for each of the outer
`RINGS` rings, the ratio of its high quantile's excess over the inner patches' median to the
inner patches' own (at least 1, never rising inwards). Scoring divides each edge patch's
excess by its ring's factor, so a good edge patch reaches the inner ones' tail and a defect at
the edge still stands out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from defectscope.errors import ModelFileError

# Outer rings of the patch grid that get their own factor; the ones inside are the reference.
RINGS = 4
# The tail compared: the map's maximum is what decides an image.
QUANTILE = 0.999
# Training images whose leave-one-out patch scores teach the profile.
SAMPLE_IMAGES = 96


def ring_index(
    h: int, w: int, rings: int = RINGS, device: torch.device | None = None
) -> torch.Tensor:
    """(h, w) long tensor: each patch's distance in patches to the grid's edge, at most
    ``rings`` (the inner patches)."""
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    rows = torch.minimum(ys, h - 1 - ys)[:, None]
    cols = torch.minimum(xs, w - 1 - xs)[None, :]
    return torch.minimum(rows, cols).clamp_(max=rings)


@dataclass(frozen=True)
class EdgeProfile:
    """Per outer ring, the factor (>= 1) its patches' excess over ``centre`` is divided by."""

    factors: tuple[float, ...]
    centre: float

    def scale_map(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        """(h, w): 1 / factor of each patch's ring (1 inside)."""
        inverse = torch.tensor([1.0 / f for f in self.factors] + [1.0], device=device)
        return inverse[ring_index(h, w, len(self.factors), device)]

    def to_dict(self) -> dict[str, Any]:
        return {"factors": list(self.factors), "centre": self.centre}

    @classmethod
    def from_dict(cls, data: Any, file: Any = "model") -> EdgeProfile | None:
        """Read back `to_dict` (None: a model without a profile); a malformed entry is a
        ModelFileError naming ``file``."""
        if data is None:
            return None
        try:
            if not isinstance(data, Mapping):
                raise TypeError
            factors = tuple(float(f) for f in data["factors"])
            centre = float(data["centre"])
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{file}: its edge profile is malformed: {data!r}") from None
        if not factors or not all(math.isfinite(f) and f >= 1.0 for f in factors):
            raise ModelFileError(f"{file}: its edge profile's factors are invalid: {data!r}")
        if not math.isfinite(centre):
            raise ModelFileError(f"{file}: its edge profile's centre is invalid: {data!r}")
        return cls(factors, centre)


def learn_edge_profile(patch_scores: torch.Tensor) -> EdgeProfile | None:
    """The profile of good images' out-of-sample patch scores (N, h, w), its factors never
    rising inwards; None where the grid has too few inner patches to compare with (a side
    under ``4 * RINGS``), or the inner scores have no spread."""
    n, h, w = patch_scores.shape
    # The inner patches must be at least half of each side to be the reference.
    if n == 0 or min(h, w) < 4 * RINGS:
        return None
    rings = ring_index(h, w, RINGS, patch_scores.device)
    scores = patch_scores.float()
    inner = scores[:, rings == RINGS].flatten()
    centre = float(inner.median())
    spread = float(torch.quantile(inner, QUANTILE)) - centre
    if not math.isfinite(spread) or spread <= 0:
        return None
    factors: list[float] = []
    for ring in range(RINGS):
        tail = float(torch.quantile(scores[:, rings == ring].flatten(), QUANTILE)) - centre
        factor = max(1.0, tail / spread) if math.isfinite(tail) else 1.0
        # The padding's reach fades inwards: a ring never gets more than the one outside it
        # (a larger factor further in is the product's own structure, or noise).
        factors.append(min(factor, factors[-1]) if factors else factor)
    return EdgeProfile(tuple(round(f, 6) for f in factors), centre)


def edge_profile_summary(full: Any, half: Any = None) -> str | None:
    """One line on a model's edge profiles (the full-size bank's and the half-size one's, as
    saved) for the fit summary and the report; None where neither bank has one."""
    parts = []
    for name, data in (("", full), ("half-size bank ", half)):
        if isinstance(data, Mapping) and data.get("factors"):
            factors = ", ".join(f"{float(f):.2f}" for f in data["factors"])
            parts.append(f"{name}{factors}")
    if not parts:
        return None
    return "outer rings' excess over the inner median divided by " + "; ".join(parts)
