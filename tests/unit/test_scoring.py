"""Scoring: Gaussian smoothing, patch distances, maps at input size and image-score reductions."""

from __future__ import annotations

import math

import pytest
import torch

from defectscope.config import ScoringConfig
from defectscope.detector.knn import TorchKnn, faiss_available
from defectscope.detector.scoring import AnomalyScorer, gaussian_blur, gaussian_kernel1d


def config(**kwargs: object) -> ScoringConfig:
    base = {"smoothing_sigma": 0.0, "knn_backend": "torch"}
    return ScoringConfig(**{**base, **kwargs})


def grid(vectors: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(h*w, D) row-major patch vectors -> embeddings (1, D, h, w)."""
    return vectors.reshape(h, w, -1).permute(2, 0, 1)[None].contiguous()


def reference_patchcore(
    queries: torch.Tensor, bank: torch.Tensor, support: int
) -> tuple[float, float]:
    """PatchCore eq. 7 in float64 with cdist: (weighted score, plain max patch score)."""
    q, b = queries.double(), bank.double()
    dist = torch.cdist(q, b)
    nearest_dist, nearest = dist.min(dim=1)
    top = int(nearest_dist.argmax())
    s_star = float(nearest_dist[top])
    m_star = int(nearest[top])
    neighbours = torch.cdist(b[m_star : m_star + 1], b)[0].topk(support, largest=False).indices
    assert int(neighbours[0]) == m_star
    d = torch.cdist(q[top : top + 1], b[neighbours])[0]
    weight = 1.0 - float(torch.exp(d[0]) / torch.exp(d).sum())
    return weight * s_star, s_star


# ------------------------------------------------------------------ kernel, blur


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5, 4.0, 7.3])
def test_kernel_sums_to_one_and_is_symmetric(sigma: float) -> None:
    kernel = gaussian_kernel1d(sigma)
    radius = max(1, int(4.0 * sigma + 0.5))
    assert kernel.shape == (2 * radius + 1,)
    assert kernel.dtype == torch.float32
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(kernel, kernel.flip(0))
    assert int(kernel.argmax()) == radius
    assert (kernel[: radius + 1].diff() > 0).all()  # rising to the centre
    # Shape: ratio between neighbours follows exp(-x^2 / 2 sigma^2).
    ratio = float(kernel[radius + 1] / kernel[radius])
    assert ratio == pytest.approx(math.exp(-0.5 / sigma**2), rel=1e-5)


def test_kernel_sigma_4_has_radius_16() -> None:
    assert gaussian_kernel1d(4.0).numel() == 33


@pytest.mark.parametrize("shape", [(1, 40, 40), (2, 9, 30), (1, 3, 3), (1, 1, 5)])
def test_blur_preserves_constant(shape: tuple[int, int, int]) -> None:
    maps = torch.full(shape, 2.5)
    out = gaussian_blur(maps, gaussian_kernel1d(2.0))
    assert out.shape == shape
    torch.testing.assert_close(out, maps)


def test_blur_spreads_a_delta_symmetrically() -> None:
    kernel = gaussian_kernel1d(1.5)
    maps = torch.zeros(1, 31, 31)
    maps[0, 15, 15] = 1.0
    out = gaussian_blur(maps, kernel)[0]
    torch.testing.assert_close(out, out.flip(0))
    torch.testing.assert_close(out, out.flip(1))
    torch.testing.assert_close(out, out.T)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert int(out.argmax()) == 15 * 31 + 15
    radius = kernel.numel() // 2
    expected = torch.outer(kernel, kernel)
    torch.testing.assert_close(
        out[15 - radius : 15 + radius + 1, 15 - radius : 15 + radius + 1], expected
    )


def test_blur_batch_items_independent() -> None:
    kernel = gaussian_kernel1d(1.0)
    a = torch.rand(1, 12, 12)
    b = torch.rand(1, 12, 12)
    both = gaussian_blur(torch.cat([a, b]), kernel)
    torch.testing.assert_close(both[0:1], gaussian_blur(a, kernel))
    torch.testing.assert_close(both[1:2], gaussian_blur(b, kernel))


# ------------------------------------------------------------- AnomalyScorer


def test_embeddings_in_the_bank_score_zero() -> None:
    generator = torch.Generator().manual_seed(0)
    patches = torch.randn(6, 8, generator=generator)
    others = torch.randn(10, 8, generator=generator) + 5.0
    bank = torch.cat([others[:5], patches, others[5:]])
    scorer = AnomalyScorer(bank, config(), (16, 24))
    maps, scores = scorer(grid(patches, 2, 3))
    assert maps.shape == (1, 16, 24)
    assert scores.shape == (1,)
    assert float(maps.abs().max()) < 1e-2
    assert float(scores[0]) < 1e-2


def test_far_embedding_scores_its_euclidean_distance() -> None:
    bank = torch.zeros(3, 4)
    bank[1] = 100.0
    bank[2] = -100.0
    embedding = torch.tensor([3.0, 4.0, 0.0, 0.0]).view(1, 4, 1, 1)
    scorer = AnomalyScorer(bank, config(), (20, 30))
    maps, scores = scorer(embedding)
    assert maps.shape == (1, 20, 30)
    torch.testing.assert_close(maps, torch.full((1, 20, 30), 5.0))
    assert float(scores[0]) == pytest.approx(5.0, rel=1e-5)


def test_k_nearest_are_averaged() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [0.0, -40.0]])
    embedding = torch.zeros(1, 2, 1, 1)
    for k, expected in [(1, 1.0), (2, 1.5), (3, 2.0), (4, 11.5), (10, 11.5)]:
        _, scores = AnomalyScorer(bank, config(k=k), (8, 8))(embedding)
        assert float(scores[0]) == pytest.approx(expected, rel=1e-5), k


def test_map_is_upsampled_patch_distances() -> None:
    bank = torch.zeros(1, 2)
    patches = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [0.0, 1.0]])  # 0, 5, 10, 1
    scorer = AnomalyScorer(bank, config(), (8, 8))
    maps, scores = scorer(grid(patches, 2, 2))
    expected = torch.nn.functional.interpolate(
        torch.tensor([[[[0.0, 5.0], [10.0, 1.0]]]]),
        size=(8, 8),
        mode="bilinear",
        align_corners=False,
    )[0]
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=1e-5)
    # Corners keep the patch values; the max reduction takes the hottest patch.
    assert float(maps[0, 0, 0]) == pytest.approx(0.0, abs=1e-4)
    assert float(maps[0, 0, -1]) == pytest.approx(5.0, rel=1e-5)
    assert float(maps[0, -1, 0]) == pytest.approx(10.0, rel=1e-5)
    assert float(maps[0, -1, -1]) == pytest.approx(1.0, rel=1e-5)
    assert float(scores[0]) == pytest.approx(10.0, rel=1e-5)


def test_patch_distances_layout() -> None:
    bank = torch.zeros(1, 2)
    patches = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [5.0, 0.0], [6.0, 0.0]])
    scorer = AnomalyScorer(bank, config(), (8, 8))
    queries, (dist,), idx = scorer.patch_distances(grid(patches, 2, 3))
    assert queries.shape == (6, 2)
    torch.testing.assert_close(queries, patches)  # row-major over (h, w)
    torch.testing.assert_close(dist[:, 0], torch.arange(1.0, 7.0))
    assert (idx == 0).all()


def test_batch_items_are_scored_independently() -> None:
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(40, 6, generator=generator)
    embeddings = torch.randn(3, 6, 4, 4, generator=generator)
    scorer = AnomalyScorer(bank, config(smoothing_sigma=2.0), (16, 16))
    maps, scores = scorer(embeddings)
    for i in range(3):
        one_map, one_score = scorer(embeddings[i : i + 1])
        torch.testing.assert_close(maps[i : i + 1], one_map)
        torch.testing.assert_close(scores[i : i + 1], one_score)


def test_smoothing_keeps_constant_map_and_lowers_peaks() -> None:
    bank = torch.zeros(1, 1)
    flat = torch.full((1, 1, 4, 4), 2.0)
    smooth = AnomalyScorer(bank, config(smoothing_sigma=4.0), (32, 32))
    assert smooth.blur_kernel.numel() == 33
    maps, _ = smooth(flat)
    torch.testing.assert_close(maps, torch.full((1, 32, 32), 2.0))
    spike = torch.zeros(1, 1, 4, 4)
    spike[0, 0, 1, 2] = 10.0
    _, sharp_score = AnomalyScorer(bank, config(smoothing_sigma=0.0), (32, 32))(spike)
    _, smooth_score = smooth(spike)
    assert 0.0 < float(smooth_score[0]) < float(sharp_score[0])


def test_no_smoothing_has_trivial_kernel() -> None:
    scorer = AnomalyScorer(torch.zeros(2, 2), config(smoothing_sigma=0.0), (8, 8))
    assert scorer.blur_kernel.numel() == 1


def test_bank_is_a_float_buffer() -> None:
    scorer = AnomalyScorer(torch.zeros(3, 2, dtype=torch.float64), config(), (8, 8))
    assert scorer.bank.dtype == torch.float32
    assert "bank" in dict(scorer.named_buffers())
    assert "bank" in scorer.state_dict()


def test_index_is_rebuilt_after_to() -> None:
    scorer = AnomalyScorer(torch.zeros(3, 2), config(), (8, 8))
    first = scorer.index
    assert isinstance(first, TorchKnn)
    assert scorer.index is first  # cached
    scorer.to("cpu")
    assert scorer.index is not first


# ------------------------------------------------------------------ reductions


def scored_maps(reduction: str, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    bank = torch.randn(30, 5, generator=generator)
    embeddings = torch.randn(2, 5, 3, 3, generator=generator) * 2.0
    scorer = AnomalyScorer(bank, config(reduction=reduction, **kwargs), (12, 12))
    return scorer(embeddings)


def test_reduction_max() -> None:
    maps, scores = scored_maps("max")
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_reduction_topk_mean(fraction: float) -> None:
    maps, scores = scored_maps("topk_mean", topk_fraction=fraction)
    k = max(1, math.ceil(fraction * 144))
    for i in range(2):
        values = sorted(maps[i].flatten().tolist(), reverse=True)[:k]
        assert float(scores[i]) == pytest.approx(sum(values) / k, rel=1e-5)
    max_scores = maps.flatten(1).amax(dim=1)
    assert (scores <= max_scores + 1e-6).all()


def test_reduction_topk_mean_whole_map_is_mean() -> None:
    maps, scores = scored_maps("topk_mean", topk_fraction=1.0)
    torch.testing.assert_close(scores, maps.flatten(1).mean(dim=1))


def test_reduction_topk_mean_tiny_fraction_is_max() -> None:
    maps, scores = scored_maps("topk_mean", topk_fraction=1e-6)  # ceil -> one pixel
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))


@pytest.mark.parametrize("neighbours", [2, 3, 8])
def test_reduction_patchcore_matches_reference(neighbours: int) -> None:
    generator = torch.Generator().manual_seed(3)
    bank = torch.randn(25, 4, generator=generator)
    embeddings = torch.randn(2, 4, 3, 3, generator=generator) * 1.5
    scorer = AnomalyScorer(
        bank, config(reduction="patchcore", reweight_neighbours=neighbours), (9, 9)
    )
    _, scores = scorer(embeddings)
    for i in range(2):
        queries = embeddings[i].permute(1, 2, 0).reshape(9, 4)
        expected, s_star = reference_patchcore(queries, bank, neighbours)
        assert float(scores[i]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert float(scores[i]) <= s_star + 1e-5
        weight = float(scores[i]) / s_star
        assert 0.0 < weight <= 1.0
        # m* is the query's nearest bank patch, so d[0] is the smallest support distance: its
        # softmax share exp(d0) / sum(exp(d)) is at most 1/b and the weight at least 1 - 1/b.
        assert weight >= 1.0 - 1.0 / neighbours - 1e-6


def test_reduction_patchcore_not_above_plain_max() -> None:
    generator = torch.Generator().manual_seed(4)
    bank = torch.randn(50, 6, generator=generator)
    embeddings = torch.randn(4, 6, 4, 4, generator=generator) * 3.0
    common = {"smoothing_sigma": 0.0}
    _, weighted = AnomalyScorer(bank, config(reduction="patchcore", **common), (4, 4))(embeddings)
    _, plain = AnomalyScorer(bank, config(reduction="max", **common), (4, 4))(embeddings)
    # With the map at the grid size and no blur, 'max' is the max patch score exactly.
    assert (weighted > 0).all()
    assert (weighted <= plain + 1e-5).all()


def test_patchcore_with_one_support_patch_is_not_degenerate() -> None:
    try:
        cfg = config(reduction="patchcore", reweight_neighbours=1)
    except ValueError:
        return  # refused by the config: fine
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    embedding = torch.tensor([5.0, 0.0]).view(1, 2, 1, 1)
    _, scores = AnomalyScorer(bank, cfg, (4, 4))(embedding)
    assert float(scores[0]) > 0.0


def test_reweight_neighbours_clamped_to_bank_size() -> None:
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    embedding = torch.tensor([5.0, 0.0]).view(1, 2, 1, 1)
    scorer = AnomalyScorer(bank, config(reduction="patchcore", reweight_neighbours=10), (4, 4))
    _, scores = scorer(embedding)
    expected, _ = reference_patchcore(embedding.view(1, 2), bank, 2)
    assert float(scores[0]) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- banned


def test_banned_rows_change_the_score() -> None:
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0], [30.0, 40.0]])
    embedding = torch.zeros(1, 2, 1, 1)
    scorer = AnomalyScorer(bank, config(), (4, 4))
    _, plain = scorer(embedding)
    assert float(plain[0]) == pytest.approx(0.0, abs=1e-6)
    banned = torch.tensor([True, False, False])
    _, without_self = scorer(embedding, banned=banned)
    assert float(without_self[0]) == pytest.approx(5.0, rel=1e-5)
    _, only_far = scorer(embedding, banned=torch.tensor([True, True, False]))
    assert float(only_far[0]) == pytest.approx(50.0, rel=1e-5)
    _, none_banned = scorer(embedding, banned=torch.zeros(3, dtype=torch.bool))
    assert float(none_banned[0]) == pytest.approx(0.0, abs=1e-6)


def test_banned_equals_scoring_against_reduced_bank() -> None:
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(40, 6, generator=generator)
    embeddings = torch.randn(1, 6, 3, 3, generator=generator)
    banned = torch.zeros(40, dtype=torch.bool)
    banned[10:25] = True
    cfg = config(smoothing_sigma=1.0, k=2)
    maps, scores = AnomalyScorer(bank, cfg, (12, 12))(embeddings, banned=banned)
    ref_maps, ref_scores = AnomalyScorer(bank[~banned], cfg, (12, 12))(embeddings)
    torch.testing.assert_close(maps, ref_maps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_backend_scores_like_torch_and_supports_banned() -> None:
    generator = torch.Generator().manual_seed(6)
    bank = torch.randn(60, 8, generator=generator)
    embeddings = torch.randn(2, 8, 3, 3, generator=generator)
    banned = torch.zeros(60, dtype=torch.bool)
    banned[::2] = True
    torch_scorer = AnomalyScorer(bank, config(), (6, 6))
    faiss_scorer = AnomalyScorer(bank, config(knn_backend="faiss"), (6, 6))
    for kwargs in ({}, {"banned": banned}):
        a_maps, a_scores = torch_scorer(embeddings, **kwargs)
        b_maps, b_scores = faiss_scorer(embeddings, **kwargs)
        torch.testing.assert_close(a_maps, b_maps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a_scores, b_scores, atol=1e-4, rtol=1e-4)
