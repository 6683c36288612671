"""Per-layer weights and power normalisation of the patch features, and auto mode's balanced
candidates (they set the weights)."""

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
NORMALIZE = {"raw_balanced": "none", "power_balanced": "power"}


@pytest.fixture(scope="module", params=["power_balanced", "raw_balanced"])
def balanced(request: pytest.FixtureRequest) -> Detector:
    """A fit whose only candidate is a balanced one: auto mode must set its weights."""
    config = {**AUTO_CONFIG, "auto": {**AUTO_CONFIG["auto"], "candidates": [request.param]}}
    return Detector(config).fit(texture_crops(16, seed=21))


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


def test_power_normalisation_shortens_each_vector_to_a_power_of_its_length(
    fitted: Detector,
) -> None:
    backbone = fitted.features.backbone
    maps = list(backbone(torch.rand(2, 3, 64, 96)))
    raw = PatchFeatures(backbone, 1, None, "none").aggregate(maps)
    for power in (0.25, 0.5, 0.9):
        got = PatchFeatures(backbone, 1, None, "power", norm_power=power).aggregate(maps)
        start = 0
        for dim in PatchFeatures(backbone).layer_dims:
            before, after = raw[:, start : start + dim], got[:, start : start + dim]
            start += dim
            length = before.norm(dim=1, keepdim=True)
            # Same direction, length |x|^(1 - p): longer vectors stay longer, by less.
            torch.testing.assert_close(after, before / length.pow(power), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(
                after.norm(dim=1), length[:, 0].pow(1 - power), rtol=1e-4, atol=1e-6
            )
    with pytest.raises(ConfigError, match="'l2', 'power' or 'none'"):
        PatchFeatures(backbone, 1, None, "cosine")
    for bad in (0.0, 1.0, -0.5, 2.0, float("nan")):
        with pytest.raises(ConfigError, match="norm_power"):
            DetectorConfig.from_dict({"features": {"normalize": "power", "norm_power": bad}})


@pytest.mark.parametrize("normalize", ["none", "power"])
def test_balancing_gives_every_layer_one_mean_norm_at_the_layers_scale(
    fitted: Detector, normalize: str
) -> None:
    backbone = fitted.features.backbone
    batches = []
    for seed in (1, 2):
        shallow, deep = backbone(fitted.preprocessor(texture_crops(4, seed=seed)))
        # On brick both layers happen to have one mean norm; on a product they need not.
        batches.append([shallow, 6.0 * deep])
    raw = PatchFeatures(backbone, 1, None, normalize)
    before = np.array([_layer_norms(raw, b) for b in batches]).mean(axis=0)
    assert before.max() / before.min() > 2.0
    weights = balancing_weights(raw, batches)
    after = np.array(
        [_layer_norms(PatchFeatures(backbone, 1, None, normalize, layer_weights=weights), b)
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
    assert balancing_weights(raw, [[shallow, torch.zeros_like(deep)]]) == [1.0, 1.0]
    # A layer a million times weaker gets weights within the bounds, which the config accepts.
    weights = balancing_weights(raw, [[shallow, 1e-6 * deep]])
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
    assert selection["chosen"] in NORMALIZE
    weights = balanced.config.features.layer_weights
    assert weights is not None and len(weights) == 2 and weights[0] != weights[1]
    assert balanced.config.features.normalize == NORMALIZE[selection["chosen"]]
    assert balanced.features.normalize == NORMALIZE[selection["chosen"]]
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
