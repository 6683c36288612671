"""The evaluation runner and the report, with a fake detector on a tiny generated dataset.

Every image is a flat grey level, defective ones with a brighter 8x8 square where the mask is.
The fake detector's anomaly map is the brightness / 255 and its score the map's maximum, so all
image-level numbers can be worked out by hand.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from defectscope.data.datasets import Dataset, Sample, open_dataset
from defectscope.detector.prediction import Prediction
from defectscope.errors import DatasetError
from defectscope.evaluation import evaluate, pixel_auroc, write_report
from defectscope.evaluation.metrics import aupro
from defectscope.evaluation.report import _threshold_rule

SIZE = 32
BACKGROUND = 25
GOOD_LEVELS = [25, 50, 75, 150]
DEFECTS = {"scratch": [125, 175, 225], "dent": [100, 200]}
THRESHOLD = 112 / 255  # flags goods at 150, misses the dent at 100
PIXEL_THRESHOLD = 90 / 255


class FakeDetector:
    def __init__(self, batch_size: int = 3) -> None:
        self.threshold = THRESHOLD
        self.pixel_threshold = PIXEL_THRESHOLD
        self.config = SimpleNamespace(batch_size=batch_size)
        self.calls: list[int] = []

    def describe(self) -> dict:
        return {"backbone": "fake", "layers": ["a", "b"], "memory_bank": {"size": 10}}

    def predict(self, images, batch_size=None):
        self.calls.append(len(images))
        out = []
        for path in images:
            amap = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
            score = float(amap.max())
            out.append(
                Prediction(
                    score=score,
                    normalized_score=score / (2 * THRESHOLD),
                    is_anomalous=score >= THRESHOLD,
                    threshold=THRESHOLD,
                    anomaly_map=amap,
                    mask=amap >= PIXEL_THRESHOLD,
                    pixel_threshold=PIXEL_THRESHOLD,
                    source=str(path),
                    timings={"total_ms": 1.0},
                )
            )
        return out


def _image(path: Path, level: int, square: int | None = None, corner: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((SIZE, SIZE, 3), level, dtype=np.uint8)
    if square is not None:
        pixels[corner : corner + 8, corner : corner + 8] = square
    Image.fromarray(pixels).save(path)


def _mask(path: Path, corner: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[corner : corner + 8, corner : corner + 8] = 255
    Image.fromarray(mask).save(path)


def make_mvtec(root: Path, with_masks: bool = True) -> Path:
    for i in range(2):
        _image(root / "train" / "good" / f"{i:03d}.png", BACKGROUND)
    for i, level in enumerate(GOOD_LEVELS):
        _image(root / "test" / "good" / f"{i:03d}.png", level)
    for defect, levels in DEFECTS.items():
        for i, level in enumerate(levels):
            corner = 4 + 4 * i
            _image(root / "test" / defect / f"{i:03d}.png", BACKGROUND, level, corner)
            if with_masks:
                _mask(root / "ground_truth" / defect / f"{i:03d}_mask.png", corner)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return open_dataset(make_mvtec(tmp_path_factory.mktemp("mvtec") / "widget"))


@pytest.fixture(scope="module")
def result(dataset):
    return evaluate(FakeDetector(), dataset, max_overlays=6)


def test_image_metrics_match_hand_computation(result):
    # goods 25,50,75,150; defects 125,175,225 (scratch), 100,200 (dent): 18 of 20 pairs
    assert result.image_auroc == pytest.approx(18 / 20)
    # best F1 flags everything from 100 up: 5 TP, 1 FP -> 10/11
    assert result.f1_max == pytest.approx(10 / 11)
    assert result.f1_threshold == pytest.approx(100 / 255)
    # stored threshold 112: TP 4, FP 1 (150), TN 3, FN 1 (dent 100)
    assert result.confusion == {"tp": 4, "fp": 1, "tn": 3, "fn": 1}
    assert result.accuracy == pytest.approx(7 / 9)
    assert result.precision == pytest.approx(4 / 5)
    assert result.recall == pytest.approx(4 / 5)
    assert result.false_alarm_rate == pytest.approx(1 / 4)
    assert result.threshold == pytest.approx(THRESHOLD)
    assert result.pixel_threshold == pytest.approx(PIXEL_THRESHOLD)


def test_per_defect_breakdown(result):
    rows = result.per_defect
    assert list(rows) == ["good", "dent", "scratch"]
    assert rows["scratch"].image_auroc == pytest.approx(11 / 12)
    assert rows["dent"].image_auroc == pytest.approx(7 / 8)
    assert rows["scratch"].count == 3 and rows["dent"].count == 2 and rows["good"].count == 4
    assert rows["dent"].mean_score == pytest.approx(150 / 255)
    assert rows["dent"].flagged_rate == pytest.approx(1 / 2)
    assert rows["good"].flagged_rate == pytest.approx(1 / 4)
    assert math.isnan(rows["good"].image_auroc)
    for name in ("dent", "scratch"):
        assert 0.0 <= rows[name].pixel_auroc <= 1.0 and 0.0 <= rows[name].aupro <= 1.0


def test_pixel_metrics_use_aligned_masks(dataset, result):
    detector = FakeDetector()
    masks, maps = [], []
    for sample in dataset.test:
        amap = detector.predict([sample.path])[0].anomaly_map
        maps.append(amap)
        mask = np.zeros_like(amap, dtype=bool)
        if sample.mask_path is not None:
            mask = np.asarray(Image.open(sample.mask_path)) > 0
        masks.append(mask)
    assert result.pixel_auroc == pytest.approx(pixel_auroc(masks, maps))
    assert result.aupro == pytest.approx(aupro(masks, maps))
    # squares sit exactly on the masks: every defect has IoU 1 at the pixel threshold 90
    assert result.mean_defect_iou == pytest.approx(1.0)
    assert result.pixel_auroc > 0.9


def test_records_batches_progress_and_timings(dataset):
    detector = FakeDetector(batch_size=4)
    calls = []
    result = evaluate(detector, dataset, progress=lambda done, total: calls.append((done, total)))
    assert detector.calls == [4, 4, 1]
    assert calls == [(4, 9), (8, 9), (9, 9)]
    assert evaluate(detector, dataset, batch_size=5).timings["batch_size"] == 5
    assert [r.source for r in result.records] == [str(s.path) for s in dataset.test]
    dent = next(r for r in result.records if r.defect_type == "dent" and r.score < THRESHOLD)
    assert dent.label == 1 and dent.decision == "good" and dent.has_mask
    assert result.timings["predict_s"] >= 0 and result.timings["ms_per_image"] >= 0
    assert result.timings["mean_total_ms"] == pytest.approx(1.0)
    assert result.context["detector"]["backbone"] == "fake"
    assert result.context["dataset"]["name"] == "widget"


def test_overlays_are_a_bounded_mix(result):
    overlays = result.overlays
    assert len(overlays) == 6
    reasons = [o.reason for o in overlays]
    assert reasons.count("highest-scored defect") == 2
    assert reasons.count("lowest-scored defect") == 2
    assert reasons.count("highest-scored good") == 2
    assert len({o.source for o in overlays}) == 6
    assert overlays[0].score == pytest.approx(225 / 255)
    assert overlays[2].score == pytest.approx(100 / 255)  # the missed dent
    assert overlays[4].score == pytest.approx(150 / 255)  # the false alarm
    first = overlays[0]
    assert first.image.shape == (SIZE, SIZE, 3) and first.anomaly_map.shape == (SIZE, SIZE)
    assert first.ground_truth is not None and first.ground_truth.sum() == 64


def test_overlays_fill_from_other_kinds_and_can_be_off(dataset):
    few_goods = Dataset(
        dataset.root,
        dataset.layout,
        dataset.train,
        [s for s in dataset.test if s.label == 1] + [dataset.test[0]],
        [],
        "widget",
    )
    result = evaluate(FakeDetector(), few_goods, max_overlays=6)
    assert len(result.overlays) == 6
    assert sum(o.label == 0 for o in result.overlays) == 1
    assert evaluate(FakeDetector(), dataset, max_overlays=0).overlays == []


def test_without_masks_pixel_metrics_are_nan(tmp_path):
    root = make_mvtec(tmp_path / "nomask", with_masks=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dataset warns about the missing masks
        data = open_dataset(root)
    result = evaluate(FakeDetector(), data)
    assert math.isnan(result.pixel_auroc) and math.isnan(result.aupro)
    assert any("no ground-truth masks" in note for note in result.notes)
    assert result.image_auroc == pytest.approx(18 / 20)
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert payload["metrics"]["pixel_auroc"] is None


def test_duck_typed_dataset_and_empty_test(tmp_path, dataset):
    stand_in = SimpleNamespace(
        test=[
            SimpleNamespace(
                path=s.path, label=s.label, defect_type=s.defect_type, mask_path=s.mask_path
            )
            for s in dataset.test
        ]
    )
    result = evaluate(FakeDetector(), stand_in)
    assert result.image_auroc == pytest.approx(18 / 20)
    with pytest.raises(DatasetError, match="test split is empty"):
        evaluate(FakeDetector(), SimpleNamespace(test=[]))


def test_only_defects_in_test_split(dataset):
    defects_only = SimpleNamespace(test=[s for s in dataset.test if s.label == 1])
    result = evaluate(FakeDetector(), defects_only)
    assert math.isnan(result.image_auroc) and math.isnan(result.false_alarm_rate)
    assert result.recall == pytest.approx(4 / 5)
    assert any("no good images" in note for note in result.notes)


def test_write_report(tmp_path, result):
    html_path = write_report(result, tmp_path / "report")
    out = tmp_path / "report"
    assert html_path == out / "report.html"
    for name in ("metrics.json", "predictions.csv", "report.html", "report.md"):
        assert (out / name).is_file(), name
    for figure in ("roc.png", "score_histogram.png", "overlays.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
        with Image.open(out / "figures" / figure) as image:
            assert image.format == "PNG"

    payload = json.loads((out / "metrics.json").read_text())
    assert payload["metrics"]["image_auroc"] == pytest.approx(0.9)
    assert payload["metrics"]["f1_max"] == pytest.approx(10 / 11)
    assert payload["metrics"]["false_alarm_rate"] == pytest.approx(0.25)
    assert payload["confusion"] == {"tp": 4, "fp": 1, "tn": 3, "fn": 1}
    assert payload["per_defect"]["scratch"]["image_auroc"] == pytest.approx(11 / 12)
    assert payload["counts"] == {
        "images": 9,
        "good": 4,
        "defective": 5,
        "defective_with_mask": 5,
    }
    assert len(payload["records"]) == 9
    assert payload["context"]["detector"]["layers"] == ["a", "b"]

    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 9
    assert {r["decision"] for r in rows} == {"good", "anomalous"}
    assert float(rows[0]["score"]) == pytest.approx(result.records[0].score)

    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 3
    for figure in ("figures/roc.png", "figures/score_histogram.png", "figures/overlays.png"):
        assert figure in html
    assert "0.9000" in html and "scratch" in html and "fake" in html
    markdown = (out / "report.md").read_text()
    assert "![ROC curves](figures/roc.png)" in markdown
    assert "| scratch |" in markdown


def test_report_for_single_class_result(tmp_path, dataset):
    result = evaluate(FakeDetector(), SimpleNamespace(test=[s for s in dataset.test if s.label]))
    write_report(result, tmp_path / "r")
    assert not (tmp_path / "r" / "figures" / "roc.png").exists()
    assert (tmp_path / "r" / "figures" / "score_histogram.png").exists()
    payload = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert payload["metrics"]["image_auroc"] is None
    assert "no good images" in (tmp_path / "r" / "report.html").read_text()


def test_sample_class_is_the_real_one():
    # The tests above run on the real datasets module, not on stand-ins.
    assert Sample.__module__ == "defectscope.data.datasets"


def test_threshold_rule_names_the_fit_rule_or_the_person(result):
    calibration = {
        "method": "leave_one_out",
        "false_alarm_rate": 0.01,
        "tail_spread": 1.2,
        "threshold_source": "good_quantile",
    }

    def rule(**changes: object) -> str:
        context = {**result.context, "detector": {"calibration": {**calibration, **changes}}}
        return _threshold_rule(dataclasses.replace(result, context=context))

    assert rule() == "1% target on good images, leave_one_out, tail x1.2"
    assert rule(tail_spread=1.0, method="holdout") == "1% target on good images, holdout"
    assert rule(false_alarm_rate=0.05) == "5% target on good images, leave_one_out, tail x1.2"
    assert rule(threshold_source="user") == "user (not the fit's rule)"
    assert _threshold_rule(result) == "(not recorded)"  # the fake detector records none
