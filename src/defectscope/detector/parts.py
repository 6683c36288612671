"""`FeatureParts`: what turns a normalised image batch into patch embeddings, and where.

Fit, auto mode and predict share one instance, so they embed images exactly alike; the staged
fit takes it explicitly instead of reaching into a `Detector`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defectscope.config import FeatureConfig
from defectscope.errors import ConfigError
from defectscope.features.backbones import FeatureBackbone
from defectscope.features.patches import PatchFeatures
from defectscope.features.preprocess import Preprocessor


@dataclass
class FeatureParts:
    """The patch-feature extractor, its preprocessing, the device and the precision."""

    features: PatchFeatures
    preprocessor: Preprocessor
    device: torch.device
    half: bool = False
    pooling: int = 1  # the backbone sees the input averaged over pooling x pooling pixels

    @classmethod
    def build(
        cls,
        backbone: FeatureBackbone,
        config: FeatureConfig,
        device: torch.device,
        half_precision: bool = False,
    ) -> FeatureParts:
        """Parts for ``config`` on a shared ``backbone``. An undecided aspect ('auto', settled
        by a fit from the images' sizes) becomes 'stretch': one shape is assumed."""
        if config.aspect == "auto":
            config.aspect = "stretch"
        check_input(backbone, config)
        features = PatchFeatures(
            backbone,
            config.neighbourhood,
            config.embedding_dim,
            config.normalize,
            config.half_scale,
            config.layer_weights,
            config.norm_power,
        ).to(device)
        half = half_precision and device.type == "cuda"
        if half:
            backbone.half()
        preprocessor = Preprocessor(
            config.input_size, backbone.mean, backbone.std, config.aspect, config.padding
        )
        return cls(features, preprocessor, device, half, config.input_pooling)

    def grid_size(self) -> tuple[int, int]:
        """The patch grid of this extractor's input (after its pooling)."""
        return self.features.grid_size(pooled_size(self.preprocessor.input_size, self.pooling))

    @torch.inference_mode()
    def backbone_maps(
        self, batch: torch.Tensor, half_scale: bool | None = None
    ) -> list[torch.Tensor]:
        """Normalised input (B, 3, H, W) -> the backbone's layer maps, float32, on the device
        (before aggregation: auto mode aggregates one pass in several ways); those of the
        half-size pass after them if ``half_scale`` (None: as the features are configured)."""
        batch = batch.to(self.device, non_blocking=True)
        if self.pooling > 1:
            batch = pool_input(batch, self.pooling)
        if self.half:
            batch = batch.half()
        return [m.float() for m in self.features.layer_maps(batch, half_scale)]

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """Normalised input (B, 3, H, W) -> patch embeddings (B, D, h, w), float32."""
        return self.features.aggregate(self.backbone_maps(batch))


def check_input(backbone: FeatureBackbone, config: FeatureConfig) -> None:
    """Raise ConfigError unless ``backbone`` takes ``config``'s input and the halves its
    half-size passes need (a fit checks this before any work: it fails late otherwise)."""
    height, width = config.input_size
    backbone.check_input_size((height, width))
    if config.input_pooling > 1:
        try:
            backbone.check_input_size(pooled_size((height, width), config.input_pooling))
        except ConfigError as exc:
            hint = str(exc)
            if backbone.is_vit:
                step = backbone.input_multiple * config.input_pooling
                near = "x".join(str(max(step, round(s / step) * step)) for s in (height, width))
                hint = f"try features.input_size={near}, or features.half_size_bank=0"
            raise ConfigError(
                f"the half-size bank needs half of the {height}x{width} input to suit "
                f"{backbone.name}: {hint}"
            ) from None
    if config.half_scale:
        try:
            backbone.check_input_size((-(-height // 2), -(-width // 2)))
        except ConfigError as exc:
            raise ConfigError(
                f"features.half_scale needs the half of the {height}x{width} input: {exc}"
            ) from None


def pooled_size(size: tuple[int, int], pooling: int) -> tuple[int, int]:
    """The input size the backbone sees after `pool_input`."""
    return (-(-int(size[0]) // pooling), -(-int(size[1]) // pooling))


def pool_input(batch: torch.Tensor, pooling: int) -> torch.Tensor:
    """The normalised input averaged over ``pooling`` x ``pooling`` pixels (traceable): the
    half-size bank sees exactly this in fit, predict and export."""
    return F.avg_pool2d(batch, pooling, ceil_mode=True) if pooling > 1 else batch


def input_multiple(backbone: FeatureBackbone, config: FeatureConfig | None = None) -> int:
    """Input sides must be a multiple of this for ``backbone`` (CNNs: of their largest stride).
    With a half-size pass in ``config``, a ViT needs the half input on its patch grid too."""
    if not backbone.is_vit:
        return max(backbone.input_multiple, 32)
    halved = config is not None and (config.half_size_bank > 0 or config.half_scale)
    return backbone.input_multiple * (2 if halved else 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here")
    return torch.device(name)
