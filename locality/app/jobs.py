"""What every entry point does around its work: the resolved config, an MLflow run, metrics.json
and status.json written atomically, the log as an artifact, one-line errors for bad input,
SIGTERM/SIGINT taking the failure path, and no silent reuse of a finished run's directory."""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from locality.atomic import DiskFullError, atomic_write, write_json_atomic
from locality.app.config import ConfigError, get_bool
from locality.app.devices import DeviceUnavailableError

log = logging.getLogger(__name__)

# Errors whose message is the whole story (what was wrong, how to fix it): shown without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DeviceUnavailableError, FileNotFoundError, ValueError,
                                                DiskFullError)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # SLURM's time limit and scancel; Ctrl-C

Execute = Callable[[DictConfig, Path, Any], dict[str, Any]]

#: The last stop signal this process received (the sweep's parent run names it).
received_signal: int | None = None


class Interrupted(SystemExit):
    """A stop signal: exits with status 128 + signal number once the job is recorded as failed
    (a SystemExit, so that no ``except Exception`` on the way treats it as a failed cell)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name} (signal {self.signum})"


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` in the main thread (elsewhere: no-op);
    a second signal while the failure is being recorded is logged and ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def already_stopping(signum: int, frame: Any) -> None:
        log.warning("%s received while recording the failure; send SIGKILL to stop at once",
                    signal.Signals(signum).name)

    def stop(signum: int, frame: Any) -> None:
        global received_signal
        received_signal = signum
        for s in STOP_SIGNALS:
            signal.signal(s, already_stopping)
        raise Interrupted(signum)

    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _record_failure(out: Path, exc: BaseException, run_id: str | None) -> None:
    """status.json of a failed job, best effort: on a full disk the error itself must still show."""
    try:
        write_json_atomic({"status": "failed", "error": f"{type(exc).__name__}: {exc}", "run_id": run_id},
                          out / "status.json")
    except Exception as e:  # noqa: BLE001
        log.error("could not write %s (%s: %s)", out / "status.json", type(e).__name__, e)
    if isinstance(exc, Interrupted):
        log.error("%s: the job is marked failed (status.json, MLflow FAILED)", exc)
        print(f"\n{exc}: marked failed (outputs and log: {out})", file=sys.stderr)


def _clear_previous_run(out: Path, artifacts: Iterable[str]) -> None:
    """Remove what an earlier run left in ``out`` (output.overwrite=true, or a sweep cell run
    again), so that a half-finished new run never shows the old run's files as its own."""
    for name in ("status.json", "metrics.json", *artifacts):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def run_tracked_job(cfg: DictConfig, out: Path, execute: Execute, *, tags: Mapping[str, Any],
                    artifacts: Iterable[str], log_file: str, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run ``execute(cfg, out, tracked)`` inside an MLflow run (``cfg.tracking``).

    Writes config.yaml first, metrics.json after success, and status.json either way; logs the
    numeric metrics, the named files/folders of ``out`` and ``log_file`` as artifacts. An
    exception (a stop signal included) marks the MLflow run FAILED (with the error) and
    propagates; a store that cannot be used fails before any work, with status.json only.
    """
    from locality.app.tracking import TrackedRun, flatten

    artifacts = tuple(artifacts)
    with stop_on_signals():
        try:
            out.mkdir(parents=True, exist_ok=True)
            _clear_previous_run(out, (a for a in artifacts if a != "config.yaml"))
            resolved = OmegaConf.to_container(cfg, resolve=True)
            text = OmegaConf.to_yaml(resolved).encode()
            atomic_write(out / "config.yaml", lambda f: f.write(text))
            tr = cfg.tracking
            all_tags = {**tags, "output_dir": str(out), **OmegaConf.to_container(tr.tags, resolve=True)}
            tracked = TrackedRun(get_bool(tr, "enabled", "tracking"), str(tr.uri), str(tr.experiment),
                                 str(tr.run_name), artifact_location=tr.artifact_location, tags=all_tags,
                                 parent_run_id=parent_run_id)
        except BaseException as exc:
            _record_failure(out, exc, None)
            raise
        with tracked:
            try:
                tracked.log_params(flatten(resolved))
                metrics = execute(cfg, out, tracked)
                write_json_atomic(metrics, out / "metrics.json")
                tracked.log_metrics({k: v for k, v in metrics.items()
                                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
                for item in artifacts:
                    tracked.log_artifact(out / item, None if "." in item else item)
            except BaseException as exc:
                _record_failure(out, exc, tracked.run_id)
                _log_artifact_or_warn(tracked, out / log_file)
                raise
            for handler in logging.getLogger().handlers:
                handler.flush()
            tracked.log_artifact(out / log_file)
            write_json_atomic({"status": "completed", "run_id": tracked.run_id}, out / "status.json")
    return metrics


def _log_artifact_or_warn(tracked: Any, path: Path) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    try:
        tracked.log_artifact(path)
    except Exception as e:  # noqa: BLE001 - the job's own error is the one to report
        log.error("could not log %s to MLflow (%s: %s)", path, type(e).__name__, e)


def exit_for_user_error(app: str, exc: BaseException, out: Path) -> NoReturn:
    """Report bad input in one line (the traceback goes to the log at debug level); exit 2."""
    log.debug("%s", traceback.format_exc())
    logging.getLogger(app).error("%s", exc)
    print(f"\n{app} failed: {exc}\n(outputs and log: {out})", file=sys.stderr)
    raise SystemExit(2) from None


def run_or_exit(app: str, work: Callable[[], dict[str, Any]], out: Path) -> dict[str, Any]:
    """``work()`` of a single (not multirun) job; a user error exits 2 with one line."""
    try:
        return work()
    except USER_ERRORS as exc:
        exit_for_user_error(app, exc, out)


def refuse(message: str) -> NoReturn:
    """Stop a Hydra app before any job starts: one line on stderr, exit 2. (Hydra turns a
    callback's exceptions into warnings; only SystemExit stops it.)"""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def holds_finished_run(directory: Path) -> bool:
    return (directory / "status.json").is_file()


class KeepFinishedRuns(Callback):
    """Refuse a run directory (``hydra.run.dir``) or a sweep directory (``hydra.sweep.dir``)
    holding a finished run, before Hydra writes anything into it, unless ``output.overwrite=true``
    (or, for a sweep, ``sweep.skip_completed=true``, which re-runs only what is not done)."""

    @staticmethod
    def _flag(config: DictConfig, key: str) -> bool:
        node_key, _, leaf = key.rpartition(".")
        node = OmegaConf.select(config, node_key)
        if node is None or leaf not in node:
            return False
        try:
            return get_bool(node, leaf, node_key)
        except ConfigError as e:
            refuse(str(e))

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        if holds_finished_run(run_dir) and not self._flag(config, "output.overwrite"):
            refuse(f"hydra.run.dir={run_dir} holds a finished run (its status.json); choose another "
                   f"directory, or add output.overwrite=true to replace that run's outputs")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        if not sweep_dir.is_dir() or self._flag(config, "sweep.skip_completed") or self._flag(config, "output.overwrite"):
            return
        finished = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and holds_finished_run(p))
        if finished:
            refuse(f"hydra.sweep.dir={sweep_dir} holds {len(finished)} finished cell(s) of an earlier sweep "
                   f"({', '.join(finished[:3])}{', …' if len(finished) > 3 else ''}); add sweep.skip_completed=true "
                   f"to run only the cells not done with this config, or output.overwrite=true to run them all again")
