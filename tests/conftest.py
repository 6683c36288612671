"""Shared pytest fixtures: the MVTec AD bottle data, and the one small fitted model (with its
saved file and its ONNX export) that every test needing *some* fitted model shares.

Fitting costs seconds; most tests only need a fitted model, not a fit of their own. They get
this session's `fitted` (`FAST_CONFIG` on `fast_train_images()`, fitted once). Tests that fit
on purpose (fitting, calibration, other configurations) keep their own fits.

The shared objects are read-only: a test that changes the detector (thresholds, info, engine)
takes `fitted_copy`, a deep copy of its own; one that writes the model file copies it first
(`_models.copy_model`).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from defectscope.detector.detector import Detector

# The workplace keeps datasets next to the repository, never inside it.
BOTTLE_ROOT = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
)
BOTTLE_SKIP_REASON = (
    "MVTec AD bottle not found at ../shared/datasets/mvtec_ad/bottle "
    "(only available inside the defectscope workplace)"
)


def pytest_collection_finish(session: pytest.Session) -> None:
    import _mypy

    # Under pytest-xdist every worker collects every test: the one that runs it starts mypy
    # when it gets there (two early runs would share one cache folder).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if any(item.nodeid == _mypy.TEST_ID for item in session.items):
        _mypy.start()  # a minute or two of one core, beside the tests that come before it


def pytest_sessionfinish(session: pytest.Session) -> None:
    import _mypy

    _mypy.stop()


@pytest.fixture(scope="session")
def bottle_root() -> Path:
    """The MVTec AD bottle category, or a skip when this checkout has no ../shared."""
    if not (BOTTLE_ROOT / "train" / "good").is_dir():
        pytest.skip(BOTTLE_SKIP_REASON)
    return BOTTLE_ROOT


def _state(detector: Detector) -> dict[str, Any]:
    """What a test could change by mistake in a shared detector, as comparable values."""
    return {
        "engine": type(detector.engine).__name__,
        "config": detector.config.to_dict(),
        "description": json.dumps(detector.describe(), sort_keys=True, default=str),
        "bank": detector.memory_bank.double().sum().item(),
    }


@pytest.fixture(scope="session")
def fitted() -> Iterator[Detector]:
    """The quick model (`FAST_CONFIG`, `fast_train_images()`), fitted once per session.

    Shared by every module: do not change it (use `fitted_copy` for that). The session ends
    with an error if a test changed it, since later tests would then depend on test order."""
    from _images import FAST_CONFIG
    from _models import fast_train_images

    from defectscope.detector.detector import Detector

    detector = Detector(FAST_CONFIG).fit(fast_train_images())
    before = _state(detector)
    yield detector
    assert _state(detector) == before, "a test changed the shared `fitted` detector"


@pytest.fixture
def fitted_copy(fitted: Detector) -> Detector:
    """A deep copy of `fitted` that this test may change freely."""
    return copy.deepcopy(fitted)


@pytest.fixture(scope="session")
def texture_model_dir(fitted: Detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fitted` saved once, as a folder holding model.safetensors. Read-only: a test that
    writes to the model file works on `_models.copy_model(texture_model_dir, ...)`."""
    out = tmp_path_factory.mktemp("texture-model")
    fitted.save(out)
    return out


@pytest.fixture(scope="session")
def onnx_file(fitted: Detector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fitted` exported to ONNX once (fp32, dynamic batch). Read-only."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from defectscope.export import export_onnx

    return export_onnx(fitted, tmp_path_factory.mktemp("onnx") / "model.onnx")
