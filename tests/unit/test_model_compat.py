"""Detector.load refuses models that do not match this installation, with a clear error."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from _images import texture_crops
from _models import FAST_TRAIN_SIZE

import defectscope.detector.detector as detector_module
from defectscope import Detector, __version__
from defectscope.detector.model_file import (
    MODEL_FILENAME,
    read_header,
    read_model_file,
    write_model_file,
)
from defectscope.errors import ModelFileError


@pytest.fixture(scope="module")
def saved(texture_model_dir: Path) -> Path:
    """The session's model file (conftest.py's `fitted`); read-only, edits go to copies."""
    return texture_model_dir / MODEL_FILENAME


@pytest.fixture(autouse=True)
def reuse_backbone(fitted: Detector, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Detector.load builds a backbone from the config; hand it the one already built."""
    backbone = fitted.features.backbone
    monkeypatch.setattr(detector_module, "create_backbone", lambda config: backbone)
    yield


@pytest.fixture
def no_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything tries to build a backbone."""

    def refuse(config: object) -> None:
        raise AssertionError("the backbone must not be built for this check")

    monkeypatch.setattr(detector_module, "create_backbone", refuse)


def rewrite(
    source: Path,
    target: Path,
    edit_meta: Callable[[dict], object] | None = None,
    edit_tensors: Callable[[dict], object] | None = None,
) -> Path:
    tensors, meta = read_model_file(source)
    meta = copy.deepcopy(meta)
    meta.pop("tensor_sha256")
    if edit_meta is not None:
        edit_meta(meta)
    if edit_tensors is not None:
        edit_tensors(tensors)
    return write_model_file(target, tensors, meta)


def expect_refusal(path: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as info:
        Detector.load(path)
    message = str(info.value)
    assert MODEL_FILENAME in message or path.name in message, message
    for word in words:
        assert word in message, message
    return message


# -------------------------------------------------------------------- baseline


def test_saved_model_loads_and_scores_the_same(fitted: Detector, saved: Path) -> None:
    assert saved.name == MODEL_FILENAME
    loaded = Detector.load(saved.parent)
    assert loaded.is_fitted
    assert torch.equal(loaded.memory_bank, fitted.memory_bank)
    assert loaded.threshold == fitted.threshold
    assert loaded.pixel_threshold == fitted.pixel_threshold
    assert loaded.config == fitted.config
    assert loaded.info.defectscope_version == __version__
    image = texture_crops(1, seed=42)[0]
    (a,) = fitted.predict(image)
    (b,) = loaded.predict(image)
    assert b.score == pytest.approx(a.score, rel=1e-5)
    np.testing.assert_allclose(b.anomaly_map, a.anomaly_map, rtol=1e-5, atol=1e-6)


def test_load_with_device_override(saved: Path) -> None:
    loaded = Detector.load(saved, device="cpu")
    assert loaded.device == torch.device("cpu")
    assert loaded.config.device == "cpu"


def test_compatible_patch_version_loads(saved: Path, tmp_path: Path) -> None:
    major, minor = __version__.split(".")[:2]
    path = rewrite(
        saved,
        tmp_path / "patch",
        lambda m: m.update(defectscope_version=f"{major}.{minor}.99"),
    )
    assert Detector.load(path).info.defectscope_version == f"{major}.{minor}.99"


def test_a_model_written_before_the_padding_option_keeps_mean_colour_padding(
    saved: Path, tmp_path: Path
) -> None:
    assert Detector.load(saved).config.features.padding == "reflect"
    path = rewrite(saved, tmp_path / "before", lambda m: m["config"]["features"].pop("padding"))
    loaded = Detector.load(path)
    assert loaded.config.features.padding == "mean"
    assert loaded.preprocessor.padding == "mean"


# ------------------------------------------------------------------- refusals


def test_different_backbone_fingerprint(saved: Path, tmp_path: Path) -> None:
    def edit(meta: dict) -> None:
        meta["backbone"]["fingerprint"] = "0" * 16
        meta["backbone"]["weights"] = "some-other-weights.pth"

    path = rewrite(saved, tmp_path / "other_backbone", edit)
    expect_refusal(path, "backbone weights", "differ", "some-other-weights.pth", "refit")


def test_missing_backbone_section(saved: Path, tmp_path: Path) -> None:
    path = rewrite(saved, tmp_path / "nobackbone", lambda m: m.pop("backbone"))
    expect_refusal(path, "backbone weights", "differ")


@pytest.mark.parametrize("version", ["1.0.0", "0.9.0", "0.0.1", "2.1", "garbage", ""])
def test_incompatible_version(saved: Path, tmp_path: Path, version: str, no_backbone: None) -> None:
    path = rewrite(saved, tmp_path / "old", lambda m: m.update(defectscope_version=version))
    message = expect_refusal(path, "not compatible", __version__, "refit")
    assert f"written by defectscope {version}," in message


def test_missing_version_is_incompatible(saved: Path, tmp_path: Path, no_backbone: None) -> None:
    path = rewrite(saved, tmp_path / "nover", lambda m: m.pop("defectscope_version"))
    expect_refusal(path, "not compatible")


def test_memory_bank_of_wrong_feature_dimension(
    fitted: Detector, saved: Path, tmp_path: Path
) -> None:
    dim = fitted.features.dim

    def edit(tensors: dict) -> None:
        tensors["memory_bank"] = torch.randn(10, dim + 3)

    path = rewrite(saved, tmp_path / "wrongdim", edit_tensors=edit)
    expect_refusal(path, f"memory bank shape (10, {dim + 3})", f"feature size {dim}")


def test_memory_bank_not_a_matrix(fitted: Detector, saved: Path, tmp_path: Path) -> None:
    def edit(tensors: dict) -> None:
        tensors["memory_bank"] = torch.randn(fitted.features.dim)

    path = rewrite(saved, tmp_path / "vector", edit_tensors=edit)
    expect_refusal(path, "memory bank shape", "does not match")


def test_memory_bank_missing(saved: Path, tmp_path: Path) -> None:
    def edit(tensors: dict) -> None:
        tensors["other"] = tensors.pop("memory_bank")

    path = rewrite(saved, tmp_path / "nobank", edit_tensors=edit)
    expect_refusal(path, "memory bank shape None")


def test_missing_calibration(saved: Path, tmp_path: Path) -> None:
    path = rewrite(saved, tmp_path / "nocal", lambda m: m.pop("calibration"))
    expect_refusal(path, "calibration data is missing or invalid")


def test_invalid_calibration(saved: Path, tmp_path: Path) -> None:
    path = rewrite(saved, tmp_path / "badcal", lambda m: m["calibration"].pop("threshold"))
    expect_refusal(path, "calibration data is missing or invalid")


def test_missing_config(saved: Path, tmp_path: Path, no_backbone: None) -> None:
    path = rewrite(saved, tmp_path / "noconfig", lambda m: m.pop("config"))
    expect_refusal(path, "model configuration is missing or invalid")


def test_invalid_config(saved: Path, tmp_path: Path, no_backbone: None) -> None:
    path = rewrite(
        saved, tmp_path / "badconfig", lambda m: m["config"]["coreset"].update(ratio=5.0)
    )
    expect_refusal(path, "model configuration is missing or invalid", "coreset.ratio")


def test_folder_without_model(tmp_path: Path, no_backbone: None) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelFileError, match=f"no {MODEL_FILENAME} in this folder"):
        Detector.load(tmp_path)


def test_missing_path(tmp_path: Path, no_backbone: None) -> None:
    with pytest.raises(ModelFileError, match="model not found"):
        Detector.load(tmp_path / "absent.safetensors")


def test_corrupt_file_is_refused_before_the_backbone(
    saved: Path, tmp_path: Path, no_backbone: None
) -> None:
    path = tmp_path / "corrupt.safetensors"
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    expect_refusal(path, "checksum mismatch")


# ---------------------------------------------------------------- header only


def test_read_header_without_backbone_or_tensors(
    fitted: Detector, saved: Path, monkeypatch: pytest.MonkeyPatch, no_backbone: None
) -> None:
    def no_tensors(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_header must not load tensors")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", no_tensors)
    meta = read_header(saved)
    assert meta["defectscope_version"] == __version__
    assert meta["backbone"]["fingerprint"] == fitted.features.backbone.fingerprint
    assert meta["backbone"]["name"] == "tf_efficientnet_lite0"
    assert meta["feature_dim"] == fitted.features.dim
    assert meta["bank_size"] == fitted.memory_bank.shape[0]
    assert meta["config"] == fitted.config.to_dict()
    assert meta["calibration"]["threshold"] == fitted.threshold
    assert meta["training"]["n_images"] == FAST_TRAIN_SIZE
    # The shared model has a half-size bank (defectscope.detector.scales): both are checksummed.
    assert set(meta["tensor_sha256"]) == {"memory_bank", "memory_bank_half"}
    assert meta["scales"]["half_bank_size"] == fitted.memory_banks()["memory_bank_half"].shape[0]
