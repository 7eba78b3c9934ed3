"""Tests of the cluster helper scripts: scripts/mlflow_server.sh and scripts/slurm_local.sh.

* The MLflow test starts a real tracking server on a free port (state in tmp_path),
  logs a run with params/metrics/an artifact through HTTP, finds it again and
  checks that `stop` leaves no process behind.
* The `slurm`-marked tests need the local cluster running; they FAIL (not skip)
  when it is not, so that CI notices a cluster that did not come up:

      scripts/slurm_local.sh start && eval "$(scripts/slurm_local.sh env)"
      pytest -m slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MLFLOW_SH = REPO / "scripts" / "mlflow_server.sh"
SLURM_SH = REPO / "scripts" / "slurm_local.sh"


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Prefer the mlflow next to the interpreter running the tests (the venv).
    candidate = Path(sys.executable).parent / "mlflow"
    if "MLFLOW_BIN" not in env and candidate.exists():
        env["MLFLOW_BIN"] = str(candidate)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION"):
        env.pop(var, None)
    env["MLFLOW_SERVER_RUN_DIR"] = str(tmp_path / "run")
    return env


def _pgroup_members(pgid: int) -> list[int]:
    """Pids of live processes whose process group is `pgid`."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # fields after the ")" closing the command name: state ppid pgrp ...
        fields = text.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- scripts
