"""The backbone's inference rewrites (BatchNorm folding, "same" padding without a copy) compute
what the timm model as built computes, and are refused where they would not."""

from __future__ import annotations

import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn

from defectscope.config import BackboneConfig
from defectscope.features.backbones import create_backbone
from defectscope.features.inference_rewrite import (
    SamePaddedConv2d,
    fold_batch_norms,
    replace_same_padding,
    rewrite_for_inference,
)


@pytest.fixture(scope="module")
def lite0_pair() -> tuple[nn.Module, nn.Module]:
    """The real EfficientNet-Lite0 backbone, as built and rewritten."""
    return create_backbone(BackboneConfig(), rewrite=False), create_backbone(BackboneConfig())


@pytest.mark.parametrize("size", [(320, 320), (256, 192), (97, 250), (33, 35)])
def test_rewritten_lite0_gives_the_same_maps(
    lite0_pair: tuple[nn.Module, nn.Module], size: tuple[int, int]
) -> None:
    plain, fast = lite0_pair
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, got = plain(images), fast(images)
    assert len(expected) == len(got) == 2
    for before, after in zip(expected, got, strict=True):
        assert before.shape == after.shape
        torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_rewritten_lite0_has_no_batch_norm_and_no_padding_copy(
    lite0_pair: tuple[nn.Module, nn.Module],
) -> None:
    plain, fast = lite0_pair
    assert sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules()) == 33
    assert sum(isinstance(m, Conv2dSame) for m in plain.modules()) == 4
    assert not any(isinstance(m, (nn.BatchNorm2d, Conv2dSame)) for m in fast.modules())
    assert sum(isinstance(m, SamePaddedConv2d) for m in fast.modules()) == 4
    # The activations survive the folding: ReLU6 after every folded norm but the projections'.
    assert sum(isinstance(m, nn.ReLU6) for m in fast.modules()) == sum(
        isinstance(m, nn.ReLU6) for m in plain.modules()
    )
    # Models record the weights as loaded, whichever way they run.
    assert fast.fingerprint == plain.fingerprint


@pytest.mark.parametrize("kernel", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("size", [(16, 16), (17, 16), (15, 22)])
def test_same_padded_conv_equals_timm_conv2d_same(
    kernel: int, stride: int, groups: int, size: tuple[int, int]
) -> None:
    torch.manual_seed(kernel * 100 + stride * 10 + groups)
    reference = Conv2dSame(8, 12, kernel, stride=stride, groups=groups, bias=True).eval()
    replaced = nn.Sequential(reference)
    assert replace_same_padding(replaced) == 1
    assert isinstance(replaced[0], SamePaddedConv2d)
    x = torch.randn(2, 8, *size)
    with torch.inference_mode():
        torch.testing.assert_close(replaced(x), reference(x), rtol=1e-5, atol=1e-5)


def test_dilated_same_padding_is_left_alone() -> None:
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2, dilation=2))
    assert replace_same_padding(model) == 0
    assert isinstance(model[0], Conv2dSame)


def test_fold_keeps_the_activation_of_batch_norm_act() -> None:
    torch.manual_seed(0)
    norm = BatchNormAct2d(6, act_layer=nn.ReLU6)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm).eval()
    with torch.no_grad():
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 9, 9) * 4
    with torch.inference_mode():
        expected = model(x)
        assert fold_batch_norms(model) == 1
        got = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert float(got.max()) <= 6.0 and float(got.min()) >= 0.0  # still clipped by ReLU6
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class _NormAfterSum(nn.Module):
    """Registers a convolution then a norm, but normalises conv(x) + x: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x) + x)


def test_a_rewrite_that_changes_the_outputs_is_refused() -> None:
    torch.manual_seed(0)
    model = _NormAfterSum().eval()
    with torch.no_grad():
        model.norm.running_mean.fill_(3.0)
        model.norm.running_var.fill_(0.25)
    kept = rewrite_for_inference(model, lambda m, images: [m(images)])
    assert kept is model
    assert isinstance(model.norm, nn.BatchNorm2d)  # the original is never modified


def test_a_model_with_nothing_to_rewrite_is_returned_as_is() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    assert rewrite_for_inference(model, lambda m, images: [m(images)]) is model


class _FixedSize(nn.Module):
    """Takes only 224 x 224 inputs, as some models with a fixed position table do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (224, 224):
            raise ValueError("224 x 224 only")
        return self.norm(self.conv(x))


def test_a_model_that_cannot_take_the_probes_is_kept_as_built() -> None:
    model = _FixedSize().eval()
    assert rewrite_for_inference(model, lambda m, images: [m(images)]) is model
