"""The half-scale pass (`features.half_scale`): the backbone also sees the image at half size.

Real EfficientNet-Lite0 weights on brick texture crops: the extra layers are exactly the
backbone's maps of the 2x2-averaged input, the model saves, loads and exports with them, and
models written before the option existed load as single-scale ones.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _cli import run_cli
from _images import FAST_CONFIG, texture_crops, with_defect
from _models import fast_train_images, rewritten_model
from PIL import Image

from defectscope import Detector
from defectscope.config import BackboneConfig, FeatureConfig, ScoringConfig
from defectscope.detector.calibration import spread_quantile
from defectscope.detector.fitting import weigh_passes
from defectscope.detector.model_file import config_from_metadata, read_header, resolve_model_path
from defectscope.detector.parts import FeatureParts
from defectscope.detector.scoring import AnomalyScorer, group_weights, sum_passes
from defectscope.detector.teaching import extend_bank
from defectscope.errors import ConfigError, ModelFileError
from defectscope.features.backbones import create_backbone

HALF_CONFIG = {
    **FAST_CONFIG,
    "features": {**FAST_CONFIG["features"], "half_scale": True},
    # A fixed feature configuration: the half-scale layers are under test, not the choice.
    "auto": {"enabled": False},
}


@pytest.fixture(scope="module")
def half() -> Detector:
    return Detector(copy.deepcopy(HALF_CONFIG)).fit(fast_train_images())


@pytest.fixture(scope="module")
def probes() -> list[np.ndarray]:
    goods = texture_crops(2, seed=21)
    defects = [with_defect(img, seed=s)[0] for s, img in enumerate(texture_crops(2, seed=22))]
    return goods + defects


def test_half_scale_layers_are_the_backbone_maps_of_the_halved_input(half: Detector) -> None:
    features = half.features
    assert features is not None and features.half_scale
    backbone = features.backbone
    batch = torch.rand(2, 3, 128, 96)
    with torch.inference_mode():
        maps = features.layer_maps(batch)
        full = backbone(batch)
        halved = backbone(F.avg_pool2d(batch, 2))
        embeddings = features(batch)
    assert len(maps) == 2 * len(backbone.channels)
    for got, want in zip(maps, [*full, *halved], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert halved[0].shape[-1] == full[0].shape[-1] // 2
    # Every layer is brought to the full-size pass's finest grid, and the width doubles.
    assert embeddings.shape == (2, 2 * sum(backbone.channels), *full[0].shape[-2:])
    assert half.memory_bank.shape[1] == 2 * sum(backbone.channels)


def test_a_pasted_defect_lights_up_where_it_is(half: Detector) -> None:
    image, mask = with_defect(texture_crops(1, seed=31)[0], seed=3)
    [good] = half.predict(texture_crops(1, seed=32))
    [bad] = half.predict(image)
    assert bad.score > half.threshold > good.score
    inside, outside = bad.anomaly_map[mask].mean(), bad.anomaly_map[~mask].mean()
    assert inside > 1.5 * outside
    peak = np.unravel_index(np.argmax(bad.anomaly_map), bad.anomaly_map.shape)
    assert mask[peak]


def test_save_and_load_give_the_same_predictions(half: Detector, probes, tmp_path: Path) -> None:
    path = half.save(tmp_path / "model")
    assert read_header(resolve_model_path(path))["config"]["features"]["half_scale"] is True
    loaded = Detector.load(path)
    assert loaded.features is not None and loaded.features.half_scale
    for ref, got in zip(half.predict(probes), loaded.predict(probes), strict=True):
        assert got.score == pytest.approx(ref.score, rel=1e-6)
        np.testing.assert_allclose(got.anomaly_map, ref.anomaly_map, rtol=1e-5, atol=1e-5)


def test_inspect_and_predict_from_the_cli(half: Detector, tmp_path: Path) -> None:
    model = tmp_path / "model"
    half.save(model)
    image, _ = with_defect(texture_crops(1, seed=51)[0], seed=5)
    Image.fromarray(image).save(tmp_path / "defect.png")
    meta = json.loads(run_cli("inspect", str(model), check=True).stdout)
    assert meta["config"]["features"]["half_scale"] is True
    assert meta["column_groups"]["spans"] == [list(g) for g in half.scorer.groups]
    assert meta["column_groups"]["score_weights"] == half.scorer.score_weights
    run_cli("predict", str(model), str(tmp_path / "defect.png"), "--out", str(tmp_path / "out"),
            "--no-images", check=True)  # fmt: skip
    (row,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert row["score"] == pytest.approx(half.predict(image)[0].score, rel=1e-5)


def test_models_written_before_the_option_are_single_scale(half: Detector, tmp_path) -> None:
    meta = half.describe()
    del meta["config"]["features"]["half_scale"]
    assert config_from_metadata(tmp_path / "old.safetensors", meta).features.half_scale is False


def test_onnx_export_keeps_the_half_scale_pass(half: Detector, probes, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from defectscope.export import export_onnx, load_exported

    runtime = load_exported(export_onnx(half, tmp_path / "half.onnx"))
    for ref, got in zip(half.predict(probes), runtime.predict(probes), strict=True):
        assert got.score == pytest.approx(ref.score, rel=1e-4)
        assert np.abs(got.anomaly_map - ref.anomaly_map).max() <= 1e-3
        assert got.is_anomalous == ref.is_anomalous


def test_a_backbone_that_cannot_take_the_halved_input_is_refused() -> None:
    # A ViT takes multiples of its patch: 240 = 15 x 16 does, its half 120 does not.
    vit = create_backbone(
        BackboneConfig(name="vit_tiny_patch16_224", weights="random", layers=[5, 11])
    )
    FeatureParts.build(vit, FeatureConfig(input_size=(240, 240)), torch.device("cpu"))
    with pytest.raises(ConfigError, match="120x120 is not a multiple of the patch size 16"):
        FeatureParts.build(
            vit, FeatureConfig(input_size=(240, 240), half_scale=True), torch.device("cpu")
        )


# ------------------------------------------------------------------ scoring a bank of two passes
def brute_force(bank, queries, spans, weights, k=1, banned_rows=()):
    """Per pass: the k nearest distances on its columns (rows ``banned_rows`` left out), times its
    weight, summed; then their mean over k (the patch score)."""
    keep = torch.ones(bank.shape[0], dtype=torch.bool)
    keep[list(banned_rows)] = False
    total = 0.0
    for (start, stop), weight in zip(spans, weights, strict=True):
        dist = torch.cdist(queries[:, start:stop].double(), bank[keep][:, start:stop].double())
        total = total + weight * dist.topk(k, dim=1, largest=False).values
    return total.mean(dim=1)


@pytest.mark.parametrize("k", [1, 3])
def test_each_pass_finds_its_own_nearest_patch(k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 6, generator=gen), torch.randn(4 * 5, 6, generator=gen)
    spans, weights = [(0, 4), (4, 6)], [2.0, 0.5]
    scorer = AnomalyScorer(bank, ScoringConfig(k=k, smoothing_sigma=0.0), (4, 5), spans, weights)
    embeddings = queries.reshape(1, 4, 5, 6).permute(0, 3, 1, 2)
    _, passes, _ = scorer.patch_distances(embeddings)
    dist = sum_passes(passes, scorer.group_weights)
    want = brute_force(bank, queries, spans, weights, k)
    torch.testing.assert_close(dist.mean(dim=1).double(), want, rtol=1e-5, atol=1e-5)
    # Not the joint search: the two passes' nearest rows differ for most queries.
    joint = torch.cdist(queries, bank).argmin(dim=1)
    per_pass = [torch.cdist(queries[:, a:b], bank[:, a:b]).argmin(dim=1) for a, b in spans]
    assert (per_pass[0] != per_pass[1]).any() and (joint != per_pass[1]).any()
    # Leave-one-out: an image's own rows are out of every pass's search.
    own = torch.arange(0, 300, 2)
    maps, _ = scorer.score_excluding(embeddings, [own])
    ref = AnomalyScorer(bank, ScoringConfig(k=k, smoothing_sigma=0.0), (4, 5), spans, weights)
    excluded = brute_force(bank, queries, spans, weights, k, own.tolist())
    assert maps.shape == (1, 4, 5)
    torch.testing.assert_close(maps.flatten().double(), excluded, rtol=1e-5, atol=1e-5)
    assert ref.group_weights == weights


def test_a_pass_counts_in_units_of_its_own_gap_between_good_patches() -> None:
    # Rows on a line: 0.5 apart in the first pass's columns, 4.0 apart in the second's.
    steps = torch.arange(200, dtype=torch.float32)[:, None]
    bank = torch.cat([0.5 * steps, torch.zeros(200, 1), 4.0 * steps], dim=1)
    assert group_weights(bank, [(0, 2), (2, 3)]) == pytest.approx([2.0, 0.25])
    # Repeated rows have no gap: their distances count as they are.
    assert group_weights(torch.ones(10, 3), [(0, 1), (1, 3)]) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("spans", "weights", "scoring", "message"),
    [
        ([(0, 3), (4, 6)], None, {}, "do not tile"),
        ([(0, 4), (4, 7)], None, {}, "do not tile"),
        ([(0, 4), (4, 6)], [1.0], {}, "do not fit"),
        ([(0, 4), (4, 6)], [1.0, float("nan")], {}, "do not fit"),
        ([(0, 4), (4, 6)], None, {"reduction": "patchcore"}, "'patchcore'"),
    ],
)
def test_bad_column_groups_are_refused(spans, weights, scoring, message) -> None:
    with pytest.raises(ConfigError, match=message):
        AnomalyScorer(torch.randn(20, 6), ScoringConfig(**scoring), (4, 4), spans, weights)


def test_a_model_whose_column_groups_do_not_match_is_refused(half: Detector, tmp_path) -> None:
    source = tmp_path / "model"
    half.save(source)
    for name, edit in {
        "missing": lambda meta, _: meta.pop("column_groups"),
        "other": lambda meta, _: meta["column_groups"].update(spans=[[0, 10], [10, 304]]),
        "weights": lambda meta, _: meta["column_groups"].update(weights=[1.0, -2.0]),
        "score_weights": lambda meta, _: meta["column_groups"].update(score_weights=[1.0]),
        "score_text": lambda meta, _: meta["column_groups"].update(score_weights="1,2"),
    }.items():
        broken = rewritten_model(source, tmp_path / name, edit)
        with pytest.raises(ModelFileError, match=r"column groups|weights"):
            Detector.load(broken)


def test_teaching_keeps_the_passes_units_of_distance(half: Detector) -> None:
    taught = extend_bank(half, texture_crops(2, seed=41)).detector
    assert taught.scorer is not None and half.scorer is not None
    assert taught.scorer.groups == half.scorer.groups
    assert taught.scorer.group_weights == half.scorer.group_weights
    assert taught.scorer.score_weights == half.scorer.score_weights
    assert taught.memory_bank.shape[0] > half.memory_bank.shape[0]


def test_auto_mode_compares_candidates_on_the_full_size_pass() -> None:
    images = texture_crops(16, seed=4)
    auto = {"candidates": ["l2", "raw"], "min_images": 10, "holdout_images": 4, "bank_images": 10}
    plain = Detector({**FAST_CONFIG, "auto": auto}).prepare(images)
    both = Detector({**HALF_CONFIG, "auto": auto}).prepare(images)
    assert both.chosen == plain.chosen and len(both.candidates) >= 2
    for with_half, without in zip(both.candidates, plain.candidates, strict=True):
        assert with_half["name"] == without["name"]
        assert with_half["objective"] == pytest.approx(without["objective"], abs=1e-6)


# ------------------------------------------------------- the image score of a bank of two passes
def test_the_image_score_adds_each_pass_peak_in_its_units(half: Detector, probes) -> None:
    scorer, features = half.scorer, half.features
    assert scorer is not None and features is not None and scorer.groups is not None
    assert scorer.score_weights is not None and len(scorer.score_weights) == 2
    batch = half._fitted_preprocessor(probes)
    with torch.inference_mode():
        embeddings = half.embed(batch)
        maps, scores = scorer(embeddings)
        peaks = []
        # Each pass alone: a one-pass scorer on that pass's columns of the bank.
        for start, stop in scorer.groups:
            alone = AnomalyScorer(scorer.bank[:, start:stop], scorer.config, scorer.input_size)
            peaks.append(alone(embeddings[:, start:stop])[1])
    weights = scorer.score_weights
    torch.testing.assert_close(scores, weights[0] * peaks[0] + weights[1] * peaks[1])
    # The map stays the passes' distances summed in units of their gaps.
    assert not torch.allclose(scores, maps.flatten(1).amax(1))


def test_each_pass_counts_in_units_of_its_own_threshold_on_good_images() -> None:
    scorer = AnomalyScorer(torch.randn(50, 6), ScoringConfig(), (4, 4), [(0, 4), (4, 6)])
    # The second pass's good scores are 100x the first's: alone it would decide every image.
    first = np.linspace(1.0, 2.0, 101)
    weighed = weigh_passes(scorer, np.stack([first, 100.0 * first]), false_alarm_rate=0.01)
    assert scorer.score_weights == pytest.approx([1 / 1.99, 1 / 199.0])
    assert scorer.group_weights == scorer.score_weights  # the map's units too
    assert weighed is not None
    np.testing.assert_allclose(weighed, 2 * first / 1.99)
    # Good scores of zero (identical images) have no unit: that pass counts as it is.
    weigh_passes(scorer, np.stack([first, np.zeros(101)]), false_alarm_rate=0.01)
    assert scorer.score_weights == pytest.approx([1 / 1.99, 1.0])
    one = AnomalyScorer(torch.randn(50, 6), ScoringConfig(), (4, 4))
    assert weigh_passes(one, None, 0.01) is None and one.score_weights is None


def test_models_written_before_per_pass_image_scores_keep_theirs(half: Detector, tmp_path) -> None:
    source = tmp_path / "model"
    half.save(source)
    old = rewritten_model(
        source, tmp_path / "old", lambda meta, _: meta["column_groups"].pop("score_weights")
    )
    loaded = Detector.load(old)
    assert loaded.scorer is not None and loaded.scorer.score_weights is None
    maps, scores = loaded.score_batch(torch.rand(2, 3, *half.config.features.input_size))
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


@pytest.mark.parametrize(
    ("method", "scoring"),
    [
        ("leave_one_out", {}),  # the module's model: the leave-one-out peaks
        # Not a maximum: leave-one-out scores every patch of every pass.
        ("leave_one_out", {"reduction": "topk_mean"}),
        ("holdout", {}),
        ("in_sample", {}),
    ],
)
def test_every_calibration_weighs_the_passes(
    method: str, scoring: dict, request: pytest.FixtureRequest
) -> None:
    if method == "leave_one_out" and not scoring:
        detector = request.getfixturevalue("half")
    else:
        config = copy.deepcopy(HALF_CONFIG)
        config["calibration"] = {"method": method}
        config["scoring"] = scoring
        detector = Detector(config).fit(fast_train_images())
    scorer, calibration = detector.scorer, detector.calibration
    assert scorer is not None and calibration is not None and scorer.score_weights is not None
    # The stored good scores are the weighed sums: the threshold is their quantile (for
    # leave-one-out, spread wider above their median).
    good = np.asarray(calibration.good_scores)
    q = 1.0 - calibration.false_alarm_rate
    assert calibration.tail_spread == (1.2 if method == "leave_one_out" else 1.0)
    expected = spread_quantile(good, q, calibration.tail_spread)
    assert calibration.threshold == pytest.approx(expected)
    # Each pass's threshold counts 1 (here the highest of a dozen good scores), so the sum's
    # quantile lies between 1 and 2.
    assert 1.0 <= calibration.quantile_thresholds()[0] <= 2.0 + 1e-6
    # The map is in the same units, and its maxima were measured in them.
    assert scorer.group_weights == scorer.score_weights
    assert calibration.pixel_threshold >= 1.0 - 1e-6
    if not scoring:  # image scores are map maxima: no pass's map tops its threshold
        assert calibration.quantile_thresholds()[1] <= 2.0 + 1e-6
