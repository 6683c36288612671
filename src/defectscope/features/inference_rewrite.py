"""Inference-only rewrites of a frozen CNN that compute the same function with less work.

Two rewrites, both exact up to float rounding and checked on probe inputs before they are kept:

* **BatchNorm folding.** In eval mode a BatchNorm after a convolution is an affine map per
  channel, so it folds into the convolution's weight and bias. timm's ``BatchNormAct2d`` keeps
  its activation (and dropout, an identity in eval). On EfficientNet-Lite this removes about a
  third of the backbone's CPU time, spent reading and writing every activation once more.
* **"Same" padding without a copy.** TensorFlow-style convolutions (timm's ``Conv2dSame``, used
  by the ``tf_`` EfficientNets whose weights we ship) pad stride-2 inputs asymmetrically, one
  more zero on the far side, through an explicit ``F.pad`` that copies the whole activation. The
  same output comes from the convolution's own symmetric padding with one leading zero tap in
  the kernel: it shifts the window by one pixel and the extra tap only ever meets zeros.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.conv2d_same import conv2d_same
from timm.layers.padding import get_same_padding
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Probe inputs (height, width): an even size, where stride-2 "same" padding is asymmetric,
# and odd sizes, where it is symmetric or absent.
PROBE_SIZES: tuple[tuple[int, int], ...] = ((64, 96), (67, 45))
# Largest difference kept, relative to the largest output value: float rounding only.
TOLERANCE = 1e-4


class SamePaddedConv2d(nn.Conv2d):
    """A convolution with TensorFlow "same" padding computed without padding its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # The exporter cannot shape a kernel padded at trace time: timm's padded form
            # (runtimes fuse the pad).
            stride = (self.stride[0], self.stride[1])
            return conv2d_same(x, self.weight, self.bias, stride, (0, 0), (1, 1), self.groups)
        # Per axis the padding is (before, after) with after - before 0 or 1; a leading zero
        # tap turns (before, after) into (after, after), which the convolution pads itself.
        pads = [
            get_same_padding(int(size), self.kernel_size[axis], self.stride[axis], 1)
            for axis, size in enumerate(x.shape[-2:])
        ]
        lead_h, lead_w = (total % 2 for total in pads)
        weight = self.weight
        if lead_h or lead_w:
            weight = F.pad(weight, (lead_w, 0, lead_h, 0))
        padding = tuple(total - total // 2 for total in pads)
        return F.conv2d(x, weight, self.bias, self.stride, padding, 1, self.groups)


def fold_batch_norms(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d (as sibling modules in
    registration order, the order timm's blocks apply them) into it; returns how many."""
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in itertools.pairwise(children):
            if not (
                isinstance(conv, nn.Conv2d)
                and isinstance(norm, nn.BatchNorm2d)
                and not norm.training
                and norm.track_running_stats
                and norm.running_mean is not None
                and norm.num_features == conv.out_channels
            ):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
            setattr(parent, norm_name, _after_norm(norm))
            folded += 1
    return folded


def _after_norm(norm: nn.BatchNorm2d) -> nn.Module:
    """What is left of a norm layer once its affine part is folded: timm's BatchNormAct2d
    applies dropout then its activation after normalising."""
    tail = [
        module
        for name in ("drop", "act")
        if isinstance(module := getattr(norm, name, None), nn.Module)
    ]
    return nn.Sequential(*tail) if tail else nn.Identity()


def replace_same_padding(model: nn.Module) -> int:
    """Swap each undilated ``Conv2dSame`` for a `SamePaddedConv2d`; returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Conv2dSame) or tuple(child.dilation) != (1, 1):
                continue
            # Built on the meta device: no random initialisation to draw from the caller's RNG.
            new = SamePaddedConv2d(
                child.in_channels,
                child.out_channels,
                (child.kernel_size[0], child.kernel_size[1]),
                stride=(child.stride[0], child.stride[1]),
                padding=0,
                groups=child.groups,
                bias=child.bias is not None,
                device="meta",
                dtype=child.weight.dtype,
            )
            new.load_state_dict(child.state_dict(), assign=True)
            new.train(child.training).requires_grad_(False)
            setattr(parent, name, new)
            replaced += 1
    return replaced


# no_grad, not inference_mode: the rewritten weights are used outside inference mode too (ONNX
# tracing, no_grad callers), which inference tensors refuse.
@torch.no_grad()
def rewrite_for_inference(
    model: nn.Module, run: Callable[[nn.Module, torch.Tensor], Sequence[torch.Tensor]]
) -> nn.Module:
    """``model`` with both rewrites applied if ``run(model, images)`` gives the same outputs
    on probe images afterwards; otherwise ``model`` unchanged. ``model`` must be in eval mode."""
    rewritten = copy.deepcopy(model)
    if fold_batch_norms(rewritten) + replace_same_padding(rewritten) == 0:
        return model
    return rewritten if _same_outputs(model, rewritten, run) else model


def _same_outputs(
    model: nn.Module,
    rewritten: nn.Module,
    run: Callable[[nn.Module, torch.Tensor], Sequence[torch.Tensor]],
) -> bool:
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    for height, width in PROBE_SIZES:
        images = torch.randn(2, 3, height, width, generator=generator).to(device)
        try:
            pairs = list(zip(run(model, images), run(rewritten, images), strict=True))
        except Exception:  # a model that cannot take the probe is used as timm built it
            return False
        for before, after in pairs:
            if before.shape != after.shape:
                return False
            scale = float(before.abs().max()) or 1.0
            if float((before - after).abs().max()) > TOLERANCE * scale:
                return False
    return True
