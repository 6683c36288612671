"""Object-store URIs (``s3://``, ``gs://``, any fsspec protocol) for datasets, models and reports.

Only the edges use this module: the CLI, the model file reader/writer and the runtime loader turn
a URI into a local path (``localize``) before the core sees it, and upload what the core wrote
(``staged_output``, ``upload_dir``). Scoring, datasets and reports keep working on local files,
so there is one code path for remote and local data.

Remote reads are cached under ``$DEFECTSCOPE_CACHE_DIR`` (default ``~/.cache/defectscope``),
one folder per remote folder, with a manifest of each object's etag / mtime and size: a repeated
run lists the objects and downloads only what changed.

fsspec and the protocol packages (``s3fs``, ``gcsfs``) are the optional ``cloud`` extra; local
paths never import them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from defectscope.errors import DefectscopeError

CLOUD_EXTRA = "pip install 'defectscope[cloud]'"
PROTOCOL_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
# pathlib folds "s3://bucket/key" into "s3:/bucket/key", and Typer and pydantic hand us Path
# objects; for these well-known schemes a single slash still means a URI.
FOLDED_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"})
BUCKET_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs"})
CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run 'gcloud auth application-default login'",
}
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]+):(?P<slashes>/+)(?P<rest>.*)$", re.S)
_GLOB_CHARS = re.compile(r"[*?\[]")
MANIFEST_NAME = ".defectscope-manifest.json"


class StorageError(DefectscopeError):
    """A remote URI could not be read or written; the message names it and the reason."""


# ------------------------------------------------------------------------------------ names
def as_uri(value: str | os.PathLike[str]) -> str | None:
    """``value`` as a canonical ``scheme://...`` URI, or None when it is a local path."""
    match = _URI.match(os.fspath(value))
    if match is None:
        return None
    scheme = match["scheme"].lower()
    if scheme == "file":
        return None
    if len(match["slashes"]) == 1 and scheme not in FOLDED_SCHEMES:
        return None
    return f"{scheme}://{match['rest']}"


def is_remote(value: str | os.PathLike[str]) -> bool:
    """True for an object-store / fsspec URI, False for a local path (or ``file://``)."""
    return as_uri(value) is not None


def location(value: str | os.PathLike[str]) -> str | Path:
    """A remote URI as its canonical string, a local path as a Path (``file://`` stripped)."""
    uri = as_uri(value)
    if uri is not None:
        return uri
    text = os.fspath(value)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def join(base: str | os.PathLike[str], name: str) -> str | Path:
    """``name`` below ``base``: a Path inside a local folder, a URI below a remote one."""
    target = location(base)
    if isinstance(target, Path):
        return target / name
    return f"{target.rstrip('/')}/{name}"


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0]


def _filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem for ``uri`` and the path inside it; missing packages named."""
    scheme = _scheme(uri)
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise StorageError(f"{uri}: object-store URIs need fsspec: {CLOUD_EXTRA}") from None
    try:
        fs, path = url_to_fs(uri)
    except ImportError:
        package = PROTOCOL_PACKAGES.get(scheme, f"the fsspec package for {scheme}://")
        raise StorageError(f"{uri}: {scheme}:// needs {package}: {CLOUD_EXTRA}") from None
    except ValueError as exc:
        raise StorageError(f"{uri}: unsupported storage scheme {scheme}:// ({exc})") from None
    return fs, path.rstrip("/")


@contextmanager
def _translated_errors(uri: str, action: str) -> Iterator[None]:
    """Turn the many exception types of fsspec back ends into one clear StorageError."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        reason = _reason(exc)
        if _scheme(uri) in BUCKET_SCHEMES and "bucket" in reason.lower():
            bucket = uri.split("://", 1)[1].split("/", 1)[0]
            reason = f"bucket {bucket!r} does not exist"
        raise StorageError(f"{uri}: not found ({reason})") from None
    except PermissionError as exc:
        raise StorageError(f"{uri}: access denied, cannot {action} ({_reason(exc)})") from None
    except Exception as exc:
        # botocore's NoCredentialsError / PartialCredentialsError, google-auth's
        # DefaultCredentialsError: matched by name so that neither package must be installed.
        if "Credentials" in type(exc).__name__:
            scheme = _scheme(uri).rstrip("a").replace("gcs", "gs")
            hint = CREDENTIAL_HINTS.get(scheme, "configure credentials for this store")
            raise StorageError(f"{uri}: no credentials to {action} it; {hint}") from None
        if isinstance(exc, OSError):
            raise StorageError(f"{uri}: cannot {action}: {_reason(exc)}") from None
        raise


