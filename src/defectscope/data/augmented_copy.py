"""An augmented copy of a dataset, in the same layout, for drift studies.

Each image goes through an `Augmentation` seeded by (seed, its relative path), so a copy is
identical however often it is written; masks follow the geometric ops.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from defectscope.data.augment import Augmentation, apply_ops
from defectscope.data.datasets import Dataset, load_mask, open_dataset, open_files
from defectscope.data.io import load_image
from defectscope.errors import DatasetError

MANIFEST_NAME = "augmentation.json"


def _save_image(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def write_augmented_dataset(
    src_root: str | Path,
    dst_root: str | Path,
    spec: Augmentation,
    seed: int | None = None,
    *,
    overwrite: bool = False,
) -> Dataset:
    """Write a transformed copy of a dataset in the same layout and return it opened.

    Every labelled image (train, validation, test) is transformed with ``spec`` (seeded by
    ``seed``, default ``spec.seed``) and written under the same relative path; masks go through
    the geometric ops (nearest neighbour), or are copied byte for byte when there are none.
    Unlabelled folders (MVTec AD 2 ``test_private*``) and non-image files are not copied.
    ``augmentation.json`` in the copy records the spec and the parameters drawn per image.
    Refuses a destination inside the source (or the reverse) and an existing non-empty
    destination unless ``overwrite`` (which replaces it once the new copy is complete).
    """
    dataset = open_dataset(src_root)
    seed = spec.seed if seed is None else int(seed)
    src = dataset.root.resolve()
    dst = Path(dst_root).expanduser().resolve()
    if dst == src or src in dst.parents:
        raise DatasetError(f"destination {dst} is inside the source dataset {src}")
    if dst in src.parents:
        raise DatasetError(f"destination {dst} contains the source dataset {src}")
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"destination {dst} exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise DatasetError(f"destination {dst} is not empty (pass overwrite=True to replace it)")

    # Build next to the destination and rename at the end, so a failure leaves no half copy.
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        drawn = _write_samples(dataset, src, staging, spec, seed)
        manifest = {
            "source": str(src),
            "layout": dataset.layout,
            "spec": spec.to_dict(),
            "seed": seed,
            "images": drawn,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    if dataset.layout == "files":
        return open_files(
            [dst / s.path.resolve().relative_to(src) for s in dataset.train], root=dst
        )
    return open_dataset(dst, layout=dataset.layout)


def _write_samples(
    dataset: Dataset, src: Path, dst: Path, spec: Augmentation, seed: int
) -> dict[str, list[tuple[str, dict[str, float]]]]:
    drawn: dict[str, list[tuple[str, dict[str, float]]]] = {}
    written_masks: set[Path] = set()
    for sample in dataset.train + dataset.validation + dataset.test:
        relative = sample.path.resolve().relative_to(src)
        key = relative.as_posix()
        ops = spec.sample(key, seed)
        drawn[key] = ops
        image = load_image(sample.path)
        mask = None
        if sample.mask_path is not None and spec.is_geometric:
            mask = load_mask(sample, shape=image.shape[:2])
        image, mask = apply_ops(image, mask, ops, spec.fill, seed, key)
        _save_image(image, dst / relative)
        if sample.mask_path is None:
            continue
        mask_relative = sample.mask_path.resolve().relative_to(src)
        if mask_relative in written_masks:
            continue
        written_masks.add(mask_relative)
        target = dst / mask_relative
        if mask is None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sample.mask_path, target)
        else:
            _save_image(mask.astype(np.uint8) * 255, target)
    return drawn
