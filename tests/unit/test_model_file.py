"""The model file: round trip, atomic write, path resolution and every kind of bad file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from defectscope.detector.model_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_FILENAME,
    read_header,
    read_model_file,
    resolve_model_path,
    tensor_digest,
    write_model_file,
)
from defectscope.errors import DefectscopeError, ModelFileError

META = {"backbone": {"name": "tf_efficientnet_lite0"}, "values": [1, 2.5, None], "text": "é"}


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "memory_bank": torch.randn(50, 8, generator=generator),
        "counts": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_model_file(tmp_path / "model", tensors(), META)


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A file in safetensors layout with an arbitrary JSON header."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def header_with(meta: str, version: str = str(FORMAT_VERSION)) -> dict:
    return {"__metadata__": {"format": FORMAT_NAME, "format_version": version, "meta": meta}}


def expect_error(path: Path, *words: str) -> str:
    with pytest.raises(ModelFileError) as info:
        read_model_file(path)
    message = str(info.value)
    assert path.name in message, message
    for word in words:
        assert word in message, message
    return message


# -------------------------------------------------------------------- round trip


def test_round_trip(model: Path, tmp_path: Path) -> None:
    assert model == tmp_path / "model" / MODEL_FILENAME
    assert model.is_file()
    loaded, meta = read_model_file(model)
    original = tensors()
    assert set(loaded) == set(original)
    for name, tensor in original.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert {k: v for k, v in meta.items() if k != "tensor_sha256"} == META
    assert meta["tensor_sha256"] == {k: tensor_digest(v) for k, v in original.items()}


def test_read_from_folder(model: Path) -> None:
    loaded, meta = read_model_file(model.parent)
    assert torch.equal(loaded["memory_bank"], tensors()["memory_bank"])
    assert meta["backbone"] == META["backbone"]


def test_write_to_safetensors_name_creates_parents(tmp_path: Path) -> None:
    path = write_model_file(tmp_path / "a" / "b" / "custom.safetensors", tensors(), {})
    assert path == tmp_path / "a" / "b" / "custom.safetensors"
    loaded, meta = read_model_file(str(path))
    assert set(meta) == {"tensor_sha256"}
    assert torch.equal(loaded["counts"], tensors()["counts"])


def test_write_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    base = torch.randn(6, 4, requires_grad=True)
    view = base.T  # non-contiguous, requires grad
    path = write_model_file(tmp_path / "m.safetensors", {"t": view}, {})
    loaded, _ = read_model_file(path)
    assert torch.equal(loaded["t"], view.detach())


def test_header_fields(model: Path) -> None:
    size = int.from_bytes(model.read_bytes()[:8], "little")
    header = json.loads(model.read_bytes()[8 : 8 + size])
    metadata = header["__metadata__"]
    assert metadata["format"] == FORMAT_NAME == "defectscope-model"
    assert metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["meta"])["text"] == "é"


def test_read_header_only(model: Path) -> None:
    meta = read_header(model)
    assert meta["backbone"] == {"name": "tf_efficientnet_lite0"}
    assert "memory_bank" in meta["tensor_sha256"]


def test_atomic_write_leaves_no_tmp_and_overwrites(tmp_path: Path) -> None:
    first = write_model_file(tmp_path / "m", {"x": torch.zeros(3)}, {"run": 1})
    second = write_model_file(tmp_path / "m", {"x": torch.ones(3)}, {"run": 2})
    assert first == second
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [MODEL_FILENAME]
    assert not list(tmp_path.rglob("*.tmp"))
    loaded, meta = read_model_file(second)
    assert torch.equal(loaded["x"], torch.ones(3)) and meta["run"] == 2


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    path = write_model_file(tmp_path / "m", {"x": torch.zeros(3)}, {"run": 1})
    with pytest.raises(TypeError):
        write_model_file(tmp_path / "m", {"x": torch.ones(3)}, {"bad": object()})
    loaded, meta = read_model_file(path)
    assert meta["run"] == 1 and torch.equal(loaded["x"], torch.zeros(3))
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import safetensors.torch

    path = write_model_file(tmp_path / "m", {"x": torch.zeros(3)}, {"run": 1})

    def full_disk(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ModelFileError, match=r"cannot write the model \(No space left on device\)"):
        write_model_file(tmp_path / "m", {"x": torch.ones(3)}, {"run": 2})
    loaded, meta = read_model_file(path)
    assert meta["run"] == 1 and torch.equal(loaded["x"], torch.zeros(3))
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("name", ["defectscope-test/model", "defectscope-test.safetensors"])
def test_a_place_that_cannot_be_written_is_a_clear_error(name: str) -> None:
    # /proc takes no new files or folders, not even from root.
    with pytest.raises(ModelFileError, match="cannot write the model"):
        write_model_file(Path("/proc") / name, {"x": torch.zeros(3)}, {})


def test_tensor_digest() -> None:
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) == tensor_digest(a.T.contiguous().T)  # layout-independent values
    b = a.clone()
    b[1, 2] += 1
    assert tensor_digest(a) != tensor_digest(b)
    assert len(tensor_digest(a)) == 64


# --------------------------------------------------------------- resolve_model_path


def test_resolve_folder_and_file(model: Path) -> None:
    assert resolve_model_path(model.parent) == model
    assert resolve_model_path(str(model)) == model


def test_resolve_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=f"no {MODEL_FILENAME} in this folder") as info:
        resolve_model_path(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_resolve_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="model not found") as info:
        resolve_model_path(tmp_path / "ghost.safetensors")
    assert "ghost.safetensors" in str(info.value)
    with pytest.raises(ModelFileError, match="model not found"):
        read_model_file(tmp_path / "ghost")


def test_model_file_error_is_a_defectscope_error() -> None:
    assert issubclass(ModelFileError, DefectscopeError)


# -------------------------------------------------------------------- bad files


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, "too short", "truncated")


def test_four_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "four.safetensors"
    path.write_bytes(b"\x01\x02\x03\x04")
    expect_error(path, "too short")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    expect_error(path, "not a defectscope model file")


def test_plausible_size_but_garbage_header(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(struct.pack("<Q", 16) + b"\xff\xfe not json at all" + b"\0" * 32)
    expect_error(path, "not a defectscope model file", "unreadable header")


def test_header_size_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    expect_error(path, "bad header")


def test_zero_header_size(tmp_path: Path) -> None:
    path = tmp_path / "zero.safetensors"
    path.write_bytes(struct.pack("<Q", 0) + b"{}")
    expect_error(path, "bad header")


def test_plain_safetensors_is_not_a_defectscope_model(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    message = expect_error(path, "not a defectscope model")
    assert FORMAT_NAME in message
    with pytest.raises(ModelFileError, match="not a defectscope model"):
        read_header(path)


def test_safetensors_with_foreign_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign2.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path), {"format": "pt"})
    expect_error(path, "not a defectscope model")


def test_newer_format_version(tmp_path: Path) -> None:
    path = tmp_path / "future.safetensors"
    save_file(
        {"memory_bank": torch.zeros(2, 2)},
        str(path),
        {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION + 1), "meta": "{}"},
    )
    message = expect_error(path, f"format version {FORMAT_VERSION + 1}", "newer", "upgrade")
    assert f"({FORMAT_VERSION})" in message


def test_missing_format_version_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "v0.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), {"format": FORMAT_NAME, "meta": '{"a": 1}'})
    loaded, meta = read_model_file(path)
    assert meta == {"a": 1} and torch.equal(loaded["x"], torch.zeros(1))


def test_corrupt_metadata_json(tmp_path: Path) -> None:
    path = tmp_path / "meta.safetensors"
    save_file(
        {"x": torch.zeros(2)},
        str(path),
        {"format": FORMAT_NAME, "format_version": "1", "meta": "{not: json"},
    )
    expect_error(path, "model metadata is missing or corrupt")


def test_missing_metadata(tmp_path: Path) -> None:
    path = tmp_path / "nometa.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), {"format": FORMAT_NAME, "format_version": "1"})
    expect_error(path, "model metadata is missing or corrupt")


@pytest.mark.parametrize(
    "header",
    [
        [1, 2],
        {"__metadata__": "hello"},
        header_with("{}", version="abc"),
        header_with("[1, 2]"),
    ],
    ids=["header-list", "metadata-string", "version-abc", "meta-list"],
)
def test_malformed_header_shapes(tmp_path: Path, header: object) -> None:
    path = raw_file(tmp_path / "odd.safetensors", header)
    expect_error(path)


def test_flipped_byte_is_a_checksum_mismatch(model: Path) -> None:
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's data
    model.write_bytes(bytes(data))
    message = expect_error(model, "corrupt (checksum mismatch)")
    assert "'memory_bank'" in message or "'counts'" in message


def test_flipped_byte_in_each_tensor(tmp_path: Path) -> None:
    for name in ("memory_bank", "counts"):
        path = write_model_file(tmp_path / name, tensors(), META)
        data = bytearray(path.read_bytes())
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
        start, _ = header[name]["data_offsets"]
        data[8 + size + start] ^= 0x01
        path.write_bytes(bytes(data))
        expect_error(path, f"tensor {name!r} is corrupt (checksum mismatch)")


def test_truncated_file(model: Path) -> None:
    model.write_bytes(model.read_bytes()[:-100])
    expect_error(model, "corrupt or truncated model file")


def test_truncated_inside_header(model: Path) -> None:
    model.write_bytes(model.read_bytes()[:40])
    expect_error(model, "not a defectscope model file")


def test_listed_tensor_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.safetensors"
    meta = {"tensor_sha256": {"memory_bank": "0" * 64}}
    save_file(
        {"other": torch.zeros(2)},
        str(path),
        {"format": FORMAT_NAME, "format_version": "1", "meta": json.dumps(meta)},
    )
    expect_error(path, "tensor 'memory_bank' is missing")


def test_directory_named_like_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(ModelFileError, match=r"no model\.safetensors in this folder"):
        read_model_file(folder)


# ------------------------------------------------------------- numbers, modes and locks
CALIBRATION = {"threshold": 1.0, "pixel_threshold": 2.0, "scale": 0.5, "good_scores": [0.9]}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"threshold": True}, "threshold is True"),
        ({"threshold": "1.5"}, "threshold is '1.5'"),
        ({"pixel_threshold": float("inf")}, "pixel_threshold is inf"),
        ({"scale": float("nan")}, "scale is nan"),
        ({"scale": -1.0}, "scale must be positive"),
        ({"good_scores": [1.0, float("-inf")]}, "good_scores holds values"),
        ({"good_pixel_maxima": "many"}, "good_pixel_maxima holds values"),
        ({"tail_spread": 0.5}, "tail_spread is 0.5, not a number >= 1"),
        ({"tail_spread": "wide"}, "tail_spread is 'wide'"),
        ({"tail_spread": float("nan")}, "tail_spread is nan"),
    ],
)
def test_calibration_that_is_not_finite_numbers_is_refused(tmp_path, change, words) -> None:
    meta = {"calibration": {**CALIBRATION, **change}}
    encoded = json.dumps({**meta, "tensor_sha256": {}})  # NaN written as Python would
    path = tmp_path / "m.safetensors"
    save_file({"memory_bank": torch.ones(2, 2)}, str(path), header_with(encoded)["__metadata__"])
    for read in (read_header, read_model_file):
        with pytest.raises(ModelFileError, match="calibration data is missing or invalid") as info:
            read(path)
        assert words in str(info.value)


def test_metadata_with_nan_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        write_model_file(tmp_path / "m", tensors(), {"timings": {"total_s": float("nan")}})
    assert not (tmp_path / "m" / MODEL_FILENAME).exists()


def test_new_files_follow_the_umask_and_rewrites_keep_their_mode(tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o027)
    try:
        path = write_model_file(tmp_path / "m", tensors(), {})
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o640
        os.umask(0o077)
        Path(path).chmod(0o644)  # chosen by the operator: a rewrite keeps it
        write_model_file(tmp_path / "m", tensors(), {"run": 2})
        assert stat.S_IMODE(Path(path).stat().st_mode) == 0o644
        fresh = write_model_file(tmp_path / "n", tensors(), {})
        assert stat.S_IMODE(Path(fresh).stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_model_file_lock_serialises_writers(model: Path) -> None:
    import threading
    import time

    from defectscope.detector.model_file import model_file_lock

    file = resolve_model_path(model)
    inside: list[int] = []
    overlaps: list[int] = []

    def writer(i: int) -> None:
        with model_file_lock(file):  # a lock file of its own: each holds its own descriptor
            inside.append(i)
            if len(inside) > 1:
                overlaps.append(i)
            time.sleep(0.05)
            inside.remove(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == []
    assert (file.parent / f".{file.name}.lock").exists()
