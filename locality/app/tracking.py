"""MLflow for the entry points: the store checked and prepared before any work, one run per job,
FAILED on error.

Before a job logs anything, :func:`open_client` checks the store in seconds and reports a bad
one in one line (:class:`TrackingStoreError`, exit status 2): an SQLite file that cannot be
written, is no database or was left half-migrated, a tracking server that does not answer, a
URI scheme MLflow does not know. Creating or migrating an SQLite store happens under an
exclusive lock on ``<database>.lock`` beside it, so jobs started at once (separate terminals,
sbatch scripts, SLURM array cells on several nodes) never migrate the same file concurrently.

Only the app layer and the entry points import this module (it imports mlflow); the math core
never does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

# MLflow 3.17's telemetry thread, failing to reach the internet, intermittently breaks the
# client's requests on offline nodes; an explicit MLFLOW_DISABLE_TELEMETRY=false still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from locality.app.config import ConfigError  # noqa: E402

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000  # MLflow's limit on one param value
SERVER_TIMEOUT_S = 10.0  # a tracking server that does not answer its health check in this time is down
LOCK_TIMEOUT_S = 300.0  # longest wait for another job's creation or migration of an SQLite store
_READY: set[str] = set()  # stores checked and at MLflow's schema in this process


class TrackingStoreError(ConfigError):
    """The MLflow store named by tracking.uri cannot be used; the message says why and how to fix it."""


_FIX = "fix tracking.uri, or run without tracking (tracking.enabled=false)"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other URIs and in-memory databases)."""
    if not uri.startswith("sqlite:///"):
        return None
    name = uri[len("sqlite:///"):].split("?", 1)[0]
    return None if name in ("", ":memory:") else Path(name).expanduser().absolute()


def _check_sqlite_location(path: Path, uri: str, create: bool) -> None:
    if not create and not path.is_file():
        raise TrackingStoreError(f"no MLflow store at {path} (tracking.uri={uri}); {_FIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrackingStoreError(f"cannot create the folder of the MLflow store {path} ({e.strerror}); {_FIX}") from e
    # SQLite writes its journal beside the database, so the folder must be writable too.
    for target in (path.parent, path):
        if target.exists() and not os.access(target, os.W_OK):
            raise TrackingStoreError(f"the MLflow store {path} is not writable ({target} is read-only); {_FIX}")


def _check_sqlite_schema(path: Path, uri: str) -> None:
    """Refuse a file that is no SQLite database or that an interrupted migration left behind."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=SERVER_TIMEOUT_S) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise TrackingStoreError(f"{path} is not a readable SQLite database ({e}); {_FIX}") from e
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers or (tables and "alembic_version" not in tables):
        what = f"tables {', '.join(leftovers)} of an unfinished migration" if leftovers else "no schema version"
        drops = "; ".join(f"DROP TABLE {t}" for t in leftovers)
        repair = (f"back it up, run sqlite3 {path} '{drops}', then mlflow db upgrade {uri}" if leftovers
                  else f"back it up, then mlflow db upgrade {uri}")
        raise TrackingStoreError(
            f"the MLflow store {path} was left half-migrated ({what}; jobs that created it at the same time "
            f"without a lock, or a migration that was killed): if it holds no runs you need, delete it and run "
            f"again; otherwise {repair}")


def _check_server(uri: str) -> None:
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=SERVER_TIMEOUT_S):
            return
    except urllib.error.HTTPError as e:
        if e.code < 500:  # it answers (an auth proxy may refuse /health): the requests will tell more
            return
        reason = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = str(getattr(e, "reason", e))
    raise TrackingStoreError(
        f"the MLflow tracking server {uri} does not answer ({url}: {reason}, within {SERVER_TIMEOUT_S:g} s); "
        f"start it (scripts/mlflow_server.sh --background …) or {_FIX}")


def _check_scheme(uri: str) -> None:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry
    from mlflow.utils.uri import get_uri_scheme

    known = getattr(_tracking_store_registry, "_registry", None)
    scheme = get_uri_scheme(uri)
    if known is not None and scheme not in known:
        raise TrackingStoreError(
            f"tracking.uri={uri}: MLflow has no tracking store for the scheme {scheme!r} (it knows "
            f"{', '.join(sorted(s for s in known if s))}); {_FIX}")


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on ``<database>.lock`` beside an SQLite store (no-op for other stores)."""
    path = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): MLflow's own creation is all there is
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise TrackingStoreError(f"cannot create the lock file {lock} of the MLflow store ({e.strerror}); {_FIX}") from e
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingStoreError(
                        f"another process has held {lock} for over {LOCK_TIMEOUT_S:g} s (creating or migrating "
                        f"the MLflow store); if no job is running, delete {lock} and run again") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_store(uri: str, create: bool = True) -> None:
    """Fail fast, in one line, on a store that cannot be used (see the module docstring); an
    SQLite file is created only when ``create``."""
    if not uri:
        raise TrackingStoreError(f"tracking.uri is empty; {_FIX}")
    path = sqlite_path(uri)
    if path is not None:
        _check_sqlite_location(path, uri, create)
    elif uri.startswith(("http://", "https://")):
        _check_server(uri)
    else:
        _check_scheme(uri)


def open_client(uri: str, create: bool = True) -> MlflowClient:
    """A client of a store that was checked and is at MLflow's schema (created or migrated under
    :func:`store_lock` on first use); raises :class:`TrackingStoreError` otherwise."""
    if uri in _READY:
        return MlflowClient(tracking_uri=uri)
    check_store(uri, create)
    with store_lock(uri):
        path = sqlite_path(uri)
        if path is not None:
            _check_sqlite_schema(path, uri)
        client = MlflowClient(tracking_uri=uri)
        try:
            client.search_experiments(max_results=1)  # builds the store: creates or checks its schema
        except mlflow.exceptions.MlflowException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingStoreError(f"the MLflow store {uri} cannot be used: {first}") from e
    _READY.add(uri)
    return client


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
    """Check the store, create its schema (:func:`open_client`) and the experiment if needed.
    Returns the experiment's id."""
    client = open_client(uri)
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
            return False
        try:  # the job's own error is what the user must see, even if the store fails now too
            self.client.set_tag(self.run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            self.client.set_terminated(self.run_id, RunStatus.to_string(RunStatus.FAILED))
        except Exception as e:  # noqa: BLE001
            log.error("could not mark the MLflow run %s FAILED (%s: %s)", self.run_id, type(e).__name__, e)
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
