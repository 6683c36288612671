"""Weights files: reading checkpoints, checking pinned files and converting foreign layouts.

Checkpoints in their authors' format (Meta's DINOv2/DINOv3) are converted to timm's layout with
timm's own checkpoint filter plus the DINOv3 details that filter does not check; every problem
(missing or unexpected keys, shapes, non-finite values) is a BackboneError naming the file.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from defectscope.errors import BackboneError


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, remedy: str) -> None:
    """Refuse a weights file whose content is not the pinned one (``remedy`` says what to do)."""
    actual = sha256_file(path)
    if actual != expected:
        raise BackboneError(
            f"{path}: sha256 {actual} does not match the expected {expected}; {remedy}"
        )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: Any  # a checkpoint may nest the weights under "model", "state_dict", ...
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
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise BackboneError(f"{path}: does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        # A training checkpoint (e.g. DINO's teacher): the backbone, without the heads.
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    return state


def load_checkpoint_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Convert ``state`` to ``model``'s layout if it is foreign, then load it strictly.

    Every problem (missing or unexpected keys, shapes, non-finite values) is a BackboneError that
    names ``source`` (a path, or a description of an in-memory state dict)."""
    state = convert_checkpoint(model, state, source)
    _load_strict(model, state, source)


def convert_checkpoint(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Convert checkpoints in their authors' format (e.g. Meta's DINOv2/DINOv3) with timm's own
    checkpoint filter, after the DINOv3 details timm's filter does not check."""
    own = model.state_dict()
    if set(state) != set(own):
        if _is_meta_dinov3(state):
            state = _prepare_meta_dinov3(model, state, source)
        module = importlib.import_module(type(model).__module__)
        converter = getattr(module, "checkpoint_filter_fn", None)
        if converter is not None:
            try:
                state = converter(state, model)
            except Exception as exc:
                raise BackboneError(
                    f"{source}: could not convert the checkpoint to {type(model).__name__}: {exc}"
                ) from None
    return _reconcile_qv_bias(model, state, source)


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _is_meta_dinov3(state: dict[str, torch.Tensor]) -> bool:
    return (
        "storage_tokens" in state
        or "rope_embed.periods" in state
        or any(k.endswith("attn.qkv.bias_mask") for k in state)
    )


def _prepare_meta_dinov3(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Checks and the qkv-bias split that Meta's DINOv3 format needs before timm's filter."""
    if "storage_tokens" not in state and getattr(model, "reg_token", None) is not None:
        # timm's filter recognises the format by this key; without it the file would be read as
        # another format and fail with a confusing list of keys.
        raise BackboneError(
            f"{source}: looks like a DINOv3 checkpoint in Meta's format but lacks the key "
            "'storage_tokens' (the register tokens); the file is incomplete"
        )
    # timm computes the RoPE periods itself and ignores the file's; they must agree, or every
    # feature would be silently wrong.
    periods = state.get("rope_embed.periods")
    own_periods = getattr(getattr(model, "rope", None), "periods", None)
    if (
        periods is not None
        and isinstance(own_periods, torch.Tensor)
        and periods.shape == own_periods.shape
        and not torch.allclose(periods.float(), own_periods.float(), rtol=1e-4, atol=1e-6)
    ):
        raise BackboneError(
            f"{source}: the checkpoint's RoPE periods differ from those of {_arch(model)} "
            "(trained with another RoPE base?), so its features would be wrong"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias_mask"):
            continue
        if not key.endswith("attn.qkv.bias"):
            out[key] = value
            continue
        mask = state.get(key + "_mask")
        if mask is not None:
            if mask.shape != value.shape:
                raise BackboneError(
                    f"{source}: {key}_mask has shape {tuple(mask.shape)} but {key} has "
                    f"{tuple(value.shape)}"
                )
            value = value * mask.to(value.dtype)  # what Meta's LinearKMaskedBias computes
        # The k part is dropped: Meta masks it to zero, and a key bias could not change attention
        # anyway (it adds the same q.b to every logit of a query; softmax ignores that).
        q_bias, _, v_bias = value.chunk(3, dim=-1)
        out[key.removesuffix("qkv.bias") + "q_bias"] = q_bias
        out[key.removesuffix("qkv.bias") + "v_bias"] = v_bias
    return out


def _reconcile_qv_bias(
    model: nn.Module, state: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Move q/v attention biases between timm's DINOv3 variants with and without them, where that
    computes exactly the same thing; refuse where it would not."""
    suffixes = (".attn.q_bias", ".attn.v_bias")
    own = model.state_dict()
    own_qv = [k for k in own if k.endswith(suffixes)]
    file_qv = [k for k in state if k.endswith(suffixes)]
    if own_qv and not file_qv and any(k.endswith(".attn.qkv.weight") for k in state):
        # Weights of a model without qkv bias: zero biases are that model.
        return {**state, **{k: torch.zeros_like(own[k]) for k in own_qv}}
    if file_qv and not own_qv:
        if any(bool(state[k].abs().max() > 0) for k in file_qv if state[k].numel()):
            arch = _arch(model)
            better = f"{arch}_qkvb" if timm.is_model(f"{arch}_qkvb") else "a variant with qkv bias"
            raise BackboneError(
                f"{source}: the checkpoint has non-zero attention q/v biases, which {arch} has "
                f"no place for; use {better} (Meta's names such as dinov3_vitb16 map to it)"
            )
        return {k: v for k, v in state.items() if k not in file_qv}
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
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
        raise BackboneError(
            f"{path}: weights do not fit {_arch(model)} (names in timm's layout): "
            + "; ".join(parts)
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not _all_finite(v)]
    if broken:
        raise BackboneError(
            f"{path}: {len(broken)} tensors hold NaN or infinite values (e.g. {broken[0]})"
        )
    model.load_state_dict(state, strict=True)


def _all_finite(tensor: torch.Tensor) -> bool:
    # NaN and inf survive a sum, which is far cheaper than isfinite on big models; a non-finite
    # sum of finite values (overflow) is told apart by the exact test.
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(
        torch.isfinite(tensor).all()
    )


def load_by_position(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    own = model.state_dict()
    if len(own) != len(state) or any(
        tuple(a.shape) != tuple(b.shape) for a, b in zip(own.values(), state.values(), strict=True)
    ):
        raise BackboneError(f"{path}: tensors do not match {type(model).__name__} by position")
    renamed = dict(zip(own.keys(), state.values(), strict=True))
    model.load_state_dict(renamed, strict=True)
