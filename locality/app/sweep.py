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

* A sweep that stops before ``on_multirun_end`` (a Hydra error composing a later cell, a
  submission that fails, a stop signal) still marks its parent FAILED, with the cell counts, at
  the exit of the launching process.

A re-run with ``hydra.sweep.dir=<that sweep's dir> sweep.skip_completed=true`` reuses the
parent and runs only the cells without a completed ``status.json`` whose config.yaml matches
the cell's config now (a cell completed with other values is run again, with a warning).
"""

from __future__ import annotations

import atexit
import json
import logging
import signal
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

SWEEP_DIR_TAG = "locality.sweep_dir"
#: Keys that do not change a cell's results: a completed cell differing only in them is skipped.
UNCOMPARED_KEYS = ("sweep", "progress", "output.overwrite")
_launcher_signals: Any = None  # the stop-signal handlers of the launching process, while a sweep runs


def cell_status(cell_dir: Path) -> dict[str, Any] | None:
    """The parsed status.json of a cell, or None when the cell never wrote one."""
    path = cell_dir / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_changes(cfg: DictConfig, cell_dir: Path, limit: int = 5) -> list[str]:
    """``key: old -> new`` for every value of ``cfg`` that differs from the cell's config.yaml
    (keys of :data:`UNCOMPARED_KEYS` aside); ``["config.yaml unreadable"]`` if it cannot be read."""
    from locality.app.tracking import flatten

    try:
        before = flatten(OmegaConf.to_container(OmegaConf.load(cell_dir / "config.yaml")))
    except Exception:  # noqa: BLE001 - a missing or damaged file: the cell cannot be trusted
        return ["config.yaml unreadable"]
    now = flatten(OmegaConf.to_container(cfg, resolve=True))

    def kept(key: str) -> bool:
        return not any(key == k or key.startswith(k + ".") for k in UNCOMPARED_KEYS)

    changed = [f"{k}: {before.get(k, '(absent)')} -> {now.get(k, '(absent)')}"
               for k in sorted(set(before) | set(now)) if kept(k) and before.get(k) != now.get(k)]
    return changed[:limit] + ([f"… {len(changed) - limit} more"] if len(changed) > limit else [])


def run_cell(cfg: DictConfig, out: Path, run: Callable[[DictConfig, Path, str | None], dict[str, Any]],
             user_errors: tuple[type[BaseException], ...]) -> dict[str, Any] | None:
    """One cell of a sweep: skipped when it completed with this config (sweep.skip_completed),
    else ``run(cfg, out, parent_run_id)``. A failure is logged and gives None, so the other cells
    go on (the sweep's end names it); a stop signal ends the sweep."""
    from locality.app.config import get_bool

    try:
        previous = cell_status(out)
        if get_bool(cfg.sweep, "skip_completed", "sweep") and previous and previous.get("status") == "completed":
            changes = config_changes(cfg, out)
            if not changes:
                log.info("sweep.skip_completed: %s already completed (MLflow run %s), skipped",
                         out.name, previous.get("run_id"))
                return None
            log.warning("sweep.skip_completed: %s completed with another config (%s); running it again",
                        out.name, "; ".join(changes))
        parent_run_id = None
        if get_bool(cfg.tracking, "enabled", "tracking"):
            parent_run_id = find_parent_run(str(cfg.tracking.uri), str(cfg.tracking.experiment), out.parent)
        return run(cfg, out, parent_run_id)
    except Exception as exc:
        log.error("cell failed: %s", exc, exc_info=not isinstance(exc, user_errors))
        return None


def find_parent_run(uri: str, experiment: str, sweep_dir: Path) -> str | None:
    """The id of the parent run of the sweep in ``sweep_dir`` (None if there is none)."""
    from locality.app.tracking import open_client

    client = open_client(uri)
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
        self._ended = True  # nothing to close until on_multirun_start created or reopened a parent

    @staticmethod
    def _tracking(config: DictConfig) -> DictConfig | None:
        tracking = config.get("tracking")
        return tracking if tracking is not None and tracking.enabled else None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        tracking = self._tracking(config)
        if tracking is None:
            return
        from locality.app.jobs import refuse
        from locality.app.tracking import TrackingStoreError, open_client, prepare_store
        from locality.app.sweep_table import sweep_keys_tag

        try:
            experiment_id = prepare_store(str(tracking.uri), str(tracking.experiment),
                                          tracking.get("artifact_location"))
        except TrackingStoreError as e:
            refuse(str(e))
        client = open_client(str(tracking.uri))
        self.parent_run_id = find_parent_run(str(tracking.uri), str(tracking.experiment), sweep_dir)
        if self.parent_run_id is None:
            name = config.sweep.name or f"{sweep_dir.parent.name}_{sweep_dir.name}"
            run = client.create_run(experiment_id, run_name=str(name), tags={
                SWEEP_DIR_TAG: str(sweep_dir), "locality.sweep": "true",
                "sweep.overrides": " ".join(OmegaConf.to_container(config.hydra.overrides.task)),
                "sweep.keys": sweep_keys_tag(expected_cells(config)),  # what locality.compare tabulates
            })
            self.parent_run_id = run.info.run_id
            log.info("sweep %s: MLflow parent run %s", name, self.parent_run_id)
        else:
            client.update_run(self.parent_run_id, status="RUNNING")
            if "error" in client.get_run(self.parent_run_id).data.tags:  # of an earlier, aborted attempt
                client.delete_tag(self.parent_run_id, "error")
            log.info("sweep %s: reusing MLflow parent run %s", sweep_dir.name, self.parent_run_id)
        self._ended = False
        atexit.register(self._fail_if_unfinished, config)
        from locality.app.jobs import stop_on_signals

        # Signals in the launching process take the same path as in a job: Interrupted, then the
        # exit hook below marks the parent FAILED naming the signal. (Kept out of self: the
        # submitit launcher pickles the callbacks, and a context manager holds a generator.)
        global _launcher_signals
        _launcher_signals = stop_on_signals()
        _launcher_signals.__enter__()

    def _summary(self, config: DictConfig) -> tuple[list[list[str]], list[str]]:
        """The cells of this sweep and a line for each one without a completed (or skipped) status."""
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        cells = expected_cells(config)
        subdirs = ({p.name.split("_", 1)[0]: p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()}
                   if sweep_dir.is_dir() else {})
        varying = _varying_keys(cells)
        failed: list[str] = []
        for num, overrides in enumerate(cells):
            cell_dir = subdirs.get(str(num))
            status = cell_status(cell_dir) if cell_dir else None
            if status is None or status.get("status") not in ("completed", "skipped"):
                reason = status.get("error", "failed") if status else "no status.json (the job never finished)"
                label = " ".join(o for o in overrides if o.split("=", 1)[0] in varying)
                failed.append(f"#{num} {label} ({cell_dir or 'no output directory'}): {reason}")
        return cells, failed

    def _close_parent(self, config: DictConfig, cells: list, failed: list, error: str | None = None) -> None:
        tracking = self._tracking(config)
        if tracking is None or not self.parent_run_id:
            return
        from locality.app.tracking import open_client

        client = open_client(str(tracking.uri))
        client.set_tag(self.parent_run_id, "cells", str(len(cells)))
        client.set_tag(self.parent_run_id, "failed_cells", str(len(failed)))
        if error:
            client.set_tag(self.parent_run_id, "error", error[:5000])
        client.set_terminated(self.parent_run_id, "FAILED" if failed or error else "FINISHED")

    def _fail_if_unfinished(self, config: DictConfig) -> None:
        """At the exit of a sweep that never reached on_multirun_end: parent FAILED, cells counted."""
        if self._ended:
            return
        from locality.app import jobs

        try:
            cells, failed = self._summary(config)
        except Exception:  # noqa: BLE001 - the cells could not be listed: the parent is failed anyway
            cells, failed = [], []
        why = (f"stopped by {signal.Signals(jobs.received_signal).name}" if jobs.received_signal
               else "a Hydra error composing a cell, a failed submission or a crash of the launching process; "
                    "see the command's output")
        error = f"the sweep stopped before all cells had run ({why})"
        try:
            self._close_parent(config, cells, failed, error)
            log.error("%s; parent run %s marked FAILED", error, self.parent_run_id)
        except Exception as e:  # noqa: BLE001
            log.error("%s, and the parent run %s could not be marked FAILED (%s)", error, self.parent_run_id, e)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).resolve()
        cells, failed = self._summary(config)
        self._close_parent(config, cells, failed)
        self._ended = True
        global _launcher_signals
        if _launcher_signals is not None:
            _launcher_signals.__exit__(None, None, None)
            _launcher_signals = None
        if failed:
            rerun = (f"re-run only these cells with the same command plus: hydra.sweep.dir={sweep_dir} "
                     "sweep.skip_completed=true")
            message = f"{len(failed)} of {len(cells)} cells failed:\n  " + "\n  ".join(failed) + "\n" + rerun
            log.error(message)
            # Hydra turns a callback's exceptions into warnings; only SystemExit ends the
            # command with a non-zero status, after every cell has run.
            raise SystemExit(1)
        log.info("sweep %s: all %d cells completed", sweep_dir, len(cells))