@pytest.mark.parametrize("script", [MLFLOW_SH, SLURM_SH], ids=lambda p: p.name)
def test_script_syntax_and_help(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    subprocess.run(["bash", "-n", str(script)], check=True)
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_slurm_local_env_and_status_when_stopped(tmp_path: Path) -> None:
    env = dict(os.environ, SLURM_LOCAL_DIR=str(tmp_path / "cluster"))
    out = subprocess.run([str(SLURM_SH), "env"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"export SLURM_CONF={tmp_path}/cluster/etc/slurm.conf" in out.stdout
    st = subprocess.run([str(SLURM_SH), "status"], env=env, capture_output=True, text=True, timeout=30)
    assert st.returncode == 3, (st.stdout, st.stderr)
    assert "not running" in st.stdout
    stop = subprocess.run([str(SLURM_SH), "stop"], env=env, capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0, stop.stderr


@pytest.mark.slow
def test_mlflow_server_logs_and_finds_run_with_artifact(tmp_path: Path) -> None:
    env = _mlflow_env(tmp_path)
    mlflow_bin = env.get("MLFLOW_BIN") or str(REPO / ".venv" / "bin" / "mlflow")
    if not Path(mlflow_bin).exists() and shutil.which("mlflow") is None:
        pytest.fail(f"mlflow executable not found ({mlflow_bin}); install the project venv")
    port = _free_port()
    common = ["--port", str(port), "--run-dir", str(tmp_path / "run")]
    start = [
        str(MLFLOW_SH), "start", "--background", *common,
        "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "mlartifacts"),
        "--workers", "1", "--timeout", "150",
    ]  # fmt: skip
    pid_file = tmp_path / "run" / f"mlflow-{port}.pid"
    pid = None
    try:
        out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=200)
        log = tmp_path / "run" / f"mlflow-{port}.log"
        assert out.returncode == 0, f"{out.stdout}\n{out.stderr}\n{log.read_text() if log.exists() else ''}"
        uri = f"http://127.0.0.1:{port}"
        assert f"tracking.uri={uri}" in out.stdout.splitlines()
        pid = int(pid_file.read_text())
        assert _alive(pid)

        # A second start on the same port is a no-op.
        again = subprocess.run(start, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already running" in again.stderr, again.stderr

        client = textwrap.dedent(
            """
            import os, sys, tempfile
            import mlflow
            from mlflow.tracking import MlflowClient

            uri = sys.argv[1]
            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment("mlflow-server-sh-test")
            with mlflow.start_run(run_name="roundtrip") as run:
                mlflow.log_params({"denoiser": "analytical", "k": 3})
                for step in range(3):
                    mlflow.log_metric("mse", 1.0 / (step + 1), step=step)
                d = tempfile.mkdtemp()
                with open(os.path.join(d, "hello.txt"), "w") as f:
                    f.write("hello artifact\\n")
                mlflow.log_artifact(os.path.join(d, "hello.txt"), artifact_path="files")
                run_id = run.info.run_id
                assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri

            runs = mlflow.search_runs(
                experiment_names=["mlflow-server-sh-test"],
                filter_string="params.denoiser = 'analytical' and metrics.mse < 0.5",
                output_format="list",
            )
            assert [r.info.run_id for r in runs] == [run_id], runs
            c = MlflowClient(uri)
            r = c.get_run(run_id)
            assert r.data.params == {"denoiser": "analytical", "k": "3"}, r.data.params
            assert abs(r.data.metrics["mse"] - 1 / 3) < 1e-9, r.data.metrics
            assert [a.path for a in c.list_artifacts(run_id, "files")] == ["files/hello.txt"]
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="files/hello.txt", tracking_uri=uri
            )
            assert open(local).read() == "hello artifact\\n"
            print("RUN_ID", run_id)
            """
        )
        # MLflow 3.17's telemetry thread races with requests (KeyError
        # '_MLFLOW_TELEMETRY_SESSION_ID') when there is no internet.
        cenv = dict(env, MLFLOW_TRACKING_URI=uri, MLFLOW_DISABLE_TELEMETRY="true")
        res = subprocess.run(
            [sys.executable, "-c", client, uri], env=cenv, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
        run_id = res.stdout.split("RUN_ID", 1)[1].split()[0]
        # The artifact went through the server into --artifacts-destination.
        stored = list((tmp_path / "mlartifacts").rglob("hello.txt"))
        assert len(stored) == 1 and run_id in str(stored[0]), stored

        st = subprocess.run(
            [str(MLFLOW_SH), "status", *common], env=env, capture_output=True, text=True, timeout=30
        )
        assert st.returncode == 0 and f"tracking.uri={uri}" in st.stdout, st.stdout
    finally:
        stop = subprocess.run(
            [str(MLFLOW_SH), "stop", *common], env=env, capture_output=True, text=True, timeout=60
        )

    assert stop.returncode == 0, stop.stderr
    assert not pid_file.exists()
    deadline = time.monotonic() + 15
    while pid is not None and (_alive(pid) or _pgroup_members(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = _pgroup_members(pid) if pid is not None else []
    for p in leftovers:  # do not leak processes into the rest of the session
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    assert pid is not None and not _alive(pid), "mlflow server still alive after stop"
    assert not leftovers, f"processes of the server's group left after stop: {leftovers}"
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
    st = subprocess.run([str(MLFLOW_SH), "status", *common], env=env, capture_output=True, text=True)
    assert st.returncode == 3


# --------------------------------------------------------------------------- SLURM
def _slurm_env() -> dict[str, str]:
    """Environment for the SLURM client commands, or pytest.fail if no cluster answers."""
    hint = 'start it with scripts/slurm_local.sh start (then eval "$(scripts/slurm_local.sh env)")'
    env = dict(os.environ)
    conf = env.get("SLURM_CONF")
    if not conf:
        state = Path(env.get("SLURM_LOCAL_DIR", REPO / ".slurm-local"))
        default = state if state.is_absolute() else REPO / state
        if (default / "etc" / "slurm.conf").exists():
            conf = str(default / "etc" / "slurm.conf")
            env["SLURM_CONF"] = conf
            env["PATH"] = f"{default / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if not conf:
        pytest.fail(f"SLURM_CONF is not set and no local cluster config exists; {hint}")
    if shutil.which("sinfo", path=env.get("PATH")) is None:
        pytest.fail(f"sinfo not found (slurm-wlm not installed); {hint}")
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%P %a %T"], env=env, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"sinfo did not answer within 30s (SLURM_CONF={conf}); {hint}")
    if out.returncode != 0 or not out.stdout.strip():
        pytest.fail(f"sinfo failed (SLURM_CONF={conf}): {out.stderr.strip()}; {hint}")
    return env


@pytest.mark.slurm
def test_slurm_sbatch_wait_runs_job(tmp_path: Path) -> None:
    env = _slurm_env()
    out_file = tmp_path / "job-%j.out"
    res = subprocess.run(
        [
            "sbatch", "--wait", "--parsable", "--job-name=locality-test",
            "--cpus-per-task=1", "--mem=512M", "--time=5",
            f"--chdir={tmp_path}", f"--output={out_file}",
            "--wrap", "echo hello-from-$SLURM_JOB_ID on $(hostname); echo cpus=$SLURM_CPUS_PER_TASK",
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, f"sbatch --wait failed: {res.stdout}\n{res.stderr}"
    job_id = res.stdout.strip().split(";")[0]
    text = (tmp_path / f"job-{job_id}.out").read_text()
    assert f"hello-from-{job_id} on " in text, text
    assert "cpus=1" in text, text


@pytest.mark.slurm
def test_slurm_array_job(tmp_path: Path) -> None:
    env = _slurm_env()
    res = subprocess.run(
        [
            "sbatch", "--wait", "--parsable", "--array=0-1", "--cpus-per-task=1", "--mem=256M",
            "--time=5", f"--chdir={tmp_path}", f"--output={tmp_path}/arr-%A_%a.out",
            "--wrap", "echo task=$SLURM_ARRAY_TASK_ID",
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    job_id = res.stdout.strip().split(";")[0]
    for task in (0, 1):
        text = (tmp_path / f"arr-{job_id}_{task}.out").read_text()
        assert f"task={task}" in text, text
