"""Export to ONNX / OpenVINO: the exported graph must give the PyTorch detector's results.

Real default detector (EfficientNet-Lite0 with its packaged weights) on real images: brick
texture crops at 128 px, and MVTec AD bottle at the default 256 px when ../shared has it.
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run_cli as _run_cli
from _images import FAST_CONFIG, texture_crops, with_defect
from _models import with_scoring
from PIL import Image

from defectscope import Detector
from defectscope.errors import ConfigError, DefectscopeError, ModelFileError, NotFittedError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from defectscope.export import export_onnx, load_exported  # noqa: E402
from defectscope.export.graph import ExportedGraph, exported_metadata  # noqa: E402
from defectscope.export.onnx import ONNX_FORMAT_NAME  # noqa: E402

# The parity contract.
SCORE_RTOL = 1e-4
MAP_ATOL = 1e-3
# fp16 storage of weights and bank: rounding of ~3 significant digits in every weight.
FP16_SCORE_RTOL = 5e-3
FP16_MAP_ATOL = 2e-2


def has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


# `fitted` and its export `onnx_file`: the session's quick model (conftest.py).
@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    goods = texture_crops(3, seed=11)
    # Sizes that differ from the input size exercise the shared mapping back to the original.
    goods.append(texture_crops(1, size=160, seed=12)[0][:, :150])
    defects = [with_defect(img, seed=s)[0] for s, img in enumerate(texture_crops(3, seed=13))]
    return goods + defects


def assert_parity(reference, candidate, score_rtol=SCORE_RTOL, map_atol=MAP_ATOL) -> None:
    assert len(reference) == len(candidate)
    for ref, got in zip(reference, candidate, strict=True):
        assert abs(got.score - ref.score) <= score_rtol * abs(ref.score)
        assert got.anomaly_map.shape == ref.anomaly_map.shape
        assert np.abs(got.anomaly_map - ref.anomaly_map).max() <= map_atol
        assert got.is_anomalous == ref.is_anomalous
        assert got.threshold == ref.threshold and got.pixel_threshold == ref.pixel_threshold


def test_export_is_valid_onnx_with_our_metadata(onnx_file: Path, fitted: Detector) -> None:
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["format"] == ONNX_FORMAT_NAME
    meta = json.loads(props["meta"])
    assert meta["preprocessing"] == fitted.preprocessor.to_dict()
    assert meta["calibration"]["threshold"] == fitted.threshold
    assert meta["export"]["input_shape"] == ["batch", 3, 128, 128]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"


def test_onnx_predictions_match_torch(onnx_file: Path, fitted: Detector, images) -> None:
    runtime = load_exported(onnx_file)
    reference = fitted.predict(images)
    got = runtime.predict(images, batch_size=4)
    assert_parity(reference, got)
    assert any(p.is_anomalous for p in reference) and not all(p.is_anomalous for p in reference)
    # Same scores through the same Calibration.normalize: the normalised scores agree too.
    for ref, pred in zip(reference, got, strict=True):
        assert pred.normalized_score == pytest.approx(ref.normalized_score, abs=1e-5)
    assert runtime.describe()["runtime"] == "onnx"


def test_graph_outputs_and_dynamic_batch(onnx_file: Path, fitted: Detector, images) -> None:
    runtime = load_exported(onnx_file)
    tensor = fitted.preprocessor(images[:3])
    ref_maps, ref_scores = fitted.score_batch(tensor)
    for n in (1, 3):
        assert isinstance(runtime.engine, ExportedGraph)
        maps, scores, normalized = runtime.engine.run_graph(tensor[:n].numpy())
        assert maps.shape == (n, 128, 128) and scores.shape == (n,)
        np.testing.assert_allclose(scores, ref_scores[:n].numpy(), rtol=SCORE_RTOL)
        np.testing.assert_allclose(maps, ref_maps[:n].numpy(), atol=MAP_ATOL)
        expected = fitted.calibration.normalize(ref_scores[:n].numpy())
        np.testing.assert_allclose(normalized, expected, atol=1e-5)


@pytest.mark.parametrize(
    "scoring",
    [{"reduction": "topk_mean"}, {"reduction": "patchcore"}, {"k": 3, "smoothing_sigma": 0.0}],
)
def test_other_scoring_rules_export(
    scoring: dict, fitted: Detector, images, tmp_path: Path
) -> None:
    # Same bank, other rules: the scorer alone changes, no refit needed.
    detector = with_scoring(fitted, **scoring)
    runtime = load_exported(export_onnx(detector, tmp_path / "m.onnx"))
    tensor = detector.preprocessor(images)
    ref_maps, ref_scores = detector.score_batch(tensor)
    maps, scores = runtime.score_batch(tensor)
    np.testing.assert_allclose(scores.numpy(), ref_scores.numpy(), rtol=SCORE_RTOL)
    np.testing.assert_allclose(maps.numpy(), ref_maps.numpy(), atol=MAP_ATOL)


@pytest.mark.skipif(not has_openvino(), reason="openvino is not installed")
def test_openvino_matches_torch(onnx_file: Path, fitted: Detector, images, tmp_path) -> None:
    from defectscope.export import export_openvino

    reference = fitted.predict(images)
    # From the ONNX file directly, and from an exported OpenVINO IR.
    for source in (onnx_file, export_openvino(fitted, tmp_path / "model.xml")):
        runtime = load_exported(source, "openvino")
        assert_parity(reference, runtime.predict(images, batch_size=4))
        maps, scores = runtime.score_batch(fitted.preprocessor(images[:1]))
        assert scores.shape == (1,)
        assert maps.shape == (1, 128, 128)


def has_nncf() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not (has_openvino() and has_nncf()), reason="openvino or nncf missing")
def test_openvino_int8_keeps_ranking_and_reports_its_score_shift(
    fitted: Detector, images, tmp_path: Path
) -> None:
    from defectscope.export import export_openvino

    with pytest.raises(ConfigError, match="calibration images"):
        export_openvino(fitted, tmp_path / "none.xml", precision="int8")
    path = export_openvino(
        fitted, tmp_path / "int8.xml", precision="int8", calibration_images=texture_crops(8)
    )
    runtime = load_exported(path, "openvino")
    check = exported_metadata(path, "openvino")["export"]["int8_check"]
    assert check["n_images"] == 8 and check["max_rel_score_change"] >= 0.0
    reference = fitted.predict(images)
    got = runtime.predict(images)
    goods = [p.score for p, r in zip(got, reference, strict=True) if not r.is_anomalous]
    defects = [p.score for p, r in zip(got, reference, strict=True) if r.is_anomalous]
    # Quantization may move scores, but the ranking of good versus defective must survive.
    assert defects and goods and min(defects) > max(goods)


def test_fp16_export_is_smaller_and_keeps_clear_decisions(
    onnx_file: Path, fitted: Detector, images, tmp_path: Path
) -> None:
    half = export_onnx(fitted, tmp_path / "half.onnx", precision="fp16")
    onnx.checker.check_model(onnx.load(str(half)))
    assert half.stat().st_size < 0.6 * onnx_file.stat().st_size
    reference = fitted.predict(images)
    got = load_exported(half).predict(images)
    for ref, pred in zip(reference, got, strict=True):
        assert abs(pred.score - ref.score) <= FP16_SCORE_RTOL * ref.score
        assert np.abs(pred.anomaly_map - ref.anomaly_map).max() <= FP16_MAP_ATOL
        if abs(ref.score - ref.threshold) > 0.02 * ref.threshold:
            assert pred.is_anomalous == ref.is_anomalous


def test_wrong_runtime_or_device_and_torch_only_calls_give_clear_errors(
    onnx_file: Path, images
) -> None:
    from defectscope.export import load_detector

    with pytest.raises(ConfigError, match="runtime must be one of"):
        load_detector(onnx_file, runtime="tensorrt")
    with pytest.raises(ConfigError, match="exported runtimes are"):
        load_exported(onnx_file, "torch")
    with pytest.raises(ConfigError, match="CPU only"):
        load_exported(onnx_file, device="cuda")
    runtime = load_exported(onnx_file)
    assert runtime.runtime == "onnx" and runtime.scorer is None
    # A graph holds its bank inside: what needs the PyTorch model says so, and nothing changes.
    with pytest.raises(DefectscopeError, match="embedded in the exported graph"):
        runtime.save(onnx_file.parent / "copy")
    with pytest.raises(DefectscopeError, match="PyTorch model it was exported from"):
        runtime.fit(images)
    with pytest.raises(DefectscopeError, match="not embeddings"):
        runtime.embed(torch.zeros(1, 3, 128, 128))
    with pytest.raises(DefectscopeError, match="not embeddings"):
        runtime.pooled_embeddings(images[:1])  # the drift check's feature test
    assert runtime.is_fitted and len(runtime.predict(images[:2])) == 2


def test_bad_inputs_give_clear_errors(onnx_file: Path, fitted: Detector, tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        export_onnx(Detector(FAST_CONFIG), tmp_path / "x.onnx")
    with pytest.raises(ModelFileError, match="not found"):
        load_exported(tmp_path / "missing.onnx")
    with pytest.raises(ModelFileError, match=r"no model\.onnx"):
        load_exported(tmp_path)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ModelFileError, match="not a loadable ONNX"):
        load_exported(junk)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(onnx_file.read_bytes()[:100_000])
    with pytest.raises(ModelFileError):
        load_exported(truncated)
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "foreign",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])],
    )
    onnx.save_model(onnx.helper.make_model(graph), str(foreign))
    with pytest.raises(ModelFileError, match="not a defectscope export"):
        load_exported(foreign)
    runtime = load_exported(onnx_file)
    with pytest.raises(ConfigError, match=r"\(batch, 3, 128, 128\)"):
        runtime.score_batch(torch.zeros(1, 3, 96, 96))
    if has_openvino():
        with pytest.raises(ModelFileError):
            load_exported(junk, "openvino")
        with pytest.raises(ModelFileError, match="not a defectscope export"):
            load_exported(foreign, "openvino")


@pytest.mark.needs_shared
def test_bottle_default_model_parity(bottle_root: Path, tmp_path: Path) -> None:
    """The default configuration (256 px) on real MVTec AD bottle images."""
    train = sorted((bottle_root / "train" / "good").glob("*.png"))[:6]
    test = [
        *sorted((bottle_root / "test" / "good").glob("*.png"))[:2],
        *sorted((bottle_root / "test" / "broken_large").glob("*.png"))[:2],
        *sorted((bottle_root / "test" / "contamination").glob("*.png"))[:1],
    ]
    # Decode once and shrink: keeps the test fast, and a non-square size tests mapping back.
    arrays = [np.array(Image.open(p).convert("RGB").resize((320, 300))) for p in train + test]
    detector = Detector({"device": "cpu", "batch_size": 8}).fit(arrays[: len(train)])
    path = export_onnx(detector, tmp_path / "bottle.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    queries = arrays[len(train) :]
    reference = detector.predict(queries)
    assert_parity(reference, load_exported(path).predict(queries))
    if has_openvino():
        assert_parity(reference, load_exported(path, "openvino").predict(queries))


run_cli = partial(_run_cli, check=True, timeout=300)


def test_cli_export_then_predict_with_onnx_runtime(
    fitted: Detector, texture_model_dir: Path, images, tmp_path: Path
) -> None:
    model_dir = texture_model_dir  # fitted, saved; the export goes to tmp_path
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(inputs / f"{i}.png")
    exported = tmp_path / "exported.onnx"
    assert "Exported onnx" in run_cli("export", str(model_dir), "--out", str(exported)).stdout
    out = tmp_path / "predictions"
    # No --runtime: the .onnx suffix selects onnxruntime.
    run_cli("predict", str(exported), str(inputs), "--out", str(out), "--no-images")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(images)
    # The torch side in-process on the same files (a third CLI process would only cost time).
    for row in rows:
        ref = fitted.predict(row["source"])[0]
        assert row["score"] == pytest.approx(ref.score, rel=SCORE_RTOL)
        assert row["is_anomalous"] == ref.is_anomalous
        assert row["defect_area_fraction"] == pytest.approx(float(ref.mask.mean()), abs=0.01)
