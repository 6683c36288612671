"""The model artefact: one safetensors file holding the memory bank and a JSON description.

safetensors keeps the tensors safe to load (no pickle) and its header carries string metadata,
so a single file is self-describing: backbone, layers, preprocessing, thresholds, score
statistics, package version and training fingerprint travel with the bank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from defectscope import storage
from defectscope.config import DetectorConfig
from defectscope.errors import ConfigError, ModelFileError
from defectscope.version import __version__

if TYPE_CHECKING:
    import torch

    from defectscope.detector.scoring import AnomalyScorer

# The banks a model file may hold, by tensor name, as errors name them.
BANK_NAMES = {"memory_bank": "memory bank", "memory_bank_half": "half-size memory bank"}

FORMAT_NAME = "defectscope-model"
FORMAT_VERSION = 1
MODEL_FILENAME = "model.safetensors"


# Per-image calibration scores, the drift reference sample and checksums: needed to use a model,
# noise when describing it to a person or an API client.
BULKY_KEYS = frozenset({"good_scores", "good_pixel_maxima", "pooled_sample", "tensor_sha256"})


def compact_metadata(value: Any) -> Any:
    """``value`` (model metadata) without its bulky entries, at any depth."""
    if isinstance(value, dict):
        return {k: compact_metadata(v) for k, v in value.items() if k not in BULKY_KEYS}
    if isinstance(value, list):
        return [compact_metadata(v) for v in value]
    return value


def resolve_model_path(path: str | Path) -> Path:
    """A model directory or the file itself (local, or an s3:// / gs:// URI, fetched into the
    cache) -> the local safetensors file."""
    if storage.is_remote(path):
        uri = str(storage.location(path))
        if Path(uri).suffix == "":
            uri = f"{uri.rstrip('/')}/{MODEL_FILENAME}"  # only the bank, not exported files
        path = storage.localize(uri)
    path = Path(path)
    if path.is_dir():
        candidate = path / MODEL_FILENAME
        if not candidate.is_file():
            raise ModelFileError(
                f"{path}: no {MODEL_FILENAME} in this folder; is it a model folder?"
            )
        return candidate
    if not path.exists():
        raise ModelFileError(f"model not found: {path}")
    return path


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def write_model_file(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path | str:
    """Write atomically: a crash mid-write never leaves a half file under the final name.

    A remote ``path`` (s3://, gs://: a model folder or a .safetensors key) is written locally,
    then uploaded as one object; its URI is returned.
    """
    if storage.is_remote(path):
        uri = str(storage.location(path))
        if not uri.endswith(".safetensors"):
            uri = f"{uri.rstrip('/')}/{MODEL_FILENAME}"
        storage.check_destination(uri)
        with tempfile.TemporaryDirectory(prefix="defectscope-model-") as staging:
            local = write_model_file(Path(staging), tensors, meta)
            return storage.upload_file(local, uri)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / MODEL_FILENAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot write the model here ({exc.strerror})") from None
    meta = {**meta, "tensor_sha256": {k: tensor_digest(v) for k, v in tensors.items()}}
    try:
        encoded = json.dumps(meta, allow_nan=False)
    except ValueError:
        raise ModelFileError(
            f"{path}: not written: the model's metadata holds NaN or infinite numbers"
        ) from None
    header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": encoded}
    # safetensors creates files 0600: keep a rewritten file's mode, else honour the umask.
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~current_umask()
    # A per-process, per-thread name: workers saving at the same instant never share a temp file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    from safetensors import SafetensorError
    from safetensors.torch import save_file  # torch only where tensors are written

    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), header)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only mount: one clear line
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ModelFileError(f"{path}: cannot write the model ({reason})") from None
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the write failed
    return path


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o22)  # no other way to read it: set and restore at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def model_file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock for a read-modify-write of the model file ``path``, across processes.

    The model file itself is replaced on every save, so the lock is a file of its own beside
    it. A no-op where ``fcntl`` is missing (Windows): writes stay atomic, only not serialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        handle = open(lock_path, "a+b")  # noqa: SIM115 - held open for the lock's lifetime
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot lock for writing: {exc.strerror or exc}") from None
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_calibration(path: Path | str, meta: dict[str, Any]) -> None:
    """Refuse calibration values that would silently judge every image wrongly (NaN, text...)."""
    calibration = meta.get("calibration")
    if calibration is None:
        return  # the loaders report a missing calibration in their own words
    invalid = f"{path}: calibration data is missing or invalid"
    if not isinstance(calibration, dict):
        raise ModelFileError(f"{invalid}: not an object")
    for key in ("threshold", "pixel_threshold", "scale"):
        value = calibration.get(key)
        if not _is_number(value):
            raise ModelFileError(f"{invalid}: {key} is {value!r}, not a finite number; refit")
    if calibration["scale"] <= 0:
        raise ModelFileError(f"{invalid}: scale must be positive, not {calibration['scale']}")
    spread = calibration.get("tail_spread", 1.0)
    if not _is_number(spread) or spread < 1.0:
        raise ModelFileError(f"{invalid}: tail_spread is {spread!r}, not a number >= 1")
    for key in ("good_scores", "good_pixel_maxima"):
        values = calibration.get(key, [])
        if not isinstance(values, list) or not all(_is_number(v) for v in values):
            raise ModelFileError(f"{invalid}: {key} holds values that are not finite numbers")


def check_model_contents(
    path: Path | str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """A usable model: finite calibration and a non-empty, finite memory bank."""
    check_calibration(path, meta)
    for name, what in BANK_NAMES.items():
        bank = tensors.get(name)
        if bank is None or bank.ndim != 2:
            continue  # Detector.load says what is missing or misshapen (`checked_bank`)
        if bank.shape[0] == 0:
            raise ModelFileError(f"{path}: the {what} is empty (shape {tuple(bank.shape)})")
        if not bool(bank.isfinite().all()):
            raise ModelFileError(
                f"{path}: the {what} holds NaN or infinite values; refit the model"
            )


def checked_bank(
    file: Path | str, tensors: dict[str, torch.Tensor], name: str, dim: int
) -> torch.Tensor:
    """The bank ``name`` of a read model file, refused unless it has ``dim`` columns (the
    feature size of the configuration that loads it)."""
    bank = tensors.get(name)
    if bank is None or bank.ndim != 2 or bank.shape[1] != dim:
        shape = None if bank is None else tuple(bank.shape)
        raise ModelFileError(
            f"{file}: {BANK_NAMES[name]} shape {shape} does not match the feature size {dim} of "
            "this configuration"
        )
    return bank


def read_header(path: Path) -> dict[str, Any]:
    """Parse and check the header only (cheap): the metadata of a defectscope model file."""
    try:
        with path.open("rb") as handle:
            size_bytes = handle.read(8)
            if len(size_bytes) < 8:
                raise ModelFileError(f"{path}: file is too short to be a model file (truncated?)")
            size = int.from_bytes(size_bytes, "little")
            if size <= 0 or size > 100_000_000 or size > path.stat().st_size - 8:
                raise ModelFileError(f"{path}: not a defectscope model file (bad header)")
            header = json.loads(handle.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError(f"{path}: not a defectscope model file (unreadable header)") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(
            f"{path}: a safetensors file, but not a defectscope model (no '{FORMAT_NAME}' marker)"
        )
    return parse_versioned_meta(path, metadata, FORMAT_VERSION, "model")


def parse_versioned_meta(
    path: Path, fields: dict[str, Any], supported: int, kind: str
) -> dict[str, Any]:
    """Check ``fields['format_version']`` and decode ``fields['meta']`` (JSON object).

    Shared by saved models (``kind='model'``) and exported ones (``kind='export'``), whose
    containers differ but carry the same two string fields after their format marker.
    """
    try:
        version = int(fields.get("format_version", "0"))
    except (TypeError, ValueError):
        raise ModelFileError(f"{path}: {kind} format version is not a number") from None
    if version > supported:
        raise ModelFileError(
            f"{path}: {kind} format version {version} is newer than this defectscope supports "
            f"({supported}); upgrade defectscope"
        )
    try:
        meta = json.loads(fields["meta"])
    except (KeyError, TypeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: {kind} metadata is missing or corrupt")
    check_calibration(path, meta)
    return meta


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = resolve_model_path(path)
    meta = read_header(path)
    from safetensors.torch import load_file  # torch only where tensors are read

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"{path}: corrupt or truncated model file ({exc})") from None
    digests = meta.get("tensor_sha256", {})
    if not isinstance(digests, dict):
        raise ModelFileError(f"{path}: model metadata is missing or corrupt")
    for name, digest in digests.items():
        if name not in tensors:
            raise ModelFileError(f"{path}: tensor {name!r} is missing")
        if tensor_digest(tensors[name]) != digest:
            raise ModelFileError(f"{path}: tensor {name!r} is corrupt (checksum mismatch)")
    check_model_contents(path, tensors, meta)
    return tensors, meta


def config_from_metadata(file: Path, meta: dict[str, Any]) -> DetectorConfig:
    """The configuration stored in a model's metadata, after checking its version."""
    _check_version(file, meta.get("defectscope_version", "0"))
    try:
        config = dict(meta["config"])
        # Models written before padding was an option padded with the mean colour.
        features = config.get("features")
        if isinstance(features, dict) and "padding" not in features:
            config["features"] = features = {**features, "padding": "mean"}
        # ... and before the half-scale pass existed, saw the image at one size only.
        if isinstance(features, dict) and "half_scale" not in features:
            config["features"] = features = {**features, "half_scale": False}
        # ... and before the half-size bank, had one bank.
        if isinstance(features, dict) and "half_size_bank" not in features:
            config["features"] = {**features, "half_size_bank": 0.0}
        return DetectorConfig.from_dict(config)
    except (KeyError, TypeError, ConfigError) as exc:
        raise ModelFileError(f"{file}: model configuration is missing or invalid: {exc}") from None


def _check_version(file: Path, saved: str) -> None:
    """Models are compatible within a major version (0.x: within a minor version)."""

    def parts(version: str) -> tuple[int, int]:
        try:
            major, minor = (int(p) for p in version.split(".")[:2])
        except ValueError:
            return (-1, -1)
        return major, minor

    ours, theirs = parts(__version__), parts(saved)
    compatible = ours[0] == theirs[0] and (ours[0] > 0 or ours[1] == theirs[1])
    if not compatible:
        raise ModelFileError(
            f"{file}: written by defectscope {saved}, which is not compatible with this "
            f"defectscope {__version__}; refit the model or use a matching version"
        )


def load_scorer(
    file: Path,
    bank: torch.Tensor,
    config: DetectorConfig,
    spans: list[tuple[int, int]] | None,
    saved: Any,
) -> AnomalyScorer:
    """The scorer of a saved bank, with the column groups its features have and the units of
    distance the fit measured (a model without them, or with others, is refused)."""
    from defectscope.detector.scoring import AnomalyScorer  # torch: only where a bank is loaded

    if spans is None:
        return AnomalyScorer(bank, config.scoring, config.features.input_size)
    stored = saved.get("spans") if isinstance(saved, dict) else None
    weights = saved.get("weights") if isinstance(saved, dict) else None
    # Absent in models written before per-pass image scores: theirs is the summed map's.
    score_weights = saved.get("score_weights") if isinstance(saved, dict) else None
    if stored != [list(g) for g in spans] or not isinstance(weights, list):
        raise ModelFileError(
            f"{file}: the column groups of its half-scale features are missing or do not match "
            f"this configuration ({stored} against {[list(g) for g in spans]}); refit the model"
        )
    try:
        return AnomalyScorer(
            bank, config.scoring, config.features.input_size, spans, weights, score_weights
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise ModelFileError(f"{file}: {exc}") from None
