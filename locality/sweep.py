"""Sweeps: one MLflow parent run per Hydra multirun, each cell a child run, failures isolated.

The Hydra callback :class:`SweepTracking` (conf/config.yaml, ``hydra.callbacks``) runs in the
launching process:

* ``on_multirun_start`` creates the MLflow schema, the experiment and the parent run before
  any job starts (concurrent jobs on a fresh SQLite file fail on MLflow's schema creation).
  The parent is tagged with the sweep directory; every cell finds it from its own output
  directory, on this machine or on a SLURM node, without any shared process state.
* ``on_multirun_end`` reads every cell's ``status.json``, marks the parent FINISHED or
  FAILED, logs the failed cells with their errors and exits with status 1, after every
  cell had its chance.

A re-run with ``hydra.sweep.dir=<that sweep's dir> sweep.skip_completed=true`` reuses the
parent and runs only the cells without a completed ``status.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SWEEP_DIR_TAG = "locality.sweep_dir"


def cell_status(cell_dir: Path) -> dict[str, Any] | None:
    """The parsed status.json of a cell, or None when the cell never wrote one."""
    path = cell_dir / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_parent_run(uri: str, experiment: str, sweep_dir: Path) -> str | None:
    """The id of the parent run of the sweep in ``sweep_dir`` (None if there is none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{SWEEP_DIR_TAG}` = '{Path(sweep_dir).resolve()}'",
        max_results=1, order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def expected_cells(config: DictConfig) -> list[list[str]]:
    """The override list of every job of this multirun, in job-number order (BasicSweeper)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list(OmegaConf.to_container(config.hydra.overrides.task))
    params_node = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params_node, resolve=False) if params_node is not None else {}
    given = {o.split("=", 1)[0].lstrip("+~") for o in task}
    task += [f"{k}={v}" for k, v in params.items() if k not in given]
    overrides = OverridesParser.create().parse_overrides(task)
    batches = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for batch in batches for job in batch]


def _varying_keys(cells: list[list[str]]) -> set[str]:
    """The override keys whose value differs between cells (what names a cell)."""
    values: dict[str, set[str]] = {}
    for overrides in cells:
        for item in overrides:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return {key for key, seen in values.items() if len(seen) > 1} or set(values)


class SweepTracking(Callback):
    """Parent MLflow run and failure summary of a multirun (see the module docstring)."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None

    @staticmethod
    def _tracking(config: DictConfig) -> DictConfig | None:
        tracking = config.get("tracking")
        return tracking if tracking is not None and tracking.enabled else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        tracking = self._tracking(config)
        if tracking is None:
            return
        from mlflow.tracking import MlflowClient

        from locality.tracking import prepare_store

        experiment_id = prepare_store(str(tracking.uri), str(tracking.experiment),
                                      tracking.get("artifact_location"))
        client = MlflowClient(tracking_uri=str(tracking.uri))
        self.parent_run_id = find_parent_run(str(tracking.uri), str(tracking.experiment), sweep_dir)
        if self.parent_run_id is None:
            name = config.sweep.name or f"{sweep_dir.parent.name}_{sweep_dir.name}"
            run = client.create_run(experiment_id, run_name=str(name), tags={
                SWEEP_DIR_TAG: str(sweep_dir), "locality.sweep": "true",
                "sweep.overrides": " ".join(OmegaConf.to_container(config.hydra.overrides.task)),
            })
            self.parent_run_id = run.info.run_id
            log.info("sweep %s: MLflow parent run %s", name, self.parent_run_id)
        else:
            client.update_run(self.parent_run_id, status="RUNNING")
            log.info("sweep %s: reusing MLflow parent run %s", sweep_dir.name, self.parent_run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        cells = expected_cells(config)
        subdirs = {p.name.split("_", 1)[0]: p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()}
        varying = _varying_keys(cells)
        failed: list[str] = []
        for num, overrides in enumerate(cells):
            cell_dir = subdirs.get(str(num))
            status = cell_status(cell_dir) if cell_dir else None
            if status is None or status.get("status") not in ("completed", "skipped"):
                reason = status.get("error", "failed") if status else "no status.json (the job never finished)"
                label = " ".join(o for o in overrides if o.split("=", 1)[0] in varying)
                failed.append(f"#{num} {label} ({cell_dir or 'no output directory'}): {reason}")
        tracking = self._tracking(config)
        if tracking is not None and self.parent_run_id:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=str(tracking.uri))
            client.set_tag(self.parent_run_id, "cells", str(len(cells)))
            client.set_tag(self.parent_run_id, "failed_cells", str(len(failed)))
            client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")
        if failed:
            rerun = (f"re-run only these cells with the same command plus: hydra.sweep.dir={sweep_dir} "
                     "sweep.skip_completed=true")
            message = f"{len(failed)} of {len(cells)} cells failed:\n  " + "\n  ".join(failed) + "\n" + rerun
            log.error(message)
            # Hydra turns a callback's exceptions into warnings; only SystemExit ends the
            # command with a non-zero status, after every cell has run.
            raise SystemExit(1)
        log.info("sweep %s: all %d cells completed", sweep_dir, len(cells))
