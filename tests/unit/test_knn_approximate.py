"""Approximate faiss indices (IVF, HNSW, IVF-PQ): recall, parameters, errors, use in a model."""

from __future__ import annotations

import copy

import pytest
import torch
from _images import FAST_CONFIG, texture_crops, with_defect
from _models import fast_train_images, with_scoring

from defectscope import Detector, DetectorConfig
from defectscope.config import ScoringConfig
from defectscope.detector.knn import FaissKnn, TorchKnn, build_index, faiss_available, ivf_lists
from defectscope.errors import ConfigError

pytestmark = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


def clustered(n_bank: int = 2048, n_query: int = 500, dim: int = 32, seed: int = 0):
    """Patch-like data: rows scattered around 64 centres; queries near bank rows."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(64, dim, generator=generator) * 4
    bank = centres[torch.randint(64, (n_bank,), generator=generator)]
    bank = bank + torch.randn(n_bank, dim, generator=generator)
    picks = torch.randint(n_bank, (n_query,), generator=generator)
    queries = bank[picks] + 0.3 * torch.randn(n_query, dim, generator=generator)
    return bank, queries


def recall_at_1(index, bank: torch.Tensor, queries: torch.Tensor) -> float:
    _, exact = TorchKnn(bank).search(queries, 1)
    _, found = index.search(queries, 1)
    return float((found[:, 0] == exact[:, 0]).float().mean())


@pytest.mark.parametrize(
    ("backend", "minimum"), [("faiss_ivf", 0.97), ("faiss_hnsw", 0.97), ("faiss_ivfpq", 0.8)]
)
def test_approximate_recall_close_to_exact(backend: str, minimum: float) -> None:
    bank, queries = clustered()
    # 6-bit codebooks train 4x faster than the default 8 bits: enough for this bank.
    cfg = ScoringConfig(knn_backend=backend, pq_bits=6)
    index = build_index(bank, backend, 1024, 1, cfg)
    assert isinstance(index, FaissKnn) and not index.exact
    assert recall_at_1(index, bank, queries) >= minimum
    dist, idx = index.search(queries, 3)
    assert dist.shape == idx.shape == (500, 3)
    assert (dist[:, :-1] <= dist[:, 1:] + 1e-5).all(), "nearest first"


def test_ivf_probing_every_list_is_exact() -> None:
    bank, queries = clustered()
    nlist = ivf_lists(bank.shape[0], None)
    cfg = ScoringConfig(knn_backend="faiss_ivf", ivf_nprobe=nlist)
    index = build_index(bank, "faiss_ivf", 1024, 1, cfg)
    assert recall_at_1(index, bank, queries) == 1.0


def test_ivf_list_count_is_bounded_by_training_points() -> None:
    assert ivf_lists(100_000, None) == 1265  # about 4 sqrt(n)
    assert ivf_lists(10_000, None) == 256  # 10000 / 39: faiss's minimum points per list
    assert ivf_lists(10, 64) == 1
    assert ivf_lists(100_000, 64) == 64


def test_ivfpq_parameters_that_cannot_work_are_config_errors() -> None:
    bank, _ = clustered(dim=30)
    with pytest.raises(ConfigError, match="pq_m=8 must divide the feature size 30"):
        build_index(bank, "faiss_ivfpq", 1024, 1, ScoringConfig(knn_backend="faiss_ivfpq"))
    small, _ = clustered(n_bank=100)
    with pytest.raises(ConfigError, match="at least 256 rows"):
        build_index(small, "faiss_ivfpq", 1024, 1, ScoringConfig(knn_backend="faiss_ivfpq"))


@pytest.mark.parametrize(
    ("scoring", "field"),
    [
        ({"knn_backend": "faiss_lsh"}, "scoring.knn_backend"),
        ({"ivf_nprobe": 0}, "scoring.ivf_nprobe"),
        ({"hnsw_m": 2}, "scoring.hnsw_m"),
        ({"hnsw_ef_search": 0}, "scoring.hnsw_ef_search"),
        ({"pq_bits": 16}, "scoring.pq_bits"),
        ({"ivf_nlist": 0}, "scoring.ivf_nlist"),
    ],
)
def test_bad_index_settings_are_config_errors(scoring: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        DetectorConfig.from_dict({"scoring": scoring})


def test_missing_faiss_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from defectscope.detector import knn

    monkeypatch.setattr(knn, "faiss_available", lambda: False)
    with pytest.raises(ConfigError, match=r"faiss_hnsw.*not installed"):
        build_index(torch.randn(10, 4), "faiss_hnsw", 64, 1)


def test_model_with_approximate_index_keeps_exact_calibration_and_scores_close(
    fitted: Detector, tmp_path
) -> None:
    exact = fitted  # FAST_CONFIG (exact search) on fast_train_images(), from conftest.py
    cfg = copy.deepcopy(FAST_CONFIG)
    cfg["scoring"] = {"knn_backend": "faiss_hnsw"}
    approx = Detector(cfg)
    # The backbone already built, in a copy: this fit must not touch the session's model.
    approx.parts = copy.deepcopy(exact.feature_parts())
    approx.preprocessor = approx.parts.preprocessor
    approx.fit(fast_train_images())
    # Leave-one-out calibration bans rows, which only exact search can: same thresholds.
    assert approx.threshold == pytest.approx(exact.threshold, rel=1e-6)
    assert torch.equal(approx.memory_bank, exact.memory_bank)
    images = [*texture_crops(2, seed=5), with_defect(texture_crops(1, seed=6)[0])[0]]
    for a, e in zip(approx.predict(images), exact.predict(images), strict=True):
        assert a.score == pytest.approx(e.score, rel=0.05)
    assert isinstance(approx.scorer.index, FaissKnn)
    # The index is rebuilt from the bank at load time, not stored.
    path = approx.save(tmp_path / "model")
    loaded = Detector.load(path)
    assert loaded.config.scoring.knn_backend == "faiss_hnsw"
    assert isinstance(loaded.scorer.index, FaissKnn)


def test_onnx_export_of_an_approximate_model_searches_exactly(fitted: Detector, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from defectscope.export import export_onnx, load_exported

    # The search backend only changes scoring: the session's model, searched by IVF-PQ.
    detector = with_scoring(fitted, knn_backend="faiss_ivfpq")
    images = [*texture_crops(3, seed=5), with_defect(texture_crops(1, seed=6)[0])[0]]
    approximate = [p.score for p in detector.predict(images)]
    exported = [
        p.score for p in load_exported(export_onnx(detector, tmp_path / "m.onnx")).predict(images)
    ]
    detector.scorer.config = detector.scorer.config.model_copy(update={"knn_backend": "torch"})
    detector.scorer._index = None
    exact = [p.score for p in detector.predict(images)]
    assert exported == pytest.approx(exact, rel=1e-4)
    # PQ codes only approximate distances: the export is what changed the numbers.
    assert approximate != pytest.approx(exact, rel=1e-4)
