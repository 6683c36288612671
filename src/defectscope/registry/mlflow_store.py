"""The registry on MLflow's model registry (the "tracking" extra).

A version is an MLflow model version whose source is a run's ``model`` artefact folder (the
model file and, when attached, ``report.json``); stages are aliases (``models:/NAME@production``
works in MLflow's own tools); lineage is the version tag ``defectscope.lineage`` (JSON); each
stage's earlier holders and the history of stage changes are registered-model tags, so that
rollback works the same as in the folder registry.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from defectscope.registry.base import (
    MAX_STAGE_HISTORY,
    ModelVersion,
    Registry,
    RegistryError,
    check_name,
    check_stage,
    prepare_registration,
    read_report,
)

EXPERIMENT = "defectscope-registry"
LINEAGE_TAG = "defectscope.lineage"
HOLDERS_TAG = "defectscope.holders"
HISTORY_TAG = "defectscope.stage_history"
# MLflow caps tag values (5000 characters on most stores): keep the newest events.
MAX_HISTORY_EVENTS = 30


class MlflowRegistry(Registry):
    """A registry on the MLflow tracking/registry store at ``tracking_uri``."""

    def __init__(self, tracking_uri: str) -> None:
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise RegistryError(
                "an MLflow registry needs mlflow: pip install 'defectscope[tracking]'"
            ) from None
        self.uri = f"mlflow:{tracking_uri}"
        self.tracking_uri = tracking_uri
        # MLflow retries an unreachable server for minutes; the first contact fails fast.
        quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
        added = [key for key in quick if key not in os.environ]
        os.environ.update({key: quick[key] for key in added})
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            self.client.search_registered_models(max_results=1)
        except Exception as exc:
            raise RegistryError(f"MLflow registry {tracking_uri}: {first_line(exc)}") from None
        finally:
            for key in added:
                os.environ.pop(key, None)

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run an MLflow call; its errors become one-line RegistryErrors."""
        from mlflow.exceptions import MlflowException

        try:
            return function(*args, **kwargs)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise RegistryError(f"{what}: not found in {self.uri}") from None
            raise RegistryError(f"{what}: {first_line(exc)}") from None
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{what}: {first_line(exc)}") from None

    def _model(self, name: str) -> Any:
        return self._call(
            f"no model named {name!r}", self.client.get_registered_model, check_name(name)
        )

    def names(self) -> list[str]:
        found = self._call("list models", self.client.search_registered_models, max_results=1000)
        return sorted(model.name for model in found)

    def versions(self, name: str) -> list[ModelVersion]:
        model = self._model(name)
        stages_of: dict[int, list[str]] = {}
        for stage, number in (model.aliases or {}).items():
            stages_of.setdefault(int(number), []).append(stage)
        found = self._call(
            f"versions of {name}", self.client.search_model_versions, f"name='{name}'"
        )
        out = []
        for item in sorted(found, key=lambda v: int(v.version)):
            tags = item.tags or {}
            lineage = json.loads(tags.get(LINEAGE_TAG, "{}"))
            out.append(
                ModelVersion(
                    name=name,
                    version=int(item.version),
                    created_at=datetime.fromtimestamp(item.creation_timestamp / 1000, UTC)
                    .isoformat(timespec="seconds"),
                    source=tags.get("defectscope.source", item.source),
                    stages=sorted(stages_of.get(int(item.version), [])),
                    lineage=lineage,
                    has_report=tags.get("defectscope.has_report") == "true",
                )
            )  # fmt: skip
        return out

    def _download(self, name: str, version: int, target: Path) -> Path:
        import mlflow.artifacts

        item = self._call(
            f"{name}@{version}", self.client.get_model_version, check_name(name), str(version)
        )
        return Path(
            self._call(
                f"download {name}@{version}",
                mlflow.artifacts.download_artifacts,
                artifact_uri=item.source,
                dst_path=str(target),
                tracking_uri=self.tracking_uri,
            )
        )

    def local_model(self, name: str, version: int) -> Path:
        from defectscope import storage

        # Versions never change once registered, so a cached copy stays valid.
        cached = storage.cache_root() / "registry" / name / str(version)
        model = cached / "model" / "model.safetensors"
        if model.is_file():
            return model
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=_mkdir(cached.parent)))
        try:
            folder = self._download(name, version, staging)
            if not (folder / "model.safetensors").is_file():
                raise RegistryError(f"{name}@{version}: its artefacts hold no model.safetensors")
            with contextlib.suppress(OSError):  # another process cached it first: keep that
                staging.replace(cached)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return model

    def report(self, name: str, version: int) -> dict[str, Any] | None:
        if not self.get(name, version).has_report:
            return None
        path = self.local_model(name, version).parent / "report.json"
        return read_report(path) if path.is_file() else None

    def register(
        self,
        name: str,
        model_path: str | Path,
        *,
        parent: str | None = None,
        stage: str | None = None,
        report: str | Path | dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> int:
        prepared = prepare_registration(
            name, model_path, parent=parent, stage=stage, report=report, lineage=lineage
        )
        source, found, attached = prepared.source, prepared.lineage, prepared.report
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise RegistryError(f"register {name}: {exc.message.splitlines()[0]}") from None
        experiment = self._call("find experiment", self.client.get_experiment_by_name, EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._call(
                "create experiment",
                self.client.create_experiment,
                EXPERIMENT,
                artifact_location=artifact_root(self.tracking_uri),
            )
        )
        run = self._call("start run", self.client.create_run, experiment_id, run_name=name)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            shutil.copyfile(source, folder / "model.safetensors")
            if attached is not None:
                (folder / "report.json").write_text(json.dumps(attached), encoding="utf-8")
            self._call(
                "upload model", self.client.log_artifacts, run.info.run_id, str(folder), "model"
            )
        self._call("end run", self.client.set_terminated, run.info.run_id)
        tags = {
            LINEAGE_TAG: json.dumps(found, sort_keys=True, default=str)[:5000],
            "defectscope.source": str(source.resolve()),
            "defectscope.has_report": "true" if attached is not None else "false",
        }
        item = self._call(
            f"register {name}",
            self.client.create_model_version,
            name,
            f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags=tags,
        )
        number = int(item.version)
        if stage is not None:
            self._move_stage(name, number, stage, "register")
        return number

    def _tags(self, name: str) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
        tags = self._model(name).tags or {}
        return json.loads(tags.get(HOLDERS_TAG, "{}")), json.loads(tags.get(HISTORY_TAG, "[]"))

    def stage_history(self, name: str) -> list[dict[str, Any]]:
        return self._tags(name)[1]

    def set_stage(self, name: str, version: int, stage: str) -> None:
        check_stage(stage)
        self.get(name, version)
        self._move_stage(name, version, stage, "promote")

    def _move_stage(self, name: str, version: int, stage: str, action: str) -> None:
        current = (self._model(name).aliases or {}).get(stage)
        current = int(current) if current is not None else None
        if current == version:
            return
        holders, history = self._tags(name)
        kept = [v for v in holders.get(stage, []) if v != version]
        holders[stage] = [*kept, version][-MAX_STAGE_HISTORY:]
        self._call(
            f"set {stage}", self.client.set_registered_model_alias, name, stage, str(version)
        )
        self._save_tags(name, holders, history, action, stage, version, current)

    def _save_tags(
        self,
        name: str,
        holders: dict[str, list[int]],
        history: list[dict[str, Any]],
        action: str,
        stage: str,
        version: int,
        previous: int | None,
    ) -> None:
        event = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "action": action,
                 "stage": stage, "version": version, "previous": previous}  # fmt: skip
        history = [*history, event][-MAX_HISTORY_EVENTS:]
        set_tag = self.client.set_registered_model_tag
        self._call("save stage holders", set_tag, name, HOLDERS_TAG, json.dumps(holders))
        self._call("save stage history", set_tag, name, HISTORY_TAG, json.dumps(history))

    def rollback(self, name: str, stage: str) -> int:
        check_stage(stage)
        current = (self._model(name).aliases or {}).get(stage)
        if current is None:
            raise RegistryError(f"{name}: no version holds the stage {stage!r}")
        holders, history = self._tags(name)
        stack = holders.get(stage, [])
        if len(stack) < 2:
            raise RegistryError(f"{name}: no earlier version held {stage!r} to roll back to")
        stack.pop()
        previous = stack[-1]
        holders[stage] = stack
        self._call(
            f"set {stage}", self.client.set_registered_model_alias, name, stage, str(previous)
        )
        self._save_tags(name, holders, history, "rollback", stage, previous, int(current))
        return previous


def first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def artifact_root(uri: str) -> str | None:
    """For a SQLite store, ``mlruns/`` beside the database (MLflow would use the cwd's)."""
    database = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    if database in ("", ":memory:"):
        return None
    return (Path(database).expanduser().resolve().parent / "mlruns").as_uri()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
