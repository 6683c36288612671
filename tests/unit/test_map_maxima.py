"""Leave-one-out map maxima without full maps: equal to the maxima of the full maps, whatever the
grid, blur, exclusions and stand-ins, and whatever valid upper bounds the screen gives."""

from __future__ import annotations

import pytest
import torch

from defectscope.config import ScoringConfig
from defectscope.detector import map_maxima
from defectscope.detector.edge_profile import EdgeProfile
from defectscope.detector.knn import TorchKnn
from defectscope.detector.map_maxima import leave_one_out_maxima
from defectscope.detector.scoring import AnomalyScorer


def setup(
    sigma: float,
    grid: tuple[int, int],
    input_size: tuple[int, int],
    with_stand_ins: bool,
    seed: int = 0,
    screen: bool = True,
    passes: list[tuple[int, int]] | None = None,
    **scoring: object,
):
    generator = torch.Generator().manual_seed(seed)
    n_images, dim = 5, 16
    h, w = grid
    bank = torch.randn(300, dim, generator=generator)
    owner = torch.randint(n_images, (300,), generator=generator)
    embeddings = torch.randn(n_images, dim, h, w, generator=generator)
    # A "defect": one image has a few patches far from everything, so maxima differ.
    embeddings[2, :, 1, 2] += 4.0
    config = ScoringConfig(smoothing_sigma=sigma, **scoring)  # type: ignore[arg-type]
    scorer = AnomalyScorer(bank, config, input_size, passes, [1.5, 0.7] if passes else None)
    # Bounds from the bfloat16 screen, or from the float32 subspace guess (knn_guess).
    scorer._index = TorchKnn(scorer.bank, screen=screen)
    if passes is not None:
        scorer._group_indexes = [
            TorchKnn(scorer.bank[:, a:b].contiguous(), screen=screen) for a, b in passes
        ]
    own = [(owner == i).nonzero().flatten() for i in range(n_images)]
    extra = None
    if with_stand_ins:
        extra = []
        for rows in own:
            kept = rows[: len(rows) // 2]
            extra.append(
                (bank[kept] + 0.05 * torch.randn(len(kept), dim, generator=generator), kept)
            )
    return scorer, embeddings, own, extra


@pytest.mark.parametrize("sigma", [0.0, 1.0, 4.0])
@pytest.mark.parametrize(
    ("grid", "input_size"), [((8, 8), (64, 64)), ((6, 10), (48, 80)), ((5, 5), (37, 41))]
)
@pytest.mark.parametrize("with_stand_ins", [False, True])
@pytest.mark.parametrize("screen", [True, False], ids=["bf16-screen", "subspace-guess"])
def test_maxima_equal_those_of_the_full_maps(
    sigma: float,
    grid: tuple[int, int],
    input_size: tuple[int, int],
    with_stand_ins: bool,
    screen: bool,
) -> None:
    scorer, embeddings, own, extra = setup(sigma, grid, input_size, with_stand_ins, screen=screen)
    assert_maxima_of_the_full_maps(scorer, embeddings, own, extra)


@pytest.mark.parametrize("with_stand_ins", [False, True])
@pytest.mark.parametrize("screen", [True, False], ids=["bf16-screen", "subspace-guess"])
def test_two_passes_add_their_bounds_and_give_the_same_maxima(
    with_stand_ins: bool, screen: bool
) -> None:
    # features.half_scale: each pass is bounded and searched on its own columns; besides the
    # summed map's maxima come each pass's own, its image scores.
    scorer, embeddings, own, extra = setup(
        4.0, (6, 10), (48, 80), with_stand_ins, screen=screen, passes=[(0, 10), (10, 16)]
    )
    scorer.set_score_weights([0.5, 3.0])
    maps, scores, per_pass = scorer.score_excluding_by_pass(embeddings, own, extra)
    found = leave_one_out_maxima(scorer, embeddings, own, extra)
    assert found is not None and found[1] is not None and per_pass is not None
    torch.testing.assert_close(found[0], maps.flatten(1).amax(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found[1], per_pass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(0.5 * per_pass[0] + 3.0 * per_pass[1], scores)
    # The summed map peaks no higher than its passes' own peaks added.
    weights = torch.tensor(scorer.group_weights)[:, None]
    assert bool(((weights * found[1]).sum(0) >= found[0] - 1e-5).all())


@pytest.mark.parametrize("with_stand_ins", [False, True])
def test_an_edge_profile_gives_the_maxima_of_the_corrected_maps(with_stand_ins: bool) -> None:
    # The profile rescales patch scores before the upsampling: bounds stay bounds.
    scorer, embeddings, own, extra = setup(4.0, (10, 12), (80, 96), with_stand_ins, seed=2)
    plain = leave_one_out_maxima(scorer, embeddings, own, extra)
    scorer.set_edge_profile(EdgeProfile((3.0, 2.0, 1.5, 1.2), centre=1.0))
    assert_maxima_of_the_full_maps(scorer, embeddings, own, extra)
    corrected = leave_one_out_maxima(scorer, embeddings, own, extra)
    assert plain is not None and corrected is not None
    assert not torch.allclose(plain[0], corrected[0])  # the profile did change them


def assert_maxima_of_the_full_maps(scorer, embeddings, own, extra) -> None:
    maps, scores = scorer.score_excluding(embeddings, own, extra)
    found = leave_one_out_maxima(scorer, embeddings, own, extra)
    assert found is not None
    maxima, per_pass = found
    assert per_pass is None  # one pass
    torch.testing.assert_close(maxima, maps.flatten(1).amax(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maxima, scores, rtol=1e-5, atol=1e-6)  # reduction 'max'


def test_loose_upper_bounds_take_more_rounds_but_give_the_same_maxima(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Any valid upper bounds must do: inflate the screen's by up to 3x at random.
    scorer, embeddings, own, extra = setup(4.0, (8, 8), (64, 64), True, seed=1)
    maps, _ = scorer.score_excluding(embeddings, own, extra)
    tight = leave_one_out_maxima(scorer, embeddings, own, extra)
    rounds = []
    original_bounds = TorchKnn.upper_bounds
    original_search = map_maxima._search_exactly

    def loose(self: TorchKnn, queries: torch.Tensor, exclude=None) -> torch.Tensor:
        bounds = original_bounds(self, queries, exclude)
        generator = torch.Generator().manual_seed(7)
        return bounds * (1.0 + 2.0 * torch.rand(bounds.shape, generator=generator))

    def counted(*args: object, **kwargs: object) -> None:
        rounds.append(1)
        original_search(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(TorchKnn, "upper_bounds", loose)
    monkeypatch.setattr(map_maxima, "_search_exactly", counted)
    found = leave_one_out_maxima(scorer, embeddings, own, extra)
    assert found is not None and tight is not None
    torch.testing.assert_close(found[0], maps.flatten(1).amax(1), rtol=1e-5, atol=1e-6)
    assert len(rounds) >= 2  # the first peaks were not the true ones


@pytest.mark.parametrize(
    ("scoring", "bounds"),
    [
        ({"k": 3}, True),
        ({"reduction": "topk_mean"}, True),
        ({"reduction": "patchcore"}, True),
        ({}, False),  # a search without cheap bounds (a GPU's): the exact search is used
    ],
)
def test_no_shortcut_where_the_score_is_not_the_maximum_of_a_nearest_neighbour_map(
    scoring: dict, bounds: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    scorer, embeddings, own, extra = setup(4.0, (8, 8), (64, 64), False, **scoring)
    monkeypatch.setattr(TorchKnn, "has_bounds", property(lambda self: bounds))
    assert leave_one_out_maxima(scorer, embeddings, own, extra) is None


def test_an_image_with_nothing_left_to_find_takes_the_full_path() -> None:
    scorer, embeddings, _, _ = setup(4.0, (8, 8), (64, 64), False)
    everything = torch.arange(scorer.bank.shape[0])
    own = [everything] + [torch.empty(0, dtype=torch.long)] * 4
    assert leave_one_out_maxima(scorer, embeddings, own, None) is None
