"""Datasets of good (and optionally defective) images in the layouts inspection data comes in.

Supported layouts (``open_dataset(root, layout="auto")`` detects them in this order):

``mvtec_ad2``
    ``train/good``, ``validation/good``, ``test_public/{good,bad}`` and masks in
    ``test_public/ground_truth/bad/<stem>_mask.png`` (``<stem>.png`` is accepted too).
    ``test_private*`` folders carry no labels: they are left out of every split and only counted
    in :meth:`Dataset.summary` under ``"unlabeled"``.
``mvtec_ad``
    ``train/good``, ``test/<type>`` (``good`` plus one folder per defect type) and masks in
    ``ground_truth/<type>/<stem>_mask.png``. A defective test image without a mask is kept with
    ``mask_path=None`` and reported once with :func:`warnings.warn`.
``folder``
    * ``root/good/`` with a ``root/test/`` folder: MVTec-like semantics (train = ``good``,
      test = ``test/<type>``).
    * ``root/good/`` (or ``root/train/good/``) without ``test/``: every good image is train and
      every sibling folder of ``good`` that holds images is a defect type used for test only, so
      the test split then has no good images.
    * a folder holding images directly: train only.

    Masks are looked up in ``root/ground_truth/<type>/`` or ``root/masks/<type>/`` as
    ``<stem>_mask.<ext>`` or ``<stem>.<ext>``; missing masks are only warned about when one of
    those folders exists.
``files``
    a single image file or a list of files (:func:`open_files`): everything is train.

Opening a dataset never decodes an image: a corrupt file fails later, when it is loaded.
Hidden files and folders and non-image files are ignored; every list is sorted by name.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectscope.data.io import IMAGE_SUFFIXES, is_image_file, list_images
from defectscope.errors import DatasetError, ImageLoadError

LAYOUTS = ("mvtec_ad", "mvtec_ad2", "folder", "files")
GOOD = "good"
# Folder names that are never a defect type when scanning the siblings of a "good" folder.
_RESERVED = {"good", "train", "test", "validation", "ground_truth", "masks", "mask"}
_EXPECTED = (
    "expected one of: an MVTec AD category (train/good, test/<type>, ground_truth/<type>); "
    "an MVTec AD 2 category (train/good, validation/good, test_public/{good,bad}); "
    "a folder with good/ (or train/good/) and optional defect-type sibling folders; "
    "a folder of images; or an image file"
)


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" for good images
    mask_path: Path | None = None


@dataclass
class Dataset:
    root: Path
    layout: str
    train: list[Sample]
    test: list[Sample]
    validation: list[Sample]
    name: str
    # Folders with images but no labels (MVTec AD 2 test_private*): name -> image count.
    unlabeled: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        if name not in ("train", "test", "validation"):
            raise DatasetError(f"unknown split {name!r}; expected train, test or validation")
        return getattr(self, name)

    @property
    def train_paths(self) -> list[Path]:
        return [s.path for s in self.train]

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test + self.validation if s.label == 1})

    def summary(self) -> dict[str, Any]:
        """Counts per split and defect type, JSON-serialisable."""
        out: dict[str, Any] = {
            "name": self.name,
            "root": str(self.root),
            "layout": self.layout,
        }
        for split in ("train", "validation", "test"):
            samples = self.split(split)
            by_type = Counter(s.defect_type for s in samples)
            out[split] = {
                "total": len(samples),
                "good": sum(1 for s in samples if s.label == 0),
                "defective": sum(1 for s in samples if s.label == 1),
                "with_mask": sum(1 for s in samples if s.mask_path is not None),
                "by_type": dict(sorted(by_type.items())),
            }
        out["unlabeled"] = dict(self.unlabeled)
        notes = []
        if self.unlabeled:
            notes.append(
                "unlabeled folders ignored for evaluation: " + ", ".join(sorted(self.unlabeled))
            )
        if self.test and not any(s.label == 0 for s in self.test):
            notes.append("test split has no good images (defect folders are test-only)")
        out["notes"] = notes
        return out


def open_dataset(root: str | Path | Sequence[str | Path], layout: str = "auto") -> Dataset:
    """Open a dataset folder (or image file / list of files) without decoding any image."""
    if not isinstance(root, (str, Path)):
        return open_files(root)
    if layout != "auto" and layout not in LAYOUTS:
        raise DatasetError(
            f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}"
        )
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset root not found: {path}")
    if path.is_file():
        if layout not in ("auto", "files"):
            raise DatasetError(f"{path} is a file; layout {layout!r} needs a folder")
        return open_files([path])
    if layout == "files":
        return open_files(list_images(path), root=path)

    detected = layout if layout != "auto" else _detect(path)
    if detected is None:
        # A common mistake: pointing at the collection instead of one category.
        categories = [d.name for d in _subdirs(path) if _detect(d) in ("mvtec_ad", "mvtec_ad2")]
        hint = (
            f" ({path} holds categories {', '.join(categories[:5])}: open one of them)"
            if categories
            else ""
        )
        raise DatasetError(f"{path}: no known dataset layout found{hint}; {_EXPECTED}")
    opener = {"mvtec_ad": _open_mvtec_ad, "mvtec_ad2": _open_mvtec_ad2, "folder": _open_folder}
    dataset = opener[detected](path)
    if not dataset.train:
        raise DatasetError(
            f"{path}: the train split is empty (layout {detected}); "
            f"it needs at least one good image ({_expected_train(detected)})"
        )
    return dataset


def open_files(paths: Sequence[str | Path], root: str | Path | None = None) -> Dataset:
    """A dataset of the given image files, all in train (layout ``files``)."""
    files: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if not path.exists():
            raise DatasetError(f"image file not found: {path}")
        if not path.is_file():
            raise DatasetError(f"{path} is not a file (pass folders to open_dataset)")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(
                f"{path} is not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})"
            )
        files.append(path)
    if not files:
        raise DatasetError("no image files given; the train split would be empty")
    files = sorted(files)
    base = Path(root) if root is not None else _common_parent(files)
    name = files[0].stem if len(files) == 1 else base.name
    train = [Sample(p, 0, GOOD) for p in files]
    return Dataset(base, "files", train, [], [], name=name or "files")


def _expected_train(layout: str) -> str:
    return {
        "mvtec_ad": "train/good/*.png",
        "mvtec_ad2": "train/good/*.png",
        "folder": "good/, train/good/ or images directly in the folder",
    }.get(layout, "image files")


def _is_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if _is_dir(p))


def _has_images(path: Path) -> bool:
    return _is_dir(path) and any(is_image_file(p) for p in path.iterdir())


def _detect(root: Path) -> str | None:
    if _is_dir(root / "train" / GOOD):
        if _is_dir(root / "test_public") or _is_dir(root / "validation" / GOOD):
            return "mvtec_ad2"
        if _is_dir(root / "test"):
            return "mvtec_ad"
        return "folder"
    if _is_dir(root / GOOD) or _has_images(root):
        return "folder"
    return None


def _good_samples(folder: Path) -> list[Sample]:
    return [Sample(p, 0, GOOD) for p in list_images(folder)] if _is_dir(folder) else []


def _defect_samples(
    folder: Path, defect_type: str, mask_dirs: Sequence[Path], missing: list[Path]
) -> list[Sample]:
    masks: dict[str, Path] = {}
    # Earlier mask folders win; within one folder "<stem>_mask" wins over a bare "<stem>".
    for mask_dir in reversed(mask_dirs):
        if _is_dir(mask_dir):
            for mask_path in sorted(list_images(mask_dir), key=lambda p: p.stem.endswith("_mask")):
                stem = mask_path.stem.removesuffix("_mask")
                masks[stem] = mask_path
    samples = []
    for image in list_images(folder):
        mask = masks.get(image.stem)
        if mask is None:
            missing.append(image)
        samples.append(Sample(image, 1, defect_type, mask))
    return samples


def _warn_missing(root: Path, missing: list[Path]) -> None:
    if not missing:
        return
    shown = ", ".join(str(p.relative_to(root)) for p in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    warnings.warn(
        f"{root}: {len(missing)} defective image(s) have no mask ({shown}{more}); "
        "they count for image-level metrics only",
        stacklevel=4,
    )


def _open_test_folder(
    root: Path, test_dir: Path, mask_roots: Sequence[Path], missing: list[Path]
) -> list[Sample]:
    test = _good_samples(test_dir / GOOD)
    for folder in _subdirs(test_dir):
        if folder.name in (GOOD, "ground_truth"):
            continue
        test.extend(
            _defect_samples(folder, folder.name, [m / folder.name for m in mask_roots], missing)
        )
    return test


def _open_mvtec_ad(root: Path) -> Dataset:
    if not _is_dir(root / "train" / GOOD) or not _is_dir(root / "test"):
        raise DatasetError(f"{root}: not an MVTec AD category (expected train/good and test/)")
    missing: list[Path] = []
    test = _open_test_folder(root, root / "test", [root / "ground_truth", root / "masks"], missing)
    _warn_missing(root, missing)
    return Dataset(root, "mvtec_ad", _good_samples(root / "train" / GOOD), test, [], root.name)


def _open_mvtec_ad2(root: Path) -> Dataset:
    public = root / "test_public"
    if not _is_dir(root / "train" / GOOD) or not (
        _is_dir(public) or _is_dir(root / "validation" / GOOD)
    ):
        raise DatasetError(
            f"{root}: not an MVTec AD 2 category "
            "(expected train/good, validation/good and test_public/{good,bad})"
        )
    missing: list[Path] = []
    test = (
        _open_test_folder(root, public, [public / "ground_truth"], missing)
        if _is_dir(public)
        else []
    )
    _warn_missing(root, missing)
    unlabeled = {
        d.name: sum(1 for p in d.rglob("*") if is_image_file(p))
        for d in _subdirs(root)
        if d.name.startswith("test_private")
    }
    return Dataset(
        root,
        "mvtec_ad2",
        _good_samples(root / "train" / GOOD),
        test,
        _good_samples(root / "validation" / GOOD),
        root.name,
        unlabeled,
    )


def _open_folder(root: Path) -> Dataset:
    mask_roots = [root / "ground_truth", root / "masks"]
    missing: list[Path] = []
    if _is_dir(root / GOOD):
        good_dir = root / GOOD
    elif _is_dir(root / "train" / GOOD):
        good_dir = root / "train" / GOOD
    else:
        # A plain folder of images: nothing to evaluate against, so everything is train.
        return Dataset(root, "folder", _good_samples(root), [], [], root.name)

    train = _good_samples(good_dir)
    if _is_dir(root / "test"):
        test = _open_test_folder(root, root / "test", mask_roots, missing)
    else:
        test = []
        for folder in _subdirs(good_dir.parent):
            if folder.name in _RESERVED or not _has_images(folder):
                continue
            masks = [m / folder.name for m in mask_roots]
            test.extend(_defect_samples(folder, folder.name, masks, missing))
    if any(_is_dir(m) for m in mask_roots):
        # Masks are optional here: only a partial set of them is worth a warning.
        _warn_missing(root, missing)
    return Dataset(root, "folder", train, test, [], root.name)


def _common_parent(paths: Sequence[Path]) -> Path:
    parents = [str(p.resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents))


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, read from its header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise ImageLoadError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(path, f"not a readable image: {exc}") from None
    return height, width


def load_mask(sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The defect mask of ``sample`` as a bool (H, W) array; nonzero mask pixels are defect.

    Good samples and samples without a mask give an all-False mask of the image size (read from
    the image header) or of ``shape``. ``shape`` (H, W) resizes with nearest neighbour.
    """
    if sample.mask_path is None or sample.label == 0:
        size = shape if shape is not None else image_size(sample.path)
        return np.zeros(size, dtype=bool)
    mask = _read_mask(sample.mask_path)
    if shape is not None and mask.shape != tuple(shape):
        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(
            (int(shape[1]), int(shape[0])), Image.Resampling.NEAREST
        )
        mask = np.asarray(resized) > 0
    return mask


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as opened:
            opened.load()
            image: Image.Image = opened
            mode = image.mode
            if mode == "P":
                # Palette index 0 need not be black: judge the colours, not the indices.
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                mode = image.mode
            array = np.asarray(image)
    except FileNotFoundError:
        raise ImageLoadError(path, "mask file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageLoadError(path, f"corrupt or unreadable mask: {exc}") from None
    if array.ndim == 2:
        return array != 0
    if mode in ("RGBA", "LA"):
        # Transparent pixels are background whatever colour they store.
        return (array[..., :-1] != 0).any(axis=-1) & (array[..., -1] != 0)
    return (array != 0).any(axis=-1)


def dataset_fingerprint(paths: Sequence[str | Path], length: int = 16) -> str:
    """A short hex id of a set of files: sha256 over sorted (relative name, size, sha256 of bytes).

    Names are relative to the files' common folder, so a moved or copied dataset keeps its id;
    any changed byte, added, removed or renamed file changes it.
    """
    files = [Path(p) for p in paths]
    if not files:
        raise DatasetError("cannot fingerprint an empty list of files")
    for path in files:
        if not path.is_file():
            raise ImageLoadError(path, "file not found")
    base = _common_parent(files)
    entries = []
    for path in files:
        relative = path.resolve().relative_to(base).as_posix()
        with path.open("rb") as handle:
            content = hashlib.file_digest(handle, "sha256").hexdigest()
        entries.append((relative, path.stat().st_size, content))
    digest = hashlib.sha256()
    for relative, size, content in sorted(entries):
        digest.update(f"{relative}\0{size}\0{content}\n".encode())
    return digest.hexdigest()[:length]
