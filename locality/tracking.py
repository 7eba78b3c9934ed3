"""MLflow for the entry points: store preparation, one run per job, FAILED on error.

Only entry points import this module (it imports mlflow); the math core never does.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

# MLflow 3.17's telemetry thread, failing to reach the internet, intermittently breaks the
# client's requests on offline nodes; an explicit MLFLOW_DISABLE_TELEMETRY=false still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on one param value


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'model': {'name': 'x'}} -> {'model.name': 'x'} with values as strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:_MAX_PARAM_LEN]
    return flat


def _artifact_uri(location: str | None, tracking_uri: str) -> str | None:
    """A file URI for a local store; None (the server decides) for a tracking server."""
    if not location or tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    if "://" in location:
        return location
    return Path(location).resolve().as_uri()


def prepare_store(uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """Create the store's schema and the experiment if needed (before any job fans out:
    concurrent jobs on a fresh SQLite file fail on MLflow's schema creation). Returns the id."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=_artifact_uri(artifact_location, uri))
    except mlflow.exceptions.MlflowException:
        found = client.get_experiment_by_name(experiment)  # created by a concurrent job
        if found is None:
            raise
        return found.experiment_id


class TrackedRun:
    """One MLflow run, or a no-op when tracking is disabled. Used as a context manager; an
    exception inside marks the run FAILED with the error as a tag."""

    def __init__(self, enabled: bool, uri: str, experiment: str, run_name: str,
                 artifact_location: str | None = None, tags: Mapping[str, str] | None = None,
                 parent_run_id: str | None = None) -> None:
        self.enabled = enabled
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        if not enabled:
            return
        experiment_id = prepare_store(uri, experiment, artifact_location)
        self.client = MlflowClient(tracking_uri=uri)
        all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        self.run_id = run.info.run_id
        self.uri = uri
        log.info("MLflow run %s (%s) in experiment %r at %s", run_name, self.run_id, experiment, uri)

    def __enter__(self) -> "TrackedRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.enabled:
            return False
        if exc is None:
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FINISHED))
        else:
            message = f"{type(exc).__name__}: {exc}"
            self.client.set_tag(self.run_id, "error", message[:5000])
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FAILED))
        return False

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow accepts 100 params per batch
            batch = [mlflow.entities.Param(k, str(v)) for k, v in items[i : i + 100]]
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        import time

        stamp = int(time.time() * 1000)
        batch = [
            mlflow.entities.Metric(k, float(v), stamp, step or 0)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        ]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def iter_runs(uri: str, experiment: str, filter_string: str = "") -> Iterator[Any]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return iter(())
    return iter(client.search_runs([exp.experiment_id], filter_string=filter_string))
