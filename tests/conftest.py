"""Shared pytest helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

# The workplace keeps datasets next to the repository, never inside it.
BOTTLE_ROOT = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
)
BOTTLE_SKIP_REASON = (
    "MVTec AD bottle not found at ../shared/datasets/mvtec_ad/bottle "
    "(only available inside the defectscope workplace)"
)


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """The MVTec AD bottle category, or a skip when this checkout has no ../shared."""
    if not (BOTTLE_ROOT / "train" / "good").is_dir():
        pytest.skip(BOTTLE_SKIP_REASON)
    return BOTTLE_ROOT


@pytest.fixture(scope="session")
def texture_model_dir(tmp_path_factory) -> Path:
    """A quick model (FAST_CONFIG, 16 texture crops), fitted once and shared read-only by the
    API tests that only need some fitted model on disk."""
    from _images import FAST_CONFIG, texture_crops

    from defectscope.detector.detector import Detector

    out = tmp_path_factory.mktemp("texture-model")
    Detector(FAST_CONFIG).fit(texture_crops(16, seed=0)).save(out)
    return out
