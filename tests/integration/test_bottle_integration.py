"""End to end on real MVTec AD bottle images with the real default weights (a subset, for speed).

Skipped with a reason outside the workplace, where ../shared is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from defectscope import Detector
from defectscope.data.datasets import Dataset, open_dataset
from defectscope.evaluation.runner import evaluate

pytestmark = pytest.mark.needs_shared


@pytest.fixture(scope="module")
def subset(bottle_root) -> Dataset:
    full = open_dataset(bottle_root)
    by_type: dict[str, list] = {}
    for sample in full.test:
        by_type.setdefault(sample.defect_type, []).append(sample)
    test = [s for samples in by_type.values() for s in samples[:6]]
    return Dataset(full.root, full.layout, full.train[::4], test, [], full.name)


@pytest.fixture(scope="module")
def detector(subset: Dataset) -> Detector:
    return Detector({"device": "cpu"}).fit([s.path for s in subset.train])


def test_default_model_separates_bottle_defects(detector: Detector, subset: Dataset) -> None:
    metrics = evaluate(detector, subset).to_dict()["metrics"]
    assert metrics["image_auroc"] >= 0.98
    assert metrics["pixel_auroc"] >= 0.95
    assert metrics["aupro"] >= 0.85


def test_stored_threshold_flags_defects_not_good_bottles(
    detector: Detector, subset: Dataset
) -> None:
    predictions = detector.predict([s.path for s in subset.test])
    labels = np.array([s.label for s in subset.test])
    flagged = np.array([p.is_anomalous for p in predictions])
    assert flagged[labels == 1].mean() >= 0.8
    assert flagged[labels == 0].mean() <= 0.2
    assert all(p.anomaly_map.shape == (512, 512) for p in predictions)


def test_saved_model_reproduces_scores(detector: Detector, subset: Dataset, tmp_path) -> None:
    loaded = Detector.load(detector.save(tmp_path / "bottle"))
    paths = [s.path for s in subset.test[:4]]
    a = [p.score for p in detector.predict(paths)]
    b = [p.score for p in loaded.predict(paths)]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert loaded.describe()["training"]["fingerprint"] == detector.info.training.fingerprint
