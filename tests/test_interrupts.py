"""Stop signals and sweeps that stop early: SIGTERM (SLURM's time limit, scancel) and SIGINT to
a real run take the failure path; a sweep that aborts while being set up, or is stopped, marks
its parent run FAILED with its cell counts."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import TINY_RUN, app_command, run_app, runs_by_cell, sweep_dir


def wait_for_line(folder: Path, pattern: str, text: str, proc: subprocess.Popen) -> Path:
    """Block until a log ``folder.glob(pattern)`` holds ``text`` (the job reached that point);
    fail if the job ends first. Returns the log's path."""
    while proc.poll() is None:
        for log in folder.glob(pattern):
            if text in log.read_text():
                return log
        time.sleep(0.05)
    pytest.fail(f"the job ended (status {proc.returncode}) before logging {text!r}: {proc.stderr.read()[-3000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_marks_the_run_failed(tmp_path, signum):
    # the whole training set: sampling pca_locality takes seconds, so the signal lands in the work
    command, env = app_command(["model=pca_locality", "hardware=cpu", "sampler.num_samples=8"], tmp_path)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = wait_for_line(tmp_path / "outputs" / "runs", "*/*/run.log", "dataset fashion_mnist/train: 60000 images",
                            proc)
        proc.send_signal(signum)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    name = signal.Signals(signum).name
    stderr = proc.stderr.read()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert f"stopped by {name}" in stderr and "Traceback" not in stderr
    status = json.loads((log.parent / "status.json").read_text())
    assert status["status"] == "failed" and f"stopped by {name}" in status["error"]
    assert not (log.parent / "metrics.json").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("locality").experiment_id])
    assert run.info.status == "FAILED" and f"stopped by {name}" in run.data.tags["error"]
    assert run.info.run_id == status["run_id"]


def listed(tmp: Path) -> str:
    from locality.compare import main

    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert main(["--list", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]) == 0
    return text.getvalue()


def test_a_sweep_with_a_bad_cell_marks_its_parent_failed(tmp_path):
    # the second cell's override is no config of the group: Hydra stops the sweep while composing it
    proc = run_app(["--multirun", "model=wiener,wienerr", *TINY_RUN, "hardware=cpu"], tmp_path)
    assert proc.returncode != 0 and "wienerr" in proc.stderr
    _, (parent,), _ = runs_by_cell(tmp_path)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["cells"] == "2" and "stopped before all cells had run" in parent.data.tags["error"]
    assert f"cells=2 failed={parent.data.tags['failed_cells']}" in listed(tmp_path)


def test_a_sweep_that_cannot_be_submitted_marks_its_parent_failed(tmp_path):
    # hardware=slurm where no cluster answers: sbatch fails (or is missing) at submission
    proc = run_app(["--multirun", "hardware=slurm", "model=wiener,nearest_dataset", *TINY_RUN], tmp_path,
                   env={"SLURM_CONF": str(tmp_path / "no_cluster.conf")})
    assert proc.returncode != 0
    _, (parent,), children = runs_by_cell(tmp_path)
    assert parent.info.status == "FAILED" and not children
    assert parent.data.tags["cells"] == "2" and parent.data.tags["failed_cells"] == "2"
    assert "cells=2 failed=2" in listed(tmp_path)


def test_a_stopped_sweep_marks_its_cell_and_parent_failed(tmp_path):
    command, env = app_command(["--multirun", "model=pca_locality,wiener", "hardware=cpu", "sampler.num_samples=8"],
                               tmp_path)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        log = wait_for_line(tmp_path / "outputs" / "multiruns", "*/*/0_*/run.log",
                            "dataset fashion_mnist/train: 60000 images", proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    status = json.loads((log.parent / "status.json").read_text())
    assert "stopped by SIGTERM" in status["error"]
    assert not (sweep_dir(tmp_path) / "1_wiener_fashion_mnist").exists()  # the sweep stopped
    _, (parent,), (child,) = runs_by_cell(tmp_path)
    assert child.info.status == "FAILED" and "SIGTERM" in child.data.tags["error"]
    assert parent.info.status == "FAILED" and "stopped by SIGTERM" in parent.data.tags["error"]
    assert parent.data.tags["cells"] == "2" and parent.data.tags["failed_cells"] == "2"
