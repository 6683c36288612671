"""Patch features: multi-layer backbone maps aggregated locally and brought to one grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.errors import ConfigError
from defectscope.features.backbones import FeatureBackbone


class PatchFeatures(nn.Module):
    """Images (B, 3, H, W) -> patch embeddings (B, D, h, w) on the finest requested grid.

    Each layer is averaged over a ``neighbourhood`` x ``neighbourhood`` window (PatchCore's local
    aggregation, which adds context without losing resolution), upsampled to the finest grid and
    concatenated. With ``embedding_dim`` each layer is pooled to an equal share of the dims first.
    With ``normalize='l2'`` each layer's vectors get unit length, so that a wide or high-magnitude
    deep layer does not drown the finer shallow one; that also discards the activation strength,
    which is what flags small defects on plain backgrounds, so neither setting wins everywhere.
    ``normalize='power'`` divides each vector by its length to ``norm_power`` (between 0 and 1):
    the longer vectors stay longer, but by less, keeping part of the strength.

    With ``half_scale`` the backbone also sees the image at half size, and those layers join each
    patch's features: a view over twice the area, which large low-contrast defects (blotches,
    uneven gloss) need and a patch of the full-size pass cannot see around.

    ``layer_weights`` (one per backbone layer, both passes alike) multiply each layer's vectors
    after normalisation: raw features with each layer at one mean norm keep the activation
    strength without letting the layer of larger norm outweigh the other.
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        neighbourhood: int = 1,
        embedding_dim: int | None = None,
        normalize: str = "l2",
        half_scale: bool = False,
        layer_weights: Sequence[float] | None = None,
        norm_power: float = 0.25,
    ) -> None:
        super().__init__()
        if normalize not in ("l2", "power", "none"):
            raise ConfigError(
                f"features.normalize must be 'l2', 'power' or 'none', not {normalize!r}"
            )
        if layer_weights is not None and len(layer_weights) != len(backbone.channels):
            raise ConfigError(
                f"features.layer_weights has {len(layer_weights)} weights for the backbone's "
                f"{len(backbone.channels)} layers"
            )
        self.layer_weights = None if layer_weights is None else tuple(map(float, layer_weights))
        self.backbone = backbone
        self.neighbourhood = int(neighbourhood)
        self.normalize = normalize
        self.norm_power = float(norm_power)
        self.embedding_dim = embedding_dim
        self.half_scale = bool(half_scale)
        self.stride = min(backbone.strides)
        channels = list(backbone.channels) * (2 if self.half_scale else 1)
        if embedding_dim is None:
            self.layer_dims = channels
        else:
            share = max(1, embedding_dim // len(channels))
            self.layer_dims = [min(share, c) for c in channels]
            self.layer_dims[-1] = min(embedding_dim - sum(self.layer_dims[:-1]), channels[-1])
        self.dim = sum(self.layer_dims)

    @property
    def column_groups(self) -> list[tuple[int, int]] | None:
        """Column spans [start, stop) of each pass's layers in an embedding, which the scorer
        searches apart; None for the single full-size pass."""
        if not self.half_scale:
            return None
        full = sum(self.layer_dims[: len(self.backbone.channels)])
        return [(0, full), (full, self.dim)]

    def grid_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        return (-(-input_size[0] // self.stride), -(-input_size[1] // self.stride))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.layer_maps(images))

    def layer_maps(
        self, images: torch.Tensor, half_scale: bool | None = None
    ) -> list[torch.Tensor]:
        """The backbone's layer maps of ``images``, then (``half_scale``, by default this
        module's) of the images at half size (2x2 averaging: exact, and traceable for export)."""
        maps = list(self.backbone(images))
        if self.half_scale if half_scale is None else half_scale:
            maps += list(self.backbone(F.avg_pool2d(images, 2, ceil_mode=True)))
        return maps

    def aggregate(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """The backbone's layer maps -> patch embeddings (B, D, h, w). Separate from the
        backbone pass so that several aggregations can share one pass (auto mode)."""
        # The finest grid of the full-size pass (half-scale maps, if any, come after its own).
        target = maps[int(torch.tensor(self.backbone.strides).argmin())].shape[-2:]
        parts = []
        for number, (feature, dim) in enumerate(zip(maps, self.layer_dims, strict=True)):
            feature = feature.float()
            if self.neighbourhood > 1:
                feature = F.avg_pool2d(
                    feature,
                    self.neighbourhood,
                    stride=1,
                    padding=self.neighbourhood // 2,
                    count_include_pad=False,
                )
            if feature.shape[-2:] != target:
                feature = F.interpolate(feature, size=target, mode="bilinear", align_corners=False)
            if dim != feature.shape[1]:
                b, c, h, w = feature.shape
                flat = feature.permute(0, 2, 3, 1).reshape(-1, 1, c)
                feature = F.adaptive_avg_pool1d(flat, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)
            if self.normalize == "l2":
                feature = F.normalize(feature, dim=1)
            elif self.normalize == "power":
                length = feature.norm(dim=1, keepdim=True).clamp_min(1e-12)
                feature = feature / length.pow(self.norm_power)
            if self.layer_weights is not None:
                feature = feature * self.layer_weights[number % len(self.layer_weights)]
            parts.append(feature)
        return torch.cat(parts, dim=1)
