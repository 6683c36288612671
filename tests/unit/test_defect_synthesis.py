"""Synthetic defects for auto mode: exact masks, every kind, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest
from _images import texture_crops

from defectscope.data.defect_synthesis import (
    DEFECT_KINDS,
    synthesize_defect,
    synthesize_defects,
)


def _object_image(size: int = 160) -> np.ndarray:
    """A dark ring on a plain light background: structure in one place only."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    image = np.full((size, size, 3), 200, np.uint8)
    image[(r > size * 0.2) & (r < size * 0.3)] = 60
    return image


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_mask_is_exactly_the_changed_pixels(kind: str) -> None:
    image, donor = texture_crops(2, size=160, seed=3)
    for seed in range(4):
        defect = synthesize_defect(image, kind, np.random.default_rng(seed), donor=donor)
        changed = np.any(defect.image != image, axis=2)
        assert defect.kind == kind
        assert defect.mask.dtype == bool and defect.mask.shape == image.shape[:2]
        assert defect.mask.any(), f"{kind} changed nothing"
        np.testing.assert_array_equal(defect.mask, changed)
        # A defect, not the whole image.
        assert defect.mask.mean() < 0.5


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    images = texture_crops(3, size=128, seed=1)
    first = synthesize_defects(images, per_image=2, seed=7)
    again = synthesize_defects(images, per_image=2, seed=7)
    other = synthesize_defects(images, per_image=2, seed=8)
    assert [d.kind for d in first] == [d.kind for d in again]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again, strict=True))
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(first, other, strict=True))


def test_kinds_are_taken_in_turn() -> None:
    defects = synthesize_defects(texture_crops(2, size=96), per_image=5, seed=0)
    assert [d.kind for d in defects] == list(DEFECT_KINDS) * 2


def test_defects_land_on_the_product_rather_than_the_plain_background() -> None:
    image = _object_image()
    gray = image[..., 0]
    structure = np.zeros(gray.shape, bool)
    structure[np.abs(np.diff(gray.astype(int), axis=0, prepend=gray[:1])) > 0] = True
    from scipy import ndimage

    near_ring = ndimage.binary_dilation(structure, iterations=8)
    hits = 0
    for seed in range(10):
        mask = synthesize_defect(image, "spot", np.random.default_rng(seed)).mask
        hits += bool((mask & near_ring).any())
    # The ring's neighbourhood is under a third of the image, yet most spots fall there.
    assert near_ring.mean() < 0.35
    assert hits >= 7


def test_bad_arguments_are_refused() -> None:
    image = texture_crops(1, size=64)[0]
    with pytest.raises(ValueError, match="unknown defect kind"):
        synthesize_defect(image, "dent", np.random.default_rng(0))
    with pytest.raises(ValueError, match="RGB uint8"):
        synthesize_defect(image[..., 0], "spot", np.random.default_rng(0))