def _reason(exc: BaseException) -> str:
    text = str(exc.args[-1] if isinstance(exc, OSError) and exc.args else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _missing(fs: Any, uri: str, path: str) -> StorageError:
    """Not found: say whether the bucket itself is missing, the commonest typo."""
    if _scheme(uri) in BUCKET_SCHEMES:
        bucket = path.split("/", 1)[0]
        try:
            bucket_exists = fs.exists(bucket)
        except Exception:
            bucket_exists = True  # unknown: fall back to the generic message
        if not bucket_exists:
            return StorageError(f"{uri}: not found (bucket {bucket!r} does not exist)")
    return StorageError(f"{uri}: not found (no such object, folder or matching objects)")


# ------------------------------------------------------------------------------------ reads
def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole content of a remote object or a local file."""
    target = location(uri)
    if isinstance(target, Path):
        return target.read_bytes()
    fs, path = _filesystem(target)
    with _translated_errors(target, "read"):
        return fs.cat_file(path)


@contextmanager
def open_uri(uri: str | os.PathLike[str], mode: str = "rb") -> Iterator[Any]:
    """A file object for a remote object or a local file (writes land when it closes)."""
    target = location(uri)
    if isinstance(target, Path):
        with target.open(mode) as handle:
            yield handle
        return
    fs, path = _filesystem(target)
    with _translated_errors(target, "write" if "w" in mode else "read"):
        handle = fs.open(path, mode)
    try:
        yield handle
    finally:
        with _translated_errors(target, "write" if "w" in mode else "read"):
            handle.close()


def glob(pattern: str | os.PathLike[str]) -> list[str]:
    """Objects (not folders) matching ``pattern``, as URIs or local paths, sorted."""
    target = location(pattern)
    if isinstance(target, Path):
        return sorted(str(p) for p in Path().glob(str(target)) if p.is_file())
    fs, path = _filesystem(target)
    with _translated_errors(target, "list"):
        fs.invalidate_cache()
        found = fs.glob(path, detail=True)
    scheme = _scheme(target)
    return sorted(f"{scheme}://{name}" for name, info in found.items() if _is_file(info))


def _is_file(info: dict[str, Any]) -> bool:
    return info.get("type") == "file" and not str(info.get("name", "")).endswith("/")


def _fingerprint(info: dict[str, Any]) -> str:
    """What changes when an object changes: its etag (or generation) or mtime, and size."""
    version = next(
        (info[k] for k in ("ETag", "etag", "md5Hash", "generation", "crc32c") if info.get(k)), ""
    )
    when = next(
        (info[k] for k in ("LastModified", "mtime", "updated", "last_modified") if info.get(k)), ""
    )
    return f"{info.get('size')}|{version}|{when}"


def _listing(fs: Any, uri: str, path: str) -> tuple[str, dict[str, str], bool]:
    """(root folder, {path below root: fingerprint}, complete) for a file, folder or glob.

    ``complete`` is True for a folder: every object below root was listed, so local files that
    are not in the listing are stale.
    """
    fs.invalidate_cache()  # another process may have written since this one last listed
    if _GLOB_CHARS.search(path):
        root = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        found = fs.glob(path, detail=True)
        complete = False
    elif fs.isfile(path):
        root = path.rsplit("/", 1)[0]
        found = {path: fs.info(path)}
        complete = False
    else:
        root = path
        found = fs.find(path, detail=True)
        complete = True
    entries = {
        name[len(root) :].lstrip("/"): _fingerprint(info)
        for name, info in found.items()
        if _is_file(info) and name.startswith(root)
    }
    if not entries:
        raise _missing(fs, uri, path)
    return root, entries, complete


def cache_root() -> Path:
    """Where remote datasets and models are cached (``$DEFECTSCOPE_CACHE_DIR`` overrides)."""
    configured = os.environ.get("DEFECTSCOPE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "defectscope"


def localize(uri: str | os.PathLike[str], cache_dir: str | Path | None = None) -> Path:
    """A local path holding ``uri``: a local path unchanged, a remote object or folder
    downloaded into the cache (only the objects whose etag / mtime / size changed).

    A folder comes back as a local folder with the same tree; a file as a file inside the local
    copy of its folder, so that siblings fetched later (an OpenVINO ``.bin`` next to its
    ``.xml``) land beside it. For a glob use :func:`localize_matches`.
    """
    target = location(uri)
    if isinstance(target, Path):
        return target
    if _GLOB_CHARS.search(target.split("://", 1)[1]):
        # Callers that take patterns (predict's inputs) use localize_matches.
        raise StorageError(f"{target}: a pattern is not accepted here; give a folder or a file")
    return _fetch(target, cache_dir)[0]


def localize_matches(
    uri: str | os.PathLike[str], cache_dir: str | Path | None = None
) -> list[Path]:
    """Local paths for a file, folder or glob: ``[file]``, ``[folder]`` or the matched files
    (local paths and patterns are returned as they are; a shell or ``Path.glob`` expands those)."""
    target = location(uri)
    if isinstance(target, Path):
        return [target]
    local, matched = _fetch(target, cache_dir)
    return matched if _GLOB_CHARS.search(target.split("://", 1)[1]) else [local]


def _fetch(target: str, cache_dir: str | Path | None) -> tuple[Path, list[Path]]:
    """Sync ``target`` into the cache: (local path of target, local paths of its objects)."""
    fs, path = _filesystem(target)
    with _translated_errors(target, "read"):
        root, entries, complete = _listing(fs, target, path)
        scheme = _scheme(target)
        key = hashlib.sha256(f"{scheme}://{root}".encode()).hexdigest()[:24]
        entry_dir = Path(cache_dir) if cache_dir is not None else cache_root()
        entry_dir = entry_dir / "remote" / key
        local_root = entry_dir / (root.rsplit("/", 1)[-1] or "root")
        _sync(fs, root, entries, complete, local_root, entry_dir / MANIFEST_NAME)
    matched = sorted(local_root / rel for rel in entries)
    if root == path or _GLOB_CHARS.search(path):
        return local_root, matched
    return local_root / path[len(root) :].lstrip("/"), matched


def _sync(
    fs: Any,
    root: str,
    entries: dict[str, str],
    complete: bool,
    local_root: Path,
    manifest_path: Path,
) -> None:
    """Download the objects of ``entries`` whose fingerprint differs from the manifest's."""
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if not isinstance(manifest, dict):
        manifest = {}
    stale = [
        rel
        for rel, fingerprint in entries.items()
        if manifest.get(rel) != fingerprint or not (local_root / rel).is_file()
    ]
    if not stale and not complete:
        return
    local_root.mkdir(parents=True, exist_ok=True)
    # Dropped before downloading and rewritten last: a run killed half-way leaves no manifest
    # that would vouch for a half-written cache.
    manifest_path.unlink(missing_ok=True)
    for rel in stale:
        destination = local_root / rel
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(f"{destination.name}.{os.getpid()}.part")
        fs.get_file(f"{root}/{rel}", str(partial))
        os.replace(partial, destination)
        manifest[rel] = entries[rel]
    if complete:
        for local in [p for p in local_root.rglob("*") if p.is_file()]:
            rel = local.relative_to(local_root).as_posix()
            if rel not in entries:
                local.unlink()
                manifest.pop(rel, None)
    manifest_path.write_text(json.dumps(manifest, sort_keys=True))


# ----------------------------------------------------------------------------------- writes
def check_destination(uri: str | os.PathLike[str]) -> None:
    """Fail early (before a long fit) when a remote destination's bucket does not exist."""
    target = location(uri)
    if isinstance(target, Path) or _scheme(target) not in BUCKET_SCHEMES:
        return
    fs, path = _filesystem(target)
    bucket = path.split("/", 1)[0]
    with _translated_errors(target, "write"):
        fs.invalidate_cache()
        if not fs.exists(bucket):
            raise StorageError(f"{target}: cannot write, bucket {bucket!r} does not exist")


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a local path or a remote object (or folder prefix) exists."""
    target = location(uri)
    if isinstance(target, Path):
        return target.exists()
    fs, path = _filesystem(target)
    with _translated_errors(target, "read"):
        fs.invalidate_cache()
        return bool(fs.exists(path))


def remove(uri: str | os.PathLike[str]) -> None:
    """Delete a file or a folder tree, local or remote; nothing there is not an error."""
    target = location(uri)
    if isinstance(target, Path):
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        return
    fs, path = _filesystem(target)
    with _translated_errors(target, "delete"):
        fs.invalidate_cache()
        if fs.exists(path):
            fs.rm(path, recursive=True)
        fs.invalidate_cache()


def upload_file(local: str | Path, uri: str | os.PathLike[str]) -> str:
    """Copy one local file to ``uri`` (an object key); returns the URI."""
    target = location(uri)
    if isinstance(target, Path):
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)
        return str(target)
    fs, path = _filesystem(target)
    with _translated_errors(target, "write"):
        fs.put_file(str(local), path)
    return target


def upload_dir(local: str | Path, uri: str | os.PathLike[str]) -> str:
    """Copy a local folder's files to ``uri`` (the folder's tree below it); returns the URI."""
    local = Path(local)
    target = location(uri)
    if isinstance(target, Path):
        shutil.copytree(local, target, dirs_exist_ok=True)
        return str(target)
    check_destination(target)
    fs, path = _filesystem(target)
    with _translated_errors(target, "write"):
        # File by file: fsspec's recursive put nests or flattens depending on trailing slashes
        # and on whether the destination exists; explicit keys are the same on every back end.
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")
        fs.invalidate_cache()
    return target


@contextmanager
def staged_output(uri: str | os.PathLike[str]) -> Iterator[Path]:
    """A local folder to write into; for a remote ``uri``, uploaded there when the block ends
    without an error (a failed run uploads nothing)."""
    target = location(uri)
    if isinstance(target, Path):
        yield target
        return
    check_destination(target)
    staging = Path(tempfile.mkdtemp(prefix="defectscope-upload-"))
    try:
        yield staging
        upload_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def output_location(
    uri: str | os.PathLike[str], local_root: Path, written: str | os.PathLike[str]
) -> str | Path:
    """Where ``written``, a file under the local folder of ``staged_output(uri)``, ends up:
    itself for a local ``uri``, its URI below ``uri`` once a remote one is uploaded."""
    if not is_remote(uri):
        return location(written)
    return join(uri, Path(written).relative_to(local_root).as_posix())


def check_output_folder(uri: str | os.PathLike[str], label: str) -> None:
    """A local output folder must be a folder or not exist yet: refused before any work.

    ``label`` names the setting in the message (e.g. an option). Remote stores have no files
    that could stand in a folder's way.
    """
    path = location(uri)
    if not isinstance(path, Path):
        return
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "" if candidate == path else f" (inside {candidate}, a file)"
                raise DefectscopeError(f"{label} {uri}: not a folder{where}")
            _check_writable(candidate, f"{label} {uri}")
            return


def _check_writable(folder: Path, what: str) -> None:
    """Create and remove a folder in ``folder``: the one test that a later mkdir or write
    there will work (permissions, read-only mounts, pseudo file systems)."""
    try:
        probe = tempfile.mkdtemp(prefix=".defectscope-probe-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DefectscopeError(f"{what}: cannot write in {folder} ({reason})") from None
    os.rmdir(probe)


def remove_outputs(folder: str | os.PathLike[str], names: tuple[str, ...]) -> list[str]:
    """Delete the files or folders ``names`` below ``folder``; returns those that were there."""
    removed = []
    for name in names:
        item = join(folder, name)
        if exists(item):
            remove(item)
            removed.append(name)
    return removed
