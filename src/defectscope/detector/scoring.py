"""From patch embeddings to an anomaly map and an image score.

The map is the distance of each patch to its nearest memory-bank patches, upsampled to the input
size and Gaussian-smoothed. The image score is a reduction of that map (so a mask drawn at the
image threshold and the image decision agree), or PatchCore's re-weighted maximum.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from defectscope.config import ScoringConfig
from defectscope.detector.knn import KnnIndex, TorchKnn, build_index


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(4.0 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable blur of (B, H, W) maps with reflected borders."""
    radius = kernel.numel() // 2
    x = maps[:, None]
    mode = "reflect" if min(maps.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, 0, 0), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode=mode)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x[:, 0]


class AnomalyScorer(nn.Module):
    """Memory bank plus the scoring rules; ``forward`` takes (B, D, h, w) patch embeddings."""

    # Registered buffers (they follow .to(device)); declared so type checkers see tensors.
    bank: torch.Tensor
    blur_kernel: torch.Tensor

    def __init__(
        self, bank: torch.Tensor, config: ScoringConfig, input_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.config = config
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.register_buffer("bank", bank.float().contiguous())
        sigma = config.smoothing_sigma
        self.register_buffer(
            "blur_kernel", gaussian_kernel1d(sigma) if sigma > 0 else torch.ones(1)
        )
        self._index: KnnIndex | None = None

    @property
    def index(self) -> KnnIndex:
        if (
            self._index is None
            or getattr(self._index, "device", self.bank.device) != self.bank.device
        ):
            self._index = build_index(
                self.bank,
                self.config.knn_backend,
                self.config.chunk_size,
                self.config.faiss_min_bank,
                self.config,
            )
        return self._index

    def _apply(self, fn, recurse=True):
        self._index = None  # the index holds device copies; rebuild after .to()/.half()
        return super()._apply(fn, recurse)

    def patch_distances(
        self, embeddings: torch.Tensor, banned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B*h*w, D) and their k nearest distances and bank indices."""
        b, d, h, w = embeddings.shape
        queries = embeddings.permute(0, 2, 3, 1).reshape(b * h * w, d)
        if banned is not None:
            index = self.index if isinstance(self.index, TorchKnn) else TorchKnn(self.bank)
            dist, idx = index.search(queries, self.config.k, banned=banned)
        else:
            dist, idx = self.index.search(queries, self.config.k)
        return queries, dist, idx

    def forward(
        self, embeddings: torch.Tensor, banned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (anomaly maps (B, H, W) at input size, image scores (B,))."""
        b, _, h, w = embeddings.shape
        queries, dist, idx = self.patch_distances(embeddings, banned)
        patch_scores = dist.mean(dim=1).reshape(b, h, w)
        maps = self.to_input_maps(patch_scores)
        scores = self.reduce(maps, patch_scores, queries.reshape(b, h * w, -1), idx)
        return maps, scores

    def to_input_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        maps = F.interpolate(
            patch_scores[:, None], size=self.input_size, mode="bilinear", align_corners=False
        )[:, 0]
        if self.blur_kernel.numel() > 1:
            maps = gaussian_blur(maps, self.blur_kernel)
        return maps

    def reduce(
        self,
        maps: torch.Tensor,
        patch_scores: torch.Tensor,
        queries: torch.Tensor,
        idx: torch.Tensor,
    ) -> torch.Tensor:
        """Image scores (B,) from maps (B, H, W), patch scores (B, h, w), queries (B, h*w, D)
        and nearest bank indices (B*h*w, k). Traceable: the ONNX export calls this too."""
        method = self.config.reduction
        flat = maps.flatten(1)
        if method == "max":
            return flat.amax(dim=1)
        if method == "topk_mean":
            k = max(1, math.ceil(self.config.topk_fraction * flat.shape[1]))
            return flat.topk(k, dim=1).values.mean(dim=1)
        return self._patchcore_reweight(patch_scores.flatten(1), queries, idx)

    def _patchcore_reweight(
        self, patch_scores: torch.Tensor, queries: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        # PatchCore eq. 7: damp the max patch score when its nearest bank patch sits in a dense
        # region of the bank (the patch is unusual but its neighbourhood is well represented).
        # Gathers rather than indexing by an arange, which a tracer would bake to one batch size.
        n = patch_scores.shape[1]
        top = patch_scores.argmax(dim=1, keepdim=True)  # (B, 1)
        score = patch_scores.gather(1, top)[:, 0]
        nearest = idx[:, 0].reshape(-1, n).gather(1, top)[:, 0]  # (B,)
        support_k = min(self.config.reweight_neighbours, self.bank.shape[0])
        bank_sq = (self.bank * self.bank).sum(dim=1)
        centre = self.bank.index_select(0, nearest)
        to_bank = (
            bank_sq[None] - 2.0 * centre @ self.bank.T + bank_sq.index_select(0, nearest)[:, None]
        )
        support = to_bank.topk(support_k, dim=1, largest=False).indices  # (B, S)
        d = queries.shape[2]
        query = queries.gather(1, top[:, :, None].expand(-1, 1, d))  # (B, 1, D)
        neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(-1, support_k, d)
        support_dist = (query - neighbours).norm(dim=2)
        weight = 1.0 - torch.softmax(support_dist, dim=1)[:, 0]
        return weight * score
