"""MLflow: every training run tracked, bundles registered, ``champion`` promoted only when better.

Defaults work offline: a sqlite tracking and registry store (``sqlite:///mlflow.db`` in the
working directory) with artifacts next to it (``mlartifacts/``). A registered version's source
is the bundle directory logged with its run; ``models:/catstream@champion`` resolves to it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.bundle import BundleConfig
from core.registry import CHAMPION, MODEL_NAME, Registry, mlflow_module

__all__ = ["CHAMPION", "MODEL_NAME", "Tracking"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tracking(Registry):
    """Where runs go: tracking URI (also the registry) and experiment name."""

    experiment: str = "catstream"

    def experiment_id(self) -> str:
        client = self.client()
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.resolved_uri.startswith("sqlite:///"):
            # artifacts beside the database, not in whatever directory a later command runs from
            database = Path(self.resolved_uri.removeprefix("sqlite:///")).resolve()
            location = (database.parent / "mlartifacts").as_uri()
        return client.create_experiment(self.experiment, artifact_location=location)

    def log_training(
        self,
        *,
        options: dict,
        config: BundleConfig,
        bundle_dir: Path,
        report: dict | None,
        report_files: Sequence[Path] = (),
        run_name: str | None = None,
        tags: dict | None = None,
    ) -> str:
        """One MLflow run: resolved config as params, per-epoch metrics, evaluation, the bundle. Returns its id."""
        client = self.client()
        run = client.create_run(
            self.experiment_id(),
            run_name=run_name,
            tags={"catstream.model_version": config.model_version} | (tags or {}),
        )
        run_id = run.info.run_id
        try:
            for key, value in _flatten(options).items():
                client.log_param(run_id, key, str(value)[:6000])
            for record in config.training.history:
                for key, value in record.items():
                    if key != "epoch":
                        client.log_metric(run_id, key, float(value), step=int(record["epoch"]))
            validation = config.training.validation
            for key, value in validation.model_dump(exclude={"parents"}).items():
                if value is not None:
                    client.log_metric(run_id, f"validation_{key}", float(value))
            for key, value in validation.parents.model_dump().items():
                client.log_metric(run_id, f"validation_parent_{key}", float(value))
            client.log_metric(run_id, "threshold", config.threshold)
            if config.parent_threshold is not None:
                client.log_metric(run_id, "parent_threshold", config.parent_threshold)
            client.log_metric(run_id, "temperature", config.temperature)
            client.log_metric(run_id, "training_seconds", config.training.seconds)
            if report is not None:
                for system, result in report["results"].items():
                    client.log_metric(run_id, f"test_{system}_accuracy", result["accuracy"])
                    client.log_metric(run_id, f"test_{system}_macro_f1", result["macro_f1"])
                    at = dict(result.get("at_threshold", {}))
                    parents = at.pop("parents", None)
                    for key, value in at.items():
                        client.log_metric(run_id, f"test_{system}_{key}_at_threshold", float(value))
                    if parents is not None:  # uncertain offers filed under a confident parent category
                        for key in ("offers", "precision", "coverage_with_parents"):
                            client.log_metric(run_id, f"test_{system}_parent_{key}", float(parents[key]))
                for baseline, paired in report.get("paired", {}).items():
                    client.log_metric(run_id, f"test_lead_over_{baseline}", paired["difference"])
                    client.log_metric(run_id, f"test_lead_over_{baseline}_p_value", paired["p_value"])
                    if "by_group" in paired:
                        client.log_metric(
                            run_id, f"test_lead_over_{baseline}_p_value_by_product", paired["by_group"]["p_value"]
                        )
            for path in report_files:
                client.log_artifact(run_id, str(path), artifact_path="evaluation")
            client.log_dict(run_id, config.model_dump(mode="json"), "config.json")
            client.log_artifacts(run_id, str(bundle_dir), artifact_path="bundle")
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        log.info("MLflow run %s in %s", run_id, self.resolved_uri)
        return run_id

    def log_trial(self, *, parent_run_id: str, params: dict, metrics: dict, history: list[dict], name: str) -> str:
        """A nested run for one ``catstream tune`` trial."""
        client = self.client()
        run = client.create_run(self.experiment_id(), run_name=name, tags={"mlflow.parentRunId": parent_run_id})
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        for record in history:
            for key, value in record.items():
                if key != "epoch":
                    client.log_metric(run.info.run_id, key, float(value), step=int(record["epoch"]))
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, float(value))
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def register(self, run_id: str, *, name: str = MODEL_NAME, tags: dict | None = None) -> str:
        """Register the run's ``bundle`` artifact as a new version of ``name``; returns the version."""
        client = self.client()
        mlflow = mlflow_module()
        try:
            client.get_registered_model(name)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(name, description="catstream fusion model bundles")
        source = f"{client.get_run(run_id).info.artifact_uri}/bundle"
        version = client.create_model_version(
            name, source=source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()}
        )
        log.info("registered %s version %s", name, version.version)
        return str(version.version)

    def champion(self, name: str = MODEL_NAME):
        """The version behind the ``champion`` alias, or None."""
        mlflow = mlflow_module()
        try:
            return self.client().get_model_version_by_alias(name, CHAMPION)
        except mlflow.exceptions.MlflowException:
            return None

    def set_champion(self, version: str, name: str = MODEL_NAME) -> None:
        self.client().set_registered_model_alias(name, CHAMPION, version)


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            flat[f"{prefix}{key}"] = json.dumps(list(value))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
