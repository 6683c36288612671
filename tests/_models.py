"""Model files edited the way a corrupt disk or a careless hand would, for refusal tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from defectscope.detector.model_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_FILENAME,
    read_header,
    resolve_model_path,
    tensor_digest,
)


def rewritten_model(
    source: Path, target: Path, edit: Callable[[dict, dict[str, torch.Tensor]], object]
) -> Path:
    """A copy of ``source`` with ``edit(meta, tensors)`` applied, checksums made to match, and
    written without `write_model_file`'s checks (NaN stays NaN in the JSON header)."""
    from safetensors.torch import load_file

    file = resolve_model_path(source)
    meta = read_header(file)
    tensors = load_file(str(file))
    edit(meta, tensors)
    meta["tensor_sha256"] = {name: tensor_digest(value) for name, value in tensors.items()}
    header = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta),
    }
    target.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(target / MODEL_FILENAME), header)
    return target
