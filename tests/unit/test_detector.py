"""Detector life cycle on real pretrained weights and real texture images."""

from __future__ import annotations

import numpy as np
import pytest
from _images import FAST_CONFIG, texture_crops, with_defect
from _models import FAST_TRAIN_SIZE, fast_train_images, with_scoring
from PIL import Image

from defectscope import Detector
from defectscope.errors import DefectscopeError, ImageLoadError, NotFittedError

# `fitted` (conftest.py): Detector(FAST_CONFIG) fitted on fast_train_images(), once a session.
# Tests here fit themselves only where the fit is what they test.


def test_defect_scores_above_good_and_threshold(fitted: Detector) -> None:
    goods = texture_crops(6, seed=99)
    defects = [with_defect(image, seed=i)[0] for i, image in enumerate(texture_crops(6, seed=7))]
    good_scores = [p.score for p in fitted.predict(goods)]
    defect_scores = [p.score for p in fitted.predict(defects)]
    assert min(defect_scores) > max(good_scores)
    assert all(p.is_anomalous for p in fitted.predict(defects))
    assert sum(p.is_anomalous for p in fitted.predict(goods)) <= 1


def test_prediction_maps_match_original_size_and_localise(fitted: Detector) -> None:
    image, mask = with_defect(texture_crops(1, size=200, seed=5)[0])
    (pred,) = fitted.predict([image])
    assert pred.anomaly_map.shape == (200, 200) and pred.mask.shape == (200, 200)
    assert pred.anomaly_map.dtype == np.float32
    peak = np.unravel_index(np.argmax(pred.anomaly_map), pred.anomaly_map.shape)
    assert mask[peak], "the map's maximum should lie on the defect"
    assert pred.mask[mask].mean() > 0.5
    # The half-size bank's map is coarse on this small input (an 8x8 grid for 128 px): the
    # mask spreads about twice as far around the blob as one bank's (0.065 of the rest, IoU
    # 0.28); at the benchmark's input sizes mask IoU stays about level (BENCHMARKS.md).
    assert pred.mask[~mask].mean() < 0.16
    assert (pred.mask & mask).sum() / (pred.mask | mask).sum() > 0.15


def test_normalized_score_maps_threshold_to_half(fitted: Detector) -> None:
    t = fitted.threshold
    normalized = fitted.calibration.normalize(np.array([t - 1.0, t, t + 1.0]))
    assert normalized[1] == pytest.approx(0.5)
    assert normalized[0] < 0.5 < normalized[2]
    (pred,) = fitted.predict(texture_crops(1, seed=3), threshold=0.0)
    assert pred.is_anomalous and pred.normalized_score > 0.5 and pred.threshold == 0.0


def test_threshold_override_changes_decision_not_score(fitted: Detector) -> None:
    image = texture_crops(1, seed=11)[0]
    (base,) = fitted.predict(image)
    (high,) = fitted.predict(image, threshold=base.score + 1.0, pixel_threshold=1e9)
    assert high.score == pytest.approx(base.score)
    assert not high.is_anomalous and not high.mask.any()


def test_leave_one_out_calibration_is_out_of_sample(fitted: Detector) -> None:
    # One bank each: two-bank scores count in units of each model's own thresholds.
    one_bank = {**FAST_CONFIG, "features": {**FAST_CONFIG["features"], "half_size_bank": 0}}
    loo = Detector(one_bank).fit(fast_train_images())
    in_sample = Detector({**one_bank, "calibration": {"method": "in_sample"}}).fit(
        fast_train_images()
    )
    # Scoring an image against a bank holding its own patches underestimates its score.
    assert np.median(loo.calibration.good_scores) > np.median(in_sample.calibration.good_scores)
    assert len(fitted.calibration.good_scores) == FAST_TRAIN_SIZE


def test_holdout_calibration_uses_held_out_images() -> None:
    config = {**FAST_CONFIG, "calibration": {"method": "holdout", "holdout_fraction": 0.25}}
    detector = Detector(config).fit(texture_crops(12))
    assert len(detector.calibration.good_scores) == 3
    assert detector.info.training.n_in_bank == 9


def test_save_load_roundtrip_gives_identical_predictions(fitted: Detector, tmp_path) -> None:
    path = fitted.save(tmp_path / "model")
    assert path.name == "model.safetensors"
    loaded = Detector.load(tmp_path / "model")
    images = texture_crops(3, seed=21)
    for a, b in zip(fitted.predict(images), loaded.predict(images), strict=True):
        assert a.score == pytest.approx(b.score, rel=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-5, atol=1e-6)
    assert loaded.threshold == fitted.threshold
    assert (
        loaded.describe()["backbone"]["fingerprint"] == fitted.describe()["backbone"]["fingerprint"]
    )


