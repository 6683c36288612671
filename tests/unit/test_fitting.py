"""Staged fit (plan -> shards -> bank): equals the one-pass fit, chunks, spill files, samples."""

from __future__ import annotations

import copy
import pickle
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import FAST_CONFIG, texture_crops, with_defect

import defectscope.detector.detector as detector_module
from defectscope import Detector, DetectorConfig
from defectscope.detector.calibration import spread_quantile
from defectscope.detector.plan import FitPlan
from defectscope.detector.shards import FitShard, ShardStore, SpilledArray, read_rows
from defectscope.errors import ConfigError, DefectscopeError

TRAIN = texture_crops(10)


def config(**sections: dict) -> dict:
    out = copy.deepcopy(FAST_CONFIG)
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


@pytest.fixture(scope="module")
def one_pass() -> Detector:
    """The default path: 10 images fit in one chunk."""
    return Detector(FAST_CONFIG).fit(TRAIN)


@pytest.fixture(autouse=True)
def reuse_backbone(one_pass: Detector, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every detector here uses the same backbone configuration: build it once."""
    backbone = one_pass.features.backbone
    monkeypatch.setattr(detector_module, "create_backbone", lambda cfg: backbone)
    yield


class LazyImages(Sequence):
    """Training images produced on access; iterating over all of them at once is refused."""

    def __init__(self) -> None:
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(TRAIN)

    def __getitem__(self, index):  # type: ignore[override]
        self.reads.append(index)
        return TRAIN[index]

    def __iter__(self):
        raise AssertionError("fit must not materialise the whole sequence")


@pytest.fixture(scope="module")
def lazy_images() -> LazyImages:
    return LazyImages()


@pytest.fixture(scope="module")
def chunked(lazy_images: LazyImages) -> Detector:
    """Four chunks of at most 3 images: the two-level coreset and merged calibration."""
    return Detector(config(fit={"chunk_images": 3})).fit(lazy_images)


def scores(detector: Detector, images: list[np.ndarray]) -> np.ndarray:
    return np.array([p.score for p in detector.predict(images)])


# ---------------------------------------------------------------------------- equivalence


def test_staged_fit_by_hand_equals_fit(one_pass: Detector) -> None:
    detector = Detector(FAST_CONFIG)
    detector.prepare(TRAIN)  # geometry, auto mode or few-shot views, as fit() settles them first
    plan = FitPlan.create(len(TRAIN), detector.config, detector.selection)
    assert plan.chunks() == [(0, 10)] and plan.single_chunk
    shard = detector.extract_shard(TRAIN, plan, 0)
    # Shards travel to and from workers: they must survive pickling.
    shard = pickle.loads(pickle.dumps(shard))
    detector.fit_from_shards([shard], plan)
    # Then the half-size bank, a fit of its own on the same images, joined to the first.
    half = detector.half_scale_detector(len(TRAIN))
    assert half is not None and half.config.features.input_pooling == 2
    detector.join_half_scale(half.fit(TRAIN))
    assert torch.equal(detector.memory_bank, one_pass.memory_bank)
    for name, bank in one_pass.memory_banks().items():
        assert torch.equal(detector.memory_banks()[name], bank), name
    assert detector.threshold == one_pass.threshold
    assert detector.pixel_threshold == one_pass.pixel_threshold
    assert detector.calibration.good_scores == one_pass.calibration.good_scores
    assert detector.info.reference == one_pass.info.reference
    assert detector.info.training.fingerprint == one_pass.info.training.fingerprint


def test_single_chunk_keeps_every_patch_as_candidate(one_pass: Detector) -> None:
    training = one_pass.info.training
    assert training.n_chunks == 1
    assert training.n_candidates == training.n_patches == 10 * 16 * 16
    assert one_pass.info.bank_size == 640  # ratio 0.25 of all patches, as before


# ---------------------------------------------------------------------------------- chunks


def test_chunked_fit_thins_per_chunk_and_keeps_the_bank_size(chunked: Detector) -> None:
    training = chunked.info.training
    assert training.n_chunks == 4
    assert training.n_patches == 2560
    # Each chunk keeps oversample (2) x its share of the 640-row bank: 1280 candidates.
    assert 640 < training.n_candidates <= 1280 + 4
    assert chunked.info.bank_size == 640
    assert training.n_calibration == 10
    assert set(chunked.info.timings) >= {"features_s", "coreset_s", "calibration_s"}


def test_chunked_fit_scores_close_to_one_pass(one_pass: Detector, chunked: Detector) -> None:
    goods = texture_crops(4, seed=99)
    defects = [with_defect(image, seed=i)[0] for i, image in enumerate(texture_crops(4, seed=7))]
    single, staged = scores(one_pass, goods + defects), scores(chunked, goods + defects)
    assert np.allclose(staged, single, rtol=0.15), (single, staged)
    assert staged[4:].min() > staged[:4].max()
    assert abs(chunked.threshold - one_pass.threshold) / one_pass.threshold < 0.15


def test_chunked_fit_is_deterministic_whatever_the_shard_order(chunked: Detector) -> None:
    detector = Detector(config(fit={"chunk_images": 3}))
    plan = FitPlan.create(len(TRAIN), detector.config)
    detector.prepare(TRAIN)
    shards = [detector.extract_shard(TRAIN[a:b], plan, a) for a, b in plan.chunks()]
    random.Random(0).shuffle(shards)
    detector.fit_from_shards(shards, plan)
    assert torch.equal(detector.memory_bank, chunked.memory_bank)
    # The full-size bank alone (`chunked` has the half-size bank too): its own unit.
    assert chunked.info.scales is not None
    full_unit = chunked.info.scales["thresholds"]["full"][0]
    assert detector.calibration.quantile_thresholds()[0] == pytest.approx(full_unit, rel=1e-6)


def test_shards_must_tile_the_plan() -> None:
    detector = Detector(config(fit={"chunk_images": 5}))
    plan = FitPlan.create(len(TRAIN), detector.config)
    first = detector.extract_shard(TRAIN[:5], plan, 0)
    with pytest.raises(DefectscopeError, match="plan has 10 images"):
        detector.fit_from_shards([first], plan)
    with pytest.raises(DefectscopeError, match="outside the plan"):
        detector.extract_shard(TRAIN[:5], plan, 8)


def test_fit_reads_a_lazy_sequence_one_chunk_at_a_time(
    chunked: Detector, lazy_images: LazyImages
) -> None:
    # Auto mode first reads a bounded sample (sizes, then held-out and bank images); the fit
    # itself then reads every image once, in order, a chunk at a time.
    assert lazy_images.reads[-10:] == list(range(10))
    preparation = lazy_images.reads[:-10]
    assert all(preparation.count(i) <= 2 for i in range(10))


# ----------------------------------------------------------------------------- spill files


def test_tiny_ram_budget_spills_to_memmap_files_and_removes_them(
    chunked: Detector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spill_dir = tmp_path / "spill"
    written: list[Path] = []
    real_write = SpilledArray.write.__func__

    def record(cls, tensor, path):
        written.append(path)
        return real_write(cls, tensor, path)

    monkeypatch.setattr(SpilledArray, "write", classmethod(record))
    cfg = config(fit={"chunk_images": 3, "ram_budget_mb": 0, "spill_dir": str(spill_dir)})
    detector = Detector(cfg).fit(TRAIN)
    # Candidates and calibration embeddings of 4 chunks, for the full-size and half-size banks.
    assert len(written) == 16
    assert all(p.parent.parent == spill_dir for p in written)
    assert list(spill_dir.iterdir()) == [], "the fit's temporary files must be removed"
    # Same numbers as from RAM.
    assert torch.equal(detector.memory_bank, chunked.memory_bank)
    assert detector.threshold == pytest.approx(chunked.threshold, rel=1e-6)


def test_shard_store_keeps_within_budget_and_spills_beyond(tmp_path: Path) -> None:
    def shard(rows: int) -> FitShard:
        return FitShard(
            offset=0,
            stop=1,
            image_ids=[0],
            names=[None],
            hashes=["x"],
            skipped=[],
            grid=(2, 2),
            n_patches=rows,
            candidates=torch.randn(rows, 4),
            candidate_owners=torch.zeros(rows, dtype=torch.long),
            pooled=np.zeros((1, 4), np.float32),
            calibration_ids=[0],
            calibration_embeddings=torch.randn(1, 4, 2, 2),
        )

    with ShardStore(budget_bytes=200, directory=tmp_path) as store:
        small = store.keep(shard(5))  # 80 + 64 bytes: fits
        assert isinstance(small.candidates, torch.Tensor)
        big = shard(50)
        expected = big.calibration_embeddings.clone(), big.candidates.clone()
        big = store.keep(big)
        assert isinstance(big.candidates, SpilledArray)
        assert big.nbytes() == 0 and store.spilled_bytes == (50 * 4 + 16) * 4
        assert torch.equal(read_rows(big.calibration_embeddings), expected[0])
        assert torch.equal(read_rows(big.candidates, 10, 20), expected[1][10:20])
        folder = store.directory
        assert folder is not None and len(list(folder.iterdir())) == 2
    assert not folder.exists()


# ---------------------------------------------------------------------- calibration sample


def test_plan_samples_calibration_images_deterministically() -> None:
    cfg = DetectorConfig.from_dict({"calibration": {"max_images": 100}})
    plan = FitPlan.create(5000, cfg)
    assert len(plan.calibration) == 100 == len(set(plan.calibration))
    assert plan.calibration == sorted(plan.calibration)
    assert plan.calibration == FitPlan.create(5000, cfg).calibration
    assert plan.calibration != list(range(100))
    assert FitPlan.create(100, cfg).calibration == list(range(100))


def test_plan_holdout_sample_comes_from_held_out_images() -> None:
    cfg = DetectorConfig.from_dict(
        {"calibration": {"method": "holdout", "holdout_fraction": 0.5, "max_images": 10}}
    )
    plan = FitPlan.create(100, cfg)
    assert len(plan.holdout) == 50 and len(plan.calibration) == 10
    assert set(plan.calibration) <= set(plan.holdout)
    assert plan.n_bank_images == 50
    assert not any(plan.in_bank(i) for i in plan.holdout)


def test_fit_calibrates_on_the_sample_only() -> None:
    detector = Detector(config(calibration={"max_images": 4}, fit={"chunk_images": 4})).fit(TRAIN)
    assert len(detector.calibration.good_scores) == 4
    assert detector.info.training.n_calibration == 4
    assert detector.info.training.n_images == 10


def test_leave_one_out_thresholds_are_widened_by_the_tail_spread(one_pass: Detector) -> None:
    calibration = one_pass.calibration
    assert calibration.method == "leave_one_out" and calibration.tail_spread == 1.2
    q = 1.0 - calibration.false_alarm_rate
    assert calibration.threshold == pytest.approx(spread_quantile(calibration.good_scores, q, 1.2))
    assert calibration.threshold > max(calibration.good_scores)
    assert calibration.pixel_threshold == pytest.approx(
        spread_quantile(calibration.good_pixel_maxima, q, 1.2)
    )


def test_holdout_thresholds_are_the_plain_quantile() -> None:
    cfg = config(calibration={"method": "holdout", "holdout_fraction": 0.5, "tail_spread": 2.0})
    calibration = Detector(cfg).fit(TRAIN).calibration
    assert calibration.tail_spread == 1.0  # held-out scores are new images' scores already
    assert calibration.threshold == max(calibration.good_scores)


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"calibration": {"tail_spread": 0.9}}, "calibration.tail_spread"),
        ({"calibration": {"tail_spread": "wide"}}, "calibration.tail_spread"),
        ({"fit": {"chunk_images": 0}}, "fit.chunk_images"),
        ({"fit": {"oversample": 0.5}}, "fit.oversample"),
        ({"fit": {"ram_budget_mb": -1}}, "fit.ram_budget_mb"),
        ({"fit": {"chunks": 3}}, "fit.chunks"),
        ({"calibration": {"max_images": 1}}, "calibration.max_images"),
        ({"coreset": {"max_size": 0}}, "coreset.max_size"),
    ],
)
def test_bad_fit_settings_are_config_errors(sections: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DetectorConfig.from_dict(sections)


def test_max_size_caps_the_bank() -> None:
    detector = Detector(config(coreset={"max_size": 100}, fit={"chunk_images": 5})).fit(TRAIN)
    assert detector.info.bank_size == 100
    assert detector.info.training.n_candidates <= 2 * 100 + 2


def test_plan_refuses_what_cannot_be_calibrated() -> None:
    with pytest.raises(DefectscopeError, match="at least 2 good images"):
        FitPlan.create(1, DetectorConfig.from_dict({"few_shot": {"enabled": False}}))
    with pytest.raises(DefectscopeError, match="at least one good image"):
        FitPlan.create(0, DetectorConfig())
