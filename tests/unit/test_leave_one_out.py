"""Batched leave-one-out calibration equals one banned search per image, its stand-ins bring
good scores to those of new images, and the matrix form of the maps equals interpolation then
blur."""

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
from defectscope.detector import fitting
from defectscope.detector.knn import GroupExclusion, TorchKnn
from defectscope.detector.leave_one_out import StandIns, find_stand_ins, own_rows_and_stand_ins
from defectscope.detector.scoring import AnomalyScorer, gaussian_blur, merge_extra_rows

TRAIN = texture_crops(12, seed=3)
HELD_OUT = texture_crops(40, seed=11)


def per_image_reference(
    scorer: AnomalyScorer,
    embeddings: torch.Tensor,
    own: Sequence[torch.Tensor],
    extra: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, None]:
    """The exact path the batched one replaces: one ``banned`` search per image, on a bank
    whose own rows are overwritten by their stand-ins (banned where they have none); one pass,
    so no per-pass scores."""
    maps, scores = [], []
    for row, columns in enumerate(own):
        banned = torch.zeros(scorer.bank.shape[0], dtype=torch.bool)
        banned[columns] = True
        one = scorer
        if extra is not None and extra[row][0].shape[0]:
            rows, reported = extra[row]
            bank = scorer.bank.clone()
            bank[reported] = rows
            banned[reported] = False
            one = AnomalyScorer(bank, scorer.config, scorer.input_size)
            one.set_edge_profile(scorer.edge_profile)  # learned before the calibration
        one_map, one_score = one(embeddings[row : row + 1], banned=banned)
        maps.append(one_map)
        scores.append(one_score)
    return torch.cat(maps), torch.cat(scores), None


def no_stand_ins(bank: torch.Tensor, *args: object) -> StandIns:
    return StandIns(bank.clone(), torch.zeros(bank.shape[0], dtype=torch.bool))


def fit(
    monkeypatch: pytest.MonkeyPatch,
    reference: bool,
    scoring: dict | None = None,
    stand_ins: bool = True,
) -> Detector:
    config = copy.deepcopy(FAST_CONFIG)
    config["batch_size"] = 5  # batches that do not divide the 12 images
    config["auto"] = {"enabled": False}
    config["scoring"] = scoring or {}
    with monkeypatch.context() as patch:
        if reference:
            patch.setattr(AnomalyScorer, "score_excluding_by_pass", per_image_reference)
        if not stand_ins:
            patch.setattr(fitting, "find_stand_ins", no_stand_ins)
        return Detector(config).fit(TRAIN)


@pytest.mark.parametrize(
    ("scoring", "stand_ins"),
    [
        ({}, True),
        ({"k": 3, "chunk_size": 100}, True),
        # PatchCore's re-weighting reads the bank around the row found: a stand-in is reported
        # as the row it replaces, so the in-place reference differs there; checked without.
        ({"k": 3, "reduction": "patchcore", "chunk_size": 100}, False),
    ],
)
def test_batched_calibration_equals_per_image_banned_search(
    monkeypatch: pytest.MonkeyPatch, scoring: dict, stand_ins: bool
) -> None:
    fast = fit(monkeypatch, reference=False, scoring=scoring, stand_ins=stand_ins)
    exact = fit(monkeypatch, reference=True, scoring=scoring, stand_ins=stand_ins)
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
    detector = fit(monkeypatch, reference=False, stand_ins=False)
    # In-sample, a training image finds its own patches (some at distance 0); left out, never.
    in_sample = np.array([p.score for p in detector.predict(TRAIN)])
    assert (np.asarray(detector.calibration.good_scores) >= in_sample - 1e-4).all()
    assert np.asarray(detector.calibration.good_scores).mean() > in_sample.mean()


def test_stand_ins_lower_leave_one_out_scores_but_stay_out_of_sample(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each fit would learn its own edge profile from its own scores: compared without one.
    scoring = {"edge_correction": False}
    plain = fit(monkeypatch, reference=False, scoring=scoring, stand_ins=False)
    fitted = fit(monkeypatch, reference=False, scoring=scoring)
    assert torch.equal(plain.memory_bank, fitted.memory_bank)
    plain_scores = np.asarray(plain.calibration.good_scores)
    scores = np.asarray(fitted.calibration.good_scores)
    # Stand-ins only add rows to what each image searches: never a higher score.
    assert (scores <= plain_scores + 1e-4).all()
    assert scores.mean() < plain_scores.mean()
    in_sample = np.array([p.score for p in fitted.predict(TRAIN)])
    assert scores.mean() > in_sample.mean()
    # That they match new good images is measured on real ones: tests/unit/test_drift.py.


def test_stand_in_is_the_nearest_pool_row_of_another_image() -> None:
    bank = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    bank_owner = torch.tensor([0, 1, 2])
    pool = torch.tensor([[0.5, 0.0], [1.0, 0.0], [10.2, 0.0], [50.0, 0.0]])
    pool_owner = torch.tensor([0, 3, 1, 3])
    rows, valid = find_stand_ins(bank, bank_owner, pool, pool_owner, chunk_size=2)
    # Row 0: its own image's (0.5, 0) is skipped for (1, 0); row 1 likewise for (1, 0);
    # row 2: the nearest of another image is (10.2, 0), far, but the best there is.
    torch.testing.assert_close(rows, torch.tensor([[1.0, 0.0], [1.0, 0.0], [10.2, 0.0]]))
    assert valid.all()
    # No other image in the pool: no stand-in, the row itself is kept as a placeholder.
    rows, valid = find_stand_ins(bank[:1], bank_owner[:1], pool[:1], pool_owner[:1])
    assert not valid.any() and torch.equal(rows, bank[:1])
    own, extra = own_rows_and_stand_ins([0, 5], bank_owner, StandIns(rows, valid))
    assert own[0].tolist() == [0] and own[1].numel() == 0
    assert extra is not None and extra[0][0].shape == (0, 2)


def test_merged_extra_rows_give_the_k_nearest_of_both() -> None:
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(30, 4, generator=generator)
    queries = torch.randn(10, 4, generator=generator)  # 2 groups of 5
    extra_rows = torch.randn(6, 4, generator=generator)
    own = [torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long)]
    dist, idx = TorchKnn(bank).search(queries, 3, exclude=GroupExclusion(5, own))
    extra = [(extra_rows[:4], torch.tensor([0, 1, 2, 0])), (extra_rows[4:], torch.tensor([7, 8]))]
    merged, names = merge_extra_rows(queries, dist, idx, 5, extra)
    for group, (rows, reported) in enumerate(extra):
        span = slice(group * 5, group * 5 + 5)
        keep = torch.ones(30, dtype=torch.bool)
        keep[own[group]] = False
        candidates = torch.cat([bank[keep], rows])
        labels = torch.cat([torch.nonzero(keep).flatten(), reported])
        full = torch.cdist(queries[span], candidates)
        best = full.topk(3, dim=1, largest=False).indices
        torch.testing.assert_close(merged[span], full.gather(1, best), atol=1e-4, rtol=1e-4)
        assert torch.equal(names[span], labels[best])


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
