"""Per-layer weights of the patch features, and auto mode's balanced raw candidate (sets them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _auto import AUTO_CONFIG
from _images import texture_crops, with_defect

from defectscope.config import DetectorConfig
from defectscope.detector.candidates import balancing_weights
from defectscope.detector.detector import Detector
from defectscope.errors import ConfigError
from defectscope.features.patches import PatchFeatures

BALANCED = {**AUTO_CONFIG, "auto": {**AUTO_CONFIG["auto"], "candidates": ["raw_balanced"]}}


@pytest.fixture(scope="module")
def balanced() -> Detector:
    """A fit whose only candidate is the balanced one: auto mode must set its weights."""
    return Detector(BALANCED).fit(texture_crops(16, seed=21))


def _layer_norms(features: PatchFeatures, maps: list[torch.Tensor]) -> list[float]:
    patches = features.aggregate(maps)
    norms, start = [], 0
    for dim in features.layer_dims:
        norms.append(float(patches[:, start : start + dim].norm(dim=1).mean()))
        start += dim
    return norms


def test_weights_multiply_each_layer_after_normalisation(fitted: Detector) -> None:
    backbone = fitted.features.backbone
    maps = list(backbone(torch.rand(2, 3, 64, 96)))
    plain = PatchFeatures(backbone, 1, None, "l2").aggregate(maps)
    weighted = PatchFeatures(backbone, 1, None, "l2", layer_weights=[2.0, 0.5])
    split = weighted.layer_dims[0]
    got = weighted.aggregate(maps)
    torch.testing.assert_close(got[:, :split], 2.0 * plain[:, :split])
    torch.testing.assert_close(got[:, split:], 0.5 * plain[:, split:])


def test_balancing_gives_every_layer_one_mean_norm_at_the_raw_scale(fitted: Detector) -> None:
    backbone = fitted.features.backbone
    batches = []
    for seed in (1, 2):
        shallow, deep = backbone(fitted.preprocessor(texture_crops(4, seed=seed)))
        # On brick both layers happen to have one mean norm; on a product they need not.
        batches.append([shallow, 2.5 * deep])
    raw = PatchFeatures(backbone, 1, None, "none")
    before = np.array([_layer_norms(raw, b) for b in batches]).mean(axis=0)
    assert before.max() / before.min() > 2.0
    weights = balancing_weights(raw, batches, None)
    after = np.array(
        [_layer_norms(PatchFeatures(backbone, 1, None, "none", layer_weights=weights), b)
         for b in batches]
    ).mean(axis=0)  # fmt: skip
    assert after == pytest.approx([after.mean()] * len(after), rel=1e-3)
    # Their geometric mean is the raw layers' geometric mean norm: distances keep their scale.
    assert float(np.exp(np.log(weights).mean())) == pytest.approx(1.0, rel=1e-4)
    assert after.mean() == pytest.approx(float(np.exp(np.log(before).mean())), rel=1e-3)


def test_balancing_leaves_a_silent_or_lopsided_layer_within_bounds(fitted: Detector) -> None:
    backbone = fitted.features.backbone
    shallow, deep = backbone(fitted.preprocessor(texture_crops(2, seed=1)))
    raw = PatchFeatures(backbone, 1, None, "none")
    # A layer that is zero on every good image (e.g. all-black images) is left as it is.
    assert balancing_weights(raw, [[shallow, torch.zeros_like(deep)]], None) == [1.0, 1.0]
    # A layer a million times weaker gets weights within the bounds, which the config accepts.
    weights = balancing_weights(raw, [[shallow, 1e-6 * deep]], None)
    assert all(1e-3 <= w <= 1e3 for w in weights) and weights[1] > weights[0]
    DetectorConfig.from_dict({"features": {"layer_weights": weights}})


def test_a_wrong_number_of_weights_or_a_bad_weight_is_a_clear_config_error(
    fitted: Detector,
) -> None:
    with pytest.raises(ConfigError, match="3 weights for the backbone's 2 layers"):
        PatchFeatures(fitted.features.backbone, layer_weights=[1.0, 1.0, 1.0])
    for bad in ([0.0, 1.0], [-1.0, 1.0], [float("nan"), 1.0], [float("inf"), 1.0], []):
        with pytest.raises(ConfigError, match="layer_weights"):
            DetectorConfig.from_dict({"features": {"layer_weights": bad}})
    with pytest.raises(ConfigError, match="3 weights"):
        Detector({**BALANCED, "features": {**BALANCED["features"], "layer_weights": [1, 1, 1]},
                  "auto": {"enabled": False}}).fit(texture_crops(4, seed=3))  # fmt: skip


def test_the_balanced_choice_is_applied_saved_and_scores_alike_after_load(
    balanced: Detector, tmp_path: Path
) -> None:
    selection = balanced.info.selection
    assert selection["chosen"] == "raw_balanced"
    weights = balanced.config.features.layer_weights
    assert weights is not None and len(weights) == 2 and weights[0] != weights[1]
    assert balanced.config.features.normalize == "none"
    assert balanced.features.layer_weights == tuple(weights)
    # The half-size bank embeds with the same weights.
    assert balanced.half_scale is not None
    assert balanced.half_scale.parts.features.layer_weights == tuple(weights)
    balanced.save(tmp_path)
    loaded = Detector.load(tmp_path)
    assert loaded.config.features.layer_weights == weights
    image, _ = with_defect(texture_crops(1, seed=22)[0], seed=3)
    a, b = balanced.predict([image]), loaded.predict([image])
    assert a[0].score == pytest.approx(b[0].score, rel=1e-6)
    np.testing.assert_allclose(a[0].anomaly_map, b[0].anomaly_map, atol=1e-6)


def test_the_balanced_model_exports_with_its_weights(balanced: Detector, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from defectscope.export import export_onnx, load_exported

    images = [*texture_crops(2, seed=23), with_defect(texture_crops(1, seed=24)[0])[0]]
    reference = balanced.predict(images)
    got = load_exported(export_onnx(balanced, tmp_path / "m.onnx")).predict(images)
    for ref, pred in zip(reference, got, strict=True):
        assert pred.score == pytest.approx(ref.score, rel=1e-4)
        assert np.abs(pred.anomaly_map - ref.anomaly_map).max() <= 1e-3