def test_set_thresholds_persist(fitted: Detector, tmp_path) -> None:
    detector = Detector.load(fitted.save(tmp_path / "m"))
    detector.set_thresholds(image=1.5, pixel=2.5, source="f1_validation")
    loaded = Detector.load(detector.save(tmp_path / "m"))
    assert (loaded.threshold, loaded.pixel_threshold) == (1.5, 2.5)
    assert loaded.calibration.threshold_source == "f1_validation"
    with pytest.raises(DefectscopeError, match="finite"):
        detector.set_thresholds(image=float("nan"))


def test_fit_is_reproducible(fitted: Detector) -> None:
    images = fast_train_images()
    a = fitted  # Detector(FAST_CONFIG).fit(images), earlier in this session
    b = Detector(FAST_CONFIG).fit(list(reversed(images)))
    assert a.info.training.fingerprint == b.info.training.fingerprint
    c = Detector(FAST_CONFIG).fit(images)
    np.testing.assert_array_equal(a.memory_bank.numpy(), c.memory_bank.numpy())


def test_accepts_paths_grayscale_rgba_16bit(fitted: Detector, tmp_path) -> None:
    rgb = texture_crops(1, seed=4)[0]
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])).save(
        tmp_path / "rgba.png"
    )
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "rgb.bmp")
    Image.fromarray(rgb).save(tmp_path / "rgb.tiff")
    names = ["gray.png", "rgba.png", "deep.png", "rgb.jpg", "rgb.bmp", "rgb.tiff"]
    preds = fitted.predict([tmp_path / n for n in names])
    scores = [p.score for p in preds]
    # All six encode the same picture: scores agree up to JPEG loss.
    assert max(scores) - min(scores) < 0.15 * max(scores)
    assert [p.source for p in preds] == [str(tmp_path / n) for n in names]


def test_corrupt_image_is_reported_with_path(fitted: Detector, tmp_path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageLoadError, match=r"broken\.png"):
        fitted.predict([bad])
    results = list(fitted.iter_predict([texture_crops(1)[0], bad]))
    assert isinstance(results[1][2], ImageLoadError)
    assert results[0][2].score > 0


def test_fit_skips_bad_images_when_asked(tmp_path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    images = [*texture_crops(6), bad]
    with pytest.raises(ImageLoadError, match=r"bad\.jpg"):
        Detector(FAST_CONFIG).fit(images)
    with pytest.warns(UserWarning, match="bad.jpg"):
        detector = Detector(FAST_CONFIG).fit(images, on_error="skip")
    assert detector.info.training.n_images == 6
    assert detector.info.training.skipped[0]["source"].endswith("bad.jpg")


def test_unfitted_and_empty_inputs_fail_clearly() -> None:
    with pytest.raises(NotFittedError):
        Detector(FAST_CONFIG).predict(texture_crops(1))
    with pytest.raises(DefectscopeError, match="at least one"):
        Detector(FAST_CONFIG).fit([])
    # One image fits the few-shot way (tests/test_few_shot.py); without it, it cannot.
    with pytest.raises(DefectscopeError, match="at least 2"):
        Detector({**FAST_CONFIG, "few_shot": {"enabled": False}}).fit(texture_crops(1))


@pytest.mark.parametrize("reduction", ["max", "topk_mean", "patchcore"])
def test_reductions_rank_defects_above_good(fitted: Detector, reduction: str) -> None:
    # The reduction and k only change scoring: the same memory bank, scored by other rules.
    detector = with_scoring(fitted, reduction=reduction, k=3)
    assert detector.scorer.config.reduction == reduction and detector.scorer.config.k == 3
    good = [p.score for p in detector.predict(texture_crops(4, seed=50))]
    bad = [
        p.score for p in detector.predict([with_defect(i)[0] for i in texture_crops(4, seed=51)])
    ]
    assert min(bad) > max(good)


def test_pad_aspect_maps_back_to_non_square_images() -> None:
    config = {**FAST_CONFIG, "features": {"input_size": [128, 128], "aspect": "pad"}}
    detector = Detector(config).fit([c[:, :96] for c in texture_crops(8, size=128)])
    image, mask = with_defect(texture_crops(1, size=128, seed=8)[0][:, :96])
    (pred,) = detector.predict(image)
    assert pred.anomaly_map.shape == (128, 96)
    peak = np.unravel_index(np.argmax(pred.anomaly_map), pred.anomaly_map.shape)
    assert mask[peak]
