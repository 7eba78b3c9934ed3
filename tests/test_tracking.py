"""The MLflow store under concurrent first use, and checked before any work: an SQLite file
created by several processes at once, a half-migrated file, an unwritable path, a server that
is down, an unknown scheme; and locality.compare's arguments."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_app

SMALL = ["model=wiener", "dataset.subset_size=100", "sampler.num_samples=2", "sampler.num_steps=2", "hardware=cpu"]

# Started by each process; it reports "ready" after its imports, then waits for the go file, so
# that all of them open the fresh store at the same moment.
JOB = """
import sys, time
from pathlib import Path
from locality.app.tracking import TrackedRun
uri, go, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
with TrackedRun(True, uri, "locality", name, artifact_location=str(go.parent / "art")) as run:
    run.log_metrics({"value": 1.0})
"""


def test_concurrent_first_use_of_a_fresh_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/fresh.db"
    go = tmp_path / "go"
    env = {"PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen([sys.executable, "-c", JOB, uri, str(go), f"job{i}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for i in range(4)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _ in results), [err[-2000:] for _, err in results]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("locality").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2", "job3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert (tmp_path / "fresh.db.lock").exists()  # the lock beside the database


def failed_status(tmp: Path) -> dict:
    (out,) = (tmp / "outputs" / "runs").glob("*/*")
    assert not (out / "metrics.json").exists()
    return json.loads((out / "status.json").read_text())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr


def test_a_half_migrated_store_is_reported_with_the_repair(tmp_path):
    from locality.app.tracking import open_client

    db = tmp_path / "mlflow.db"
    open_client(f"sqlite:///{db}")
    with sqlite3.connect(db) as con:  # what two unlocked first uses left behind
        con.execute("CREATE TABLE _alembic_tmp_latest_metrics (key VARCHAR(250))")
    proc = run_app(SMALL, tmp_path)
    err = one_line_error(proc)
    assert "half-migrated" in err and "_alembic_tmp_latest_metrics" in err
    assert "DROP TABLE _alembic_tmp_latest_metrics" in err and "mlflow db upgrade" in err
    assert "_alembic_tmp_latest_metrics" in failed_status(tmp_path)["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unwritable sqlite", "server down", "unknown scheme", "not a database"])
def test_a_store_that_cannot_be_used_fails_first_in_one_line(tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    uri, expected = {
        "unwritable sqlite": (f"sqlite:///{blocker}/mlflow.db", "cannot create the folder of the MLflow store"),
        "server down": (f"http://127.0.0.1:{free_port()}", "does not answer"),
        "unknown scheme": ("foo://bar", "no tracking store for the scheme 'foo'"),
        "not a database": (f"sqlite:///{blocker}", "is not a readable SQLite database"),
    }[case]
    proc = run_app([*SMALL, f"tracking.uri={uri}"], tmp_path)
    err = one_line_error(proc)
    assert expected in err and "tracking.enabled=false" in err
    status = failed_status(tmp_path)
    assert status["status"] == "failed" and expected in status["error"] and status["run_id"] is None
    assert not list((tmp_path / "outputs" / "runs").glob("*/*/grid.png"))  # no work was done


def test_compare_takes_the_run_apps_keys_and_refuses_unknown_arguments(tmp_path):
    from locality.compare import main
    from locality.app.tracking import prepare_store

    uri = f"sqlite:///{tmp_path}/store.db"
    prepare_store(uri, "mine", str(tmp_path / "art"))
    assert main(["--list", f"tracking.uri={uri}", "tracking.experiment=mine"]) == 0
    with pytest.raises(SystemExit) as stop:
        main(["--list", "tracking.urx=sqlite:///elsewhere.db"])
    assert stop.value.code == 2
    # an absent store is named, not created
    assert main(["--list", f"tracking.uri=sqlite:///{tmp_path}/absent.db"]) == 2
    assert not (tmp_path / "absent.db").exists()


def test_a_sweep_with_a_bad_store_stops_before_any_cell(tmp_path):
    proc = run_app(["--multirun", "model=wiener,nearest_dataset", *SMALL[1:], "tracking.uri=foo://bar"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no tracking store for the scheme 'foo'" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "outputs" / "multiruns").glob("*/*/*_wiener_*"))  # no cell started
