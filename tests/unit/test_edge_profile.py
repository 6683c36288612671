"""The edge profile: outer patches of the grid scored on the inner ones' scale.

Learned from good images' leave-one-out patch scores, applied before upsampling (so maps,
image scores, leave-one-out maxima and the export agree), saved with the model, and a defect at
the edge of a real texture still stands out.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import FAST_CONFIG, texture_crops
from _models import fast_train_images

from defectscope import Detector
from defectscope.config import ScoringConfig
from defectscope.detector.edge_profile import (
    RINGS,
    EdgeProfile,
    edge_profile_summary,
    learn_edge_profile,
    ring_index,
)
from defectscope.detector.scoring import AnomalyScorer
from defectscope.errors import ConfigError, ModelFileError


def test_ring_index_counts_patches_to_the_nearest_edge() -> None:
    rings = ring_index(5, 7, rings=2)
    expected = torch.tensor(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 1, 2, 2, 2, 1, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(rings, expected)


def scores_with_heavy_edges(edge_scale: float, n: int = 200, seed: int = 0) -> torch.Tensor:
    """(n, 16, 16) good patch scores around 1.0 whose outer ring deviates ``edge_scale``
    times as much as the rest."""
    generator = torch.Generator().manual_seed(seed)
    scores = 1.0 + 0.1 * torch.randn(n, 16, 16, generator=generator).abs()
    outer = ring_index(16, 16) == 0
    scores[:, outer] = 1.0 + (scores[:, outer] - 1.0) * edge_scale
    return scores


def test_a_heavier_tail_at_the_edge_is_measured_and_the_inside_is_not_scaled() -> None:
    profile = learn_edge_profile(scores_with_heavy_edges(2.0))
    assert profile is not None and len(profile.factors) == RINGS
    # The excess over the inner median doubles at the edge: so does its high quantile's.
    assert profile.factors[0] == pytest.approx(2.0, rel=0.25)
    assert all(f == pytest.approx(1.0, abs=0.2) for f in profile.factors[1:])
    inner = scores_with_heavy_edges(2.0)[:, RINGS:-RINGS, RINGS:-RINGS]
    assert profile.centre == pytest.approx(float(inner.median()), abs=1e-6)


def test_factors_never_rise_inwards() -> None:
    # A heavier ring inside a quiet edge is the product's structure, not the padding.
    scores = scores_with_heavy_edges(1.0)
    second = ring_index(16, 16) == 2
    scores[:, second] = 1.0 + (scores[:, second] - 1.0) * 3.0
    profile = learn_edge_profile(scores)
    assert profile is not None
    assert profile.factors[0] == pytest.approx(1.0, abs=0.2)
    assert list(profile.factors) == sorted(profile.factors, reverse=True)
    assert profile.factors[2] <= profile.factors[0]


def test_an_edge_quieter_than_the_inside_is_left_as_it_is() -> None:
    # Bottle's dark background: the edge scores lower; dividing by < 1 would raise it.
    profile = learn_edge_profile(scores_with_heavy_edges(0.3))
    assert profile is not None and profile.factors[0] == 1.0


@pytest.mark.parametrize(
    "scores",
    [
        torch.ones(10, 16, 16),  # no spread inside: no unit to compare with
        torch.rand(10, 15, 40),  # too few inner patches: under half of a side
        torch.rand(0, 16, 16),
        torch.empty(0, 0, 0),  # no calibration image at all: the calibration says why
    ],
    ids=["constant", "small-grid", "no-images", "no-grid"],
)
def test_no_profile_where_there_is_nothing_to_compare(scores: torch.Tensor) -> None:
    assert learn_edge_profile(scores) is None


def scorer(groups=None) -> AnomalyScorer:
    bank = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    weights = [1.0, 1.0] if groups else None
    return AnomalyScorer(bank, ScoringConfig(), (64, 64), groups, weights)


def test_correction_divides_each_edge_patch_excess_by_its_ring_factor() -> None:
    one = scorer()
    scores = torch.full((1, 12, 12), 3.0)
    assert one.correct_edges(scores) is scores  # no profile: untouched
    one.set_edge_profile(EdgeProfile((2.0, 1.5, 1.0, 1.0), centre=1.0))
    corrected = one.correct_edges(scores)
    rings = ring_index(12, 12)
    assert torch.all(corrected[0][rings == 0] == 2.0)  # 1 + (3 - 1) / 2
    assert torch.allclose(corrected[0][rings == 1], torch.tensor(1.0 + 2.0 / 1.5))
    assert torch.all(corrected[0][rings >= 2] == 3.0)
    one.set_edge_profile(None)
    assert torch.equal(one.correct_edges(scores), scores)


def test_a_bank_of_passes_takes_no_profile() -> None:
    passes = scorer(groups=[(0, 2), (2, 4)])
    with pytest.raises(ConfigError, match="one pass"):
        passes.set_edge_profile(EdgeProfile((2.0,), 1.0))
    with pytest.raises(ConfigError, match="one pass"):  # nor learns one
        passes.patch_scores_excluding(torch.randn(1, 4, 3, 3), [torch.tensor([0])])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("edges", "malformed"),
        ({"factors": [2.0]}, "malformed"),
        ({"factors": ["x"], "centre": 1.0}, "malformed"),
        ({"factors": [0.5], "centre": 1.0}, "factors are invalid"),
        ({"factors": [], "centre": 1.0}, "factors are invalid"),
        ({"factors": [math.inf], "centre": 1.0}, "factors are invalid"),
        ({"factors": [1.5], "centre": math.nan}, "centre is invalid"),
    ],
)
def test_a_malformed_saved_profile_is_a_clear_model_file_error(data, message: str) -> None:
    with pytest.raises(ModelFileError, match=f"model.safetensors: its edge profile.*{message}"):
        EdgeProfile.from_dict(data, "model.safetensors")


def test_a_saved_profile_reads_back_and_none_means_none() -> None:
    profile = EdgeProfile((1.8, 1.2, 1.0, 1.0), 0.75)
    assert EdgeProfile.from_dict(profile.to_dict()) == profile
    assert EdgeProfile.from_dict(None) is None


def test_the_summary_names_each_bank_profile_in_one_line() -> None:
    full = {"factors": [1.936, 1.46, 1.0, 1.0], "centre": 0.35}
    half = {"factors": [1.57, 1.26, 1.17, 1.12], "centre": 0.31}
    assert edge_profile_summary(full, half) == (
        "outer rings' excess over the inner median divided by 1.94, 1.46, 1.00, 1.00; "
        "half-size bank 1.57, 1.26, 1.17, 1.12"
    )
    assert edge_profile_summary(None, half) is not None
    assert edge_profile_summary(None, None) is None


# ------------------------------------------------------------------ a fitted model (real weights)
def test_the_fit_learns_a_profile_and_the_model_file_keeps_it(
    fitted: Detector, texture_model_dir: Path
) -> None:
    profile = fitted.engine.scorer.edge_profile  # type: ignore[union-attr]
    assert profile is not None and all(f >= 1.0 for f in profile.factors)
    assert fitted.describe()["edge_profile"] == profile.to_dict()
    loaded = Detector.load(texture_model_dir)
    assert loaded.engine.scorer.edge_profile == profile  # type: ignore[union-attr]
    probes = texture_crops(2, seed=41)
    for ref, got in zip(fitted.predict(probes), loaded.predict(probes), strict=True):
        assert got.score == pytest.approx(ref.score, rel=1e-6)


def test_a_defect_at_the_edge_of_a_texture_still_stands_out(fitted: Detector) -> None:
    good = texture_crops(1, seed=43)[0]
    bad = good.copy()
    mask = np.zeros(good.shape[:2], bool)
    mask[:10, 50:80] = True  # a stain along the border, touching the image's edge
    bad[mask] = (220, 30, 30)
    good_prediction, bad_prediction = fitted.predict([good, bad])
    assert bad_prediction.score > fitted.threshold > good_prediction.score
    peak = np.unravel_index(np.argmax(bad_prediction.anomaly_map), mask.shape)
    assert peak[0] < 20 and 40 <= peak[1] < 90


def test_edge_correction_off_fits_without_a_profile() -> None:
    config = copy.deepcopy(FAST_CONFIG)
    config["scoring"] = {"edge_correction": False}
    config["features"] = {**config["features"], "half_size_bank": 0}
    detector = Detector(config).fit(fast_train_images())
    assert detector.engine.scorer.edge_profile is None  # type: ignore[union-attr]
    assert "edge_profile" not in detector.describe()
