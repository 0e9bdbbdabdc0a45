"""The model registry as serving sees it: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → a
local bundle directory, downloaded from MLflow once and cached.

MLflow is imported only for ``models:/`` URIs (the worker images carry the ``registry`` extra, the
MLflow client alone); a bundle directory needs nothing but the path.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHAMPION", "DEFAULT_TRACKING_URI", "MODEL_NAME", "Registry", "resolve_model_uri"]

log = logging.getLogger(__name__)

CHAMPION = "champion"
MODEL_NAME = "catstream"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODELS_SCHEME = "models:/"


def mlflow_module() -> Any:
    """The ``mlflow`` module, telemetry off (imported here so that nothing else has to)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError as error:
        raise ValueError(
            "models:/ URIs need the MLflow client: install catstream with the 'registry' "
            "(or 'train') extra, or pass a bundle directory"
        ) from error
    return mlflow


@dataclass(frozen=True)
class Registry:
    """An MLflow tracking and registry store (``uri``; default: ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory)."""

    uri: str | None = None

    @property
    def resolved_uri(self) -> str:
        return self.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    def client(self) -> Any:
        mlflow = mlflow_module()
        mlflow.set_tracking_uri(self.resolved_uri)
        mlflow.set_registry_uri(self.resolved_uri)
        return mlflow.MlflowClient(self.resolved_uri, self.resolved_uri)

    def version_of(self, name: str, alias: str) -> str:
        """The version ``alias`` points at; ValueError when none does."""
        mlflow = mlflow_module()
        try:
            return str(self.client().get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException as error:
            raise ValueError(f"no version of {name!r} has the alias {alias!r} in {self.resolved_uri}") from error

    def download(self, name: str, version: str, *, cache_dir: Path | None = None) -> Path:
        """The bundle of ``name`` version ``version`` as a local directory (downloaded once)."""
        mlflow = mlflow_module()
        source = self.client().get_model_version(name, version).source
        cache_dir = cache_dir or Path.home() / ".cache" / "catstream" / "models"
        target = cache_dir / name / str(version)
        if (target / "config.json").is_file():
            return target
        target.mkdir(parents=True, exist_ok=True)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(target), tracking_uri=self.resolved_uri
            )
        )
        return local if (local / "config.json").is_file() else target


def resolve_model_uri(model: str | Path, *, registry: Registry | None = None) -> Path:
    """A bundle directory for ``model``: a path, ``models:/name/version`` or ``models:/name@alias``."""
    model = str(model)
    if not model.startswith(MODELS_SCHEME):
        return Path(model)
    registry = registry or Registry()
    reference = model.removeprefix(MODELS_SCHEME)
    if "@" in reference:
        name, alias = reference.split("@", 1)
        try:
            version = registry.version_of(name, alias)
        except ValueError as error:
            raise ValueError(f"{model}: {error}") from None
    elif "/" in reference:
        name, version = reference.split("/", 1)
    else:
        raise ValueError(f"{model}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    path = registry.download(name, version)
    log.info("%s → version %s → %s", model, version, path)
    return path
