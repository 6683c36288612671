"""The single preprocessing path shared by fit, predict, serving and export.

Anything that turns an image into network input goes through `Preprocessor`, so training,
serving and exported models cannot disagree about resizing or normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ContentBox:
    """Where the image content lies inside the network input (pixels: top, left, height, width)."""

    top: int
    left: int
    height: int
    width: int


PADDINGS = ("reflect", "mean")


def mirror_indices(size: int, before: int, total: int) -> torch.Tensor:
    """Source index of each of ``total`` positions when ``size`` values start at ``before`` and
    the rest mirror them (edge not repeated, as far out as needed: the pad may exceed ``size``)."""
    if size == 1:
        return torch.zeros(total, dtype=torch.long)
    period = 2 * (size - 1)
    offset = (torch.arange(total) - before).remainder(period)
    return torch.where(offset < size, offset, period - offset)


class Preprocessor:
    """Resize (stretch or aspect-preserving pad) and normalise RGB uint8 images.

    Padding mirrors the image by default ('reflect'): the network then sees no content/padding
    edge, whose position varies with each image's shape and would look like a defect to the
    memory bank. 'mean' fills with the mean colour (zero after normalisation).
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        aspect: str = "stretch",
        padding: str = "reflect",
    ) -> None:
        if aspect not in ("stretch", "pad"):
            raise ValueError(f"aspect must be 'stretch' or 'pad', not {aspect!r}")
        if padding not in PADDINGS:
            raise ValueError(f"padding must be 'reflect' or 'mean', not {padding!r}")
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.aspect = aspect
        self.padding = padding

    def content_box(self, height: int, width: int) -> ContentBox:
        target_h, target_w = self.input_size
        if self.aspect == "stretch":
            return ContentBox(0, 0, target_h, target_w)
        scale = min(target_h / height, target_w / width)
        new_h = max(1, min(target_h, round(height * scale)))
        new_w = max(1, min(target_w, round(width * scale)))
        return ContentBox((target_h - new_h) // 2, (target_w - new_w) // 2, new_h, new_w)

    def resize(self, image: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> float (3, h, w) in [0, 1] at input size, not yet normalised."""
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        box = self.content_box(image.shape[0], image.shape[1])
        if (box.height, box.width) != tuple(tensor.shape[1:]):
            tensor = F.interpolate(
                tensor[None],
                size=(box.height, box.width),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[0].clamp_(0.0, 1.0)
        if self.aspect == "pad" and (box.height, box.width) != self.input_size:
            if self.padding == "reflect":
                rows = mirror_indices(box.height, box.top, self.input_size[0])
                cols = mirror_indices(box.width, box.left, self.input_size[1])
                return tensor[:, rows][:, :, cols]
            canvas = torch.zeros(3, *self.input_size)
            canvas[:, box.top : box.top + box.height, box.left : box.left + box.width] = tensor
            # Pad with the mean colour so that the padding normalises to zero.
            fill = torch.tensor(self.mean).view(3, 1, 1)
            mask = torch.ones(1, *self.input_size, dtype=torch.bool)
            mask[:, box.top : box.top + box.height, box.left : box.left + box.width] = False
            tensor = torch.where(mask, fill, canvas)
        return tensor

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
        return (batch - mean) / std

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """A batch of RGB uint8 images -> normalised float32 tensor (B, 3, H, W)."""
        return self.batch([self.resize(image) for image in images])

    def batch(self, resized: Sequence[torch.Tensor]) -> torch.Tensor:
        """Images already through `resize` -> the normalised batch `__call__` would give."""
        if len(resized) == 0:
            raise ValueError("no images to preprocess")
        return self.normalize(torch.stack(list(resized)))

    def to_original(self, maps: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        """Bring maps (B, H, W) at input size back onto an original image of ``original_size``."""
        box = self.content_box(*original_size)
        maps = maps[:, box.top : box.top + box.height, box.left : box.left + box.width]
        if tuple(maps.shape[-2:]) == tuple(original_size):
            return maps
        return F.interpolate(
            maps[:, None], size=original_size, mode="bilinear", align_corners=False
        )[:, 0]

    def to_dict(self) -> dict:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "aspect": self.aspect,
            "padding": self.padding,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessor:
        # Descriptions written before padding was an option padded with the mean colour.
        return cls(
            tuple(data["input_size"]),
            data["mean"],
            data["std"],
            data.get("aspect", "stretch"),
            data.get("padding", "mean"),
        )
