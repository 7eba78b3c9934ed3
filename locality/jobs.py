"""What every entry point does around its work: the resolved config, an MLflow run, metrics.json
and status.json written atomically, the log as an artifact, and one-line errors for bad input."""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NoReturn

from omegaconf import DictConfig, OmegaConf

from locality.atomic import write_json_atomic
from locality.config import ConfigError
from locality.devices import DeviceUnavailableError

log = logging.getLogger(__name__)

# Errors whose message is the whole story (what was wrong, how to fix it): shown without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DeviceUnavailableError, FileNotFoundError, ValueError)

Execute = Callable[[DictConfig, Path, Any], dict[str, Any]]


def run_tracked_job(cfg: DictConfig, out: Path, execute: Execute, *, tags: Mapping[str, Any],
                    artifacts: Iterable[str], log_file: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run ``execute(cfg, out, tracked)`` inside an MLflow run (``cfg.tracking``).

    Writes config.yaml first, metrics.json after success, and status.json either way; logs the
    numeric metrics, the named files/folders of ``out`` and ``log_file`` as artifacts. An
    exception marks the MLflow run FAILED (with the error) and propagates.
    """
    from locality.tracking import TrackedRun, flatten

    out.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    tr = cfg.tracking
    all_tags = {**tags, "output_dir": str(out), **OmegaConf.to_container(tr.tags, resolve=True)}
    with TrackedRun(bool(tr.enabled), str(tr.uri), str(tr.experiment), str(tr.run_name),
                    artifact_location=tr.artifact_location, tags=all_tags,
                    parent_run_id=parent_run_id) as tracked:
        try:
            tracked.log_params(flatten(resolved))
            metrics = execute(cfg, out, tracked)
            write_json_atomic(metrics, out / "metrics.json")
            tracked.log_metrics({k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for item in artifacts:
                tracked.log_artifact(out / item, None if "." in item else item)
        except BaseException as exc:
            write_json_atomic({"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                               "run_id": tracked.run_id}, out / "status.json")
            raise
        finally:
            for handler in logging.getLogger().handlers:
                handler.flush()
            tracked.log_artifact(out / log_file)
        write_json_atomic({"status": "completed", "run_id": tracked.run_id}, out / "status.json")
    return metrics


def exit_for_user_error(app: str, exc: BaseException, out: Path) -> NoReturn:
    """Report bad input in one line (the traceback goes to the log at debug level); exit 2."""
    log.debug("%s", traceback.format_exc())
    logging.getLogger(app).error("%s", exc)
    print(f"\n{app} failed: {exc}\n(outputs and log: {out})", file=sys.stderr)
    raise SystemExit(2) from None
