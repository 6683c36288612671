"""A model registry: named, numbered versions with stages, lineage and evaluation reports.

`open_registry` picks the backend from the registry URI: a folder path (the default,
``$DEFECTSCOPE_REGISTRY`` or ``~/.defectscope/registry``) gives the embedded `FolderRegistry`;
``mlflow:TRACKING_URI`` (or a ``sqlite:``, ``postgresql:``, ``http(s):`` tracking URI) gives
the `MlflowRegistry`. `resolve_model_ref` turns ``NAME@REF`` into a local model file wherever a
model path is accepted.
"""

from __future__ import annotations

import os
from pathlib import Path

from defectscope.registry.base import (
    ModelVersion,
    Registry,
    RegistryError,
    ResolvedModel,
    looks_like_ref,
    parse_ref,
)

__all__ = [
    "ModelVersion",
    "Registry",
    "RegistryError",
    "ResolvedModel",
    "default_registry_uri",
    "open_registry",
    "parse_ref",
    "resolve_model_arg",
    "resolve_model_ref",
]

ENV_VAR = "DEFECTSCOPE_REGISTRY"
MLFLOW_MODELS = "models:/"  # MLflow's own model URIs
MLFLOW_SCHEMES = ("sqlite:", "postgresql:", "mysql:", "mssql:", "http:", "https:", "databricks")


def default_registry_uri() -> str:
    """``$DEFECTSCOPE_REGISTRY``, else ``~/.defectscope/registry``."""
    return os.environ.get(ENV_VAR) or str(Path.home() / ".defectscope" / "registry")


def open_registry(uri: str | None = None) -> Registry:
    """The registry at ``uri`` (default: `default_registry_uri`)."""
    uri = uri or default_registry_uri()
    if uri.startswith("mlflow:") or uri.startswith(MLFLOW_SCHEMES):
        from defectscope.registry.mlflow_store import MlflowRegistry

        tracking = uri.removeprefix("mlflow:")
        if not tracking:
            raise RegistryError("mlflow: needs a tracking URI, e.g. mlflow:sqlite:///mlflow.db")
        return MlflowRegistry(tracking)
    from defectscope.registry.folder import FolderRegistry

    return FolderRegistry(uri.removeprefix("file://"))


def resolve_model_ref(
    value: str | Path, registry: str | None = None
) -> tuple[Path | str, ResolvedModel | None]:
    """A model argument -> (the path to load, the registry version or None).

    An existing file or folder, a remote URI or anything that is not ``NAME@REF`` is returned
    as it is; ``NAME@3``, ``NAME@production`` or ``NAME@latest`` is looked up in ``registry``.
    """
    text = str(value)
    if text.startswith(MLFLOW_MODELS):
        return _resolve_mlflow_uri(text, registry)
    if "://" in text or Path(text).exists() or not looks_like_ref(text):
        return value, None
    resolved = open_registry(registry).resolve(text)
    return resolved.path, resolved


def _resolve_mlflow_uri(text: str, registry: str | None) -> tuple[Path, ResolvedModel]:
    """MLflow's own ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``, looked up in the MLflow
    registry given (``mlflow:URI``), else the one ``MLFLOW_TRACKING_URI`` names."""
    ref = text.removeprefix(MLFLOW_MODELS)
    name, slash, version = ref.partition("/")
    if slash:
        if not version.isdigit():
            raise RegistryError(f"{text}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        ref = f"{name}@{version}"
    uri = registry or default_registry_uri()
    if not uri.startswith("mlflow:") and not uri.startswith(MLFLOW_SCHEMES):
        tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
        if not tracking:
            raise RegistryError(
                f"{text} is an MLflow model URI: give the MLflow registry (--registry "
                "mlflow:URI, DEFECTSCOPE_REGISTRY or MLFLOW_TRACKING_URI)"
            )
        uri = f"mlflow:{tracking}"
    resolved = open_registry(uri).resolve(ref)
    return Path(resolved.path), resolved


def resolve_model_arg(value: Path) -> Path:
    """Typer callback for model arguments: ``NAME@REF`` -> the registered model file."""
    resolved, _ = resolve_model_ref(value)
    return Path(resolved)
