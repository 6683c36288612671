"""Batched leave-one-out calibration equals one banned search per image, and the matrix form
of the maps equals interpolation then blur."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _images import FAST_CONFIG, texture_crops

from defectscope import Detector
from defectscope.config import ScoringConfig
from defectscope.detector.knn import GroupExclusion, TorchKnn
from defectscope.detector.scoring import AnomalyScorer, gaussian_blur

TRAIN = texture_crops(12, seed=3)
HELD_OUT = texture_crops(40, seed=11)


def per_image_reference(
    scorer: AnomalyScorer, embeddings: torch.Tensor, own: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact path the batched one replaces: one ``banned`` search per image."""
    maps, scores = [], []
    for row, columns in enumerate(own):
        banned = torch.zeros(scorer.bank.shape[0], dtype=torch.bool)
        banned[columns] = True
        one_map, one_score = scorer(embeddings[row : row + 1], banned=banned)
        maps.append(one_map)
        scores.append(one_score)
    return torch.cat(maps), torch.cat(scores)


def fit(monkeypatch: pytest.MonkeyPatch, reference: bool, scoring: dict | None = None) -> Detector:
    config = copy.deepcopy(FAST_CONFIG)
    config["batch_size"] = 5  # batches that do not divide the 12 images
    config["auto"] = {"enabled": False}
    config["scoring"] = scoring or {}
    with monkeypatch.context() as patch:
        if reference:
            patch.setattr(AnomalyScorer, "score_excluding", per_image_reference)
        return Detector(config).fit(TRAIN)


@pytest.mark.parametrize(
    "scoring",
    [{}, {"k": 3, "reduction": "patchcore", "chunk_size": 100}],
)
def test_batched_calibration_equals_per_image_banned_search(
    monkeypatch: pytest.MonkeyPatch, scoring: dict
) -> None:
    fast = fit(monkeypatch, reference=False, scoring=scoring)
    exact = fit(monkeypatch, reference=True, scoring=scoring)
    assert torch.equal(fast.memory_bank, exact.memory_bank)
    np.testing.assert_allclose(
        fast.calibration.good_scores, exact.calibration.good_scores, rtol=1e-5
    )
    np.testing.assert_allclose(
        fast.calibration.good_pixel_maxima, exact.calibration.good_pixel_maxima, rtol=1e-5
    )
    assert fast.threshold == pytest.approx(exact.threshold, rel=1e-5)
    assert fast.pixel_threshold == pytest.approx(exact.pixel_threshold, rel=1e-5)
    # Same thresholds, same decisions on good images the fit never saw.
    fast_alarms = [p.is_anomalous for p in fast.predict(HELD_OUT)]
    exact_alarms = [p.is_anomalous for p in exact.predict(HELD_OUT)]
    assert fast_alarms == exact_alarms


def test_leave_one_out_scores_are_out_of_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    detector = fit(monkeypatch, reference=False)
    # In-sample, a training image finds its own patches (some at distance 0); left out, never.
    in_sample = np.array([p.score for p in detector.predict(TRAIN)])
    assert (np.asarray(detector.calibration.good_scores) >= in_sample - 1e-4).all()
    assert np.asarray(detector.calibration.good_scores).mean() > in_sample.mean()


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 50, 4096])
def test_group_exclusion_equals_banned_search_per_group(chunk_size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(60, 8, generator=generator)
    owner = torch.randint(0, 4, (60,), generator=generator)
    queries = bank[torch.randperm(60, generator=generator)[:48]] + 0.01  # 4 groups of 12
    own = [(owner == g).nonzero().flatten() for g in range(4)]
    own[2] = own[2][:0]  # a group that owns no bank row
    knn = TorchKnn(bank, chunk_size=chunk_size)
    dist, idx = knn.search(queries, 3, exclude=GroupExclusion(12, own))
    for g in range(4):
        banned = torch.zeros(60, dtype=torch.bool)
        banned[own[g]] = True
        ref_dist, ref_idx = TorchKnn(bank).search(queries[g * 12 : (g + 1) * 12], 3, banned)
        # Chunks of other sizes round the expanded distance formula differently.
        torch.testing.assert_close(dist[g * 12 : (g + 1) * 12], ref_dist, atol=1e-4, rtol=1e-4)
        assert torch.equal(idx[g * 12 : (g + 1) * 12], ref_idx)
        assert not torch.isin(idx[g * 12 : (g + 1) * 12], own[g]).any()


@pytest.mark.parametrize(
    ("size", "grid", "sigma"),
    [
        ((64, 64), (8, 8), 4.0),
        ((16, 24), (2, 3), 4.0),
        ((30, 20), (7, 5), 1.5),
        ((8, 8), (2, 2), 0),
    ],
)
def test_matrix_maps_equal_interpolation_then_blur(
    size: tuple[int, int], grid: tuple[int, int], sigma: float
) -> None:
    scorer = AnomalyScorer(torch.zeros(2, 3), ScoringConfig(smoothing_sigma=sigma), size)
    patch_scores = torch.rand(3, *grid, generator=torch.Generator().manual_seed(1)) * 10
    expected = F.interpolate(
        patch_scores[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0]
    if sigma > 0:
        expected = gaussian_blur(expected, scorer.blur_kernel)
    torch.testing.assert_close(scorer.to_input_maps(patch_scores), expected, atol=1e-5, rtol=1e-5)
