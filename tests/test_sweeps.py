"""Sweeps: multirun with one MLflow parent run, isolated failures, skip_completed, the
comparison table, the SLURM launcher presets and a real sweep through sbatch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, TINY_RUN, compose, run_app, runs_by_cell, sweep_dir
from data_factories import write_mnist_like


def test_local_sweep_isolates_failures_and_reruns_only_failed_cells(tmp_path):
    data = tmp_path / "mnist_data"
    grid = ["--multirun", "model=wiener,nearest_dataset", "dataset=fashion_mnist,mnist",
            f"dataset.root={data}", *TINY_RUN]
    proc = run_app(grid, tmp_path)  # MNIST is absent: its two cells fail, the others complete
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "2 of 4 cells failed" in text and "#1 model=wiener dataset=mnist" in text
    assert "#3 model=nearest_dataset dataset=mnist" in text and "sweep.skip_completed=true" in text
    sweep = sweep_dir(tmp_path)
    cells = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert cells == ["0_wiener_fashion_mnist", "1_wiener_mnist", "2_nearest_dataset_fashion_mnist",
                     "3_nearest_dataset_mnist"]
    assert (sweep / "0_wiener_fashion_mnist" / "metrics.json").exists()
    assert not (sweep / "1_wiener_mnist" / "metrics.json").exists()

    client, (parent,), children = runs_by_cell(tmp_path)
    assert parent.info.status == "FAILED" and parent.data.tags["failed_cells"] == "2"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    status = {(c.data.tags["model"], c.data.tags["dataset"]): c.info.status for c in children}
    assert status == {("wiener", "fashion_mnist"): "FINISHED", ("wiener", "mnist"): "FAILED",
                      ("nearest_dataset", "fashion_mnist"): "FINISHED", ("nearest_dataset", "mnist"): "FAILED"}
    failed = [c for c in children if c.info.status == "FAILED"]
    assert all("DatasetNotFoundError" in c.data.tags["error"] for c in failed)

    write_mnist_like(data, folder_name="MNIST", n_train=250, n_test=10, seed=0)  # fix the cause
    before = (sweep / "0_wiener_fashion_mnist" / "samples.pt").stat().st_mtime_ns
    proc = run_app([*grid, f"hydra.sweep.dir={sweep}", "sweep.skip_completed=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("already completed") == 2
    assert (sweep / "0_wiener_fashion_mnist" / "samples.pt").stat().st_mtime_ns == before  # not re-run
    assert (sweep / "1_wiener_mnist" / "metrics.json").exists()
    client, (parent,), children = runs_by_cell(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["failed_cells"] == "0"
    finished = {(c.data.tags["model"], c.data.tags["dataset"]) for c in children if c.info.status == "FINISHED"}
    assert len(finished) == 4

    # the comparison table of this sweep, as markdown and pictures logged to the parent
    compare = subprocess.run(
        [sys.executable, "-m", "locality.compare", parent.info.run_name, "--uri", f"sqlite:///{tmp_path}/mlflow.db"],
        capture_output=True, text=True, timeout=120,
    )
    assert compare.returncode == 0, compare.stderr
    assert "| model | fashion_mnist | mnist |" in compare.stdout
    assert "| nearest_dataset |" in compare.stdout and "| wiener |" in compare.stdout
    assert "sampling time" in compare.stdout
    png = sweep / "comparison" / "sampling_time_total_s.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert "comparison/sampling_time_total_s.png" in logged and "comparison/table.md" in logged


def test_compare_table_values_and_list(tmp_path):
    """Markdown cells are the children's metrics; missing cells show a dash."""
    from mlflow.tracking import MlflowClient

    from locality.compare import compare, main
    from locality.app.tracking import prepare_store

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = prepare_store(uri, "locality", str(tmp_path / "art"))
    client = MlflowClient(uri)
    parent = client.create_run(exp, run_name="grid", tags={"locality.sweep": "true",
                                                           "locality.sweep_dir": str(tmp_path / "sweep")})
    values = {("pca_locality", "mnist"): (0.91, 0.012), ("wiener", "mnist"): (0.55, 0.2),
              ("wiener", "cifar10"): (0.42, 0.3)}
    for (model, dataset), (r2, mse) in values.items():
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "model": model, "dataset": dataset})
        client.log_metric(run.info.run_id, "r2_vs_unet_final", r2)
        client.log_metric(run.info.run_id, "mse_vs_unet_final", mse)
        client.set_terminated(run.info.run_id)
    report = compare("grid", uri, "locality", tmp_path / "out")
    assert "| model | cifar10 | mnist |" in report
    assert "| pca_locality | — | 0.91 |" in report and "| wiener | 0.42 | 0.55 |" in report
    assert "| pca_locality | — | 0.012 |" in report
    assert (tmp_path / "out" / "r2_vs_unet_final.png").exists()
    assert main(["--list", "--uri", uri]) == 0


def launcher_parameters(cfg) -> dict:
    """What hydra-submitit-launcher hands submitit, for a composed config."""
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    params.pop("_target_")
    params.pop("submitit_folder")
    return params


def sbatch_text(cfg, folder: Path) -> str:
    """The sbatch script submitit would submit for ``cfg`` (built the way the launcher does)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    params = launcher_parameters(cfg)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params["name"] = "locality"
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m locality.run", "uid")


def test_slurm_preset_submission_script_carries_the_resources(tmp_path):
    cfg = compose(["hardware=slurm", "hydra.launcher.partition=short", "hydra.launcher.account=lab42",
                   "hydra.launcher.qos=high", "hydra.launcher.timeout_min=30", "hydra.launcher.mem_gb=12",
                   "hydra.launcher.cpus_per_task=3", "hydra.launcher.array_parallelism=5",
                   "hydra.launcher.setup=[module load cuda]"])
    assert cfg.hardware.device == "cpu"
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    text = sbatch_text(cfg, tmp_path)
    for line in ("#SBATCH --partition=short", "#SBATCH --account=lab42", "#SBATCH --qos=high",
                 "#SBATCH --time=30", "#SBATCH --mem=12GB", "#SBATCH --cpus-per-task=3", "module load cuda"):
        assert line in text, line
    assert cfg.hydra.launcher.array_parallelism == 5


def test_slurm_gpu_preset_asks_for_a_gpu(tmp_path):
    cfg = compose(["hardware=slurm_gpu"])
    assert cfg.hardware.device == "cuda" and cfg.hydra.launcher.gpus_per_node == 1
    text = sbatch_text(cfg, tmp_path)
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --mem=64GB" in text
    assert "export MLFLOW_DISABLE_TELEMETRY=true" in text


def test_paper_grid_preset_holds_the_reference_grid():
    cfg = compose(["experiment=paper_grid"])
    params = cfg.hydra.sweeper.params
    assert params.model.split(",") == ["pca_locality", "optimal", "wiener", "nearest_dataset", "els", "pspc"]
    assert params.dataset.split(",") == ["mnist", "fashion_mnist", "cifar10", "celeba_hq", "afhq"]
    assert cfg.sampler.num_samples == 128 and cfg.sweep.name == "paper_grid"


def slurm_env() -> dict[str, str]:
    conf = os.environ.get("SLURM_CONF") or str(REPO / ".slurm-local" / "etc" / "slurm.conf")
    ok = Path(conf).exists() and shutil.which("sinfo") and subprocess.run(
        ["sinfo", "-h"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True, timeout=30).returncode == 0
    if not ok:
        pytest.fail("no SLURM cluster answers: start it with scripts/slurm_local.sh start "
                    "(and eval \"$(scripts/slurm_local.sh env)\")")
    path = f"{REPO / '.slurm-local' / 'bin'}:{os.environ['PATH']}"
    return {"SLURM_CONF": conf, "PATH": path}


@pytest.mark.slurm
def test_sweep_through_a_real_slurm_cluster(tmp_path):
    env = slurm_env()
    data = tmp_path / "mnist_data"
    write_mnist_like(data, folder_name="MNIST", n_train=250, n_test=10, seed=1)
    proc = run_app(["--multirun", "hardware=slurm", "model=pca_locality,wiener", "dataset=fashion_mnist,mnist",
                    f"dataset.root={data}", *TINY_RUN, "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
                    "hydra.launcher.timeout_min=10", "hydra.launcher.array_parallelism=2"],
                   tmp_path, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep = sweep_dir(tmp_path)
    (script,) = sweep.glob(".submitit/*/*_submission.sh") or [None]
    text = script.read_text()
    assert "#SBATCH --array=0-3%2" in text and "#SBATCH --cpus-per-task=1" in text and "#SBATCH --mem=2GB" in text
    for cell in ("0_pca_locality_fashion_mnist", "1_pca_locality_mnist", "2_wiener_fashion_mnist", "3_wiener_mnist"):
        assert (sweep / cell / "metrics.json").exists(), cell
        assert (sweep / cell / "grid.png").exists(), cell
    _, (parent,), children = runs_by_cell(tmp_path)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert all(c.info.status == "FINISHED" for c in children)
    compare = subprocess.run(
        [sys.executable, "-m", "locality.compare", parent.info.run_name, "--uri", f"sqlite:///{tmp_path}/mlflow.db"],
        capture_output=True, text=True, timeout=120,
    )
    assert compare.returncode == 0, compare.stderr
    print(compare.stdout)
    assert "| pca_locality |" in compare.stdout and "| wiener |" in compare.stdout


def test_skip_completed_runs_again_a_cell_whose_config_changed(tmp_path):
    grid = ["--multirun", "model=wiener,nearest_dataset", *TINY_RUN, "hardware=cpu", "tracking.enabled=false"]
    assert run_app(grid, tmp_path).returncode == 0
    sweep = sweep_dir(tmp_path)
    again = [*grid, f"hydra.sweep.dir={sweep}"]
    proc = run_app(again, tmp_path)  # neither skip_completed nor overwrite: the finished cells are kept
    assert proc.returncode == 2 and "holds 2 finished cell(s)" in proc.stderr and "sweep.skip_completed=true" in proc.stderr
    before = (sweep / "1_nearest_dataset_fashion_mnist" / "samples.pt").stat().st_mtime_ns
    proc = run_app([*again, "sweep.skip_completed=true", "sampler.num_steps=3"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert text.count("completed with another config (sampler.num_steps: 2 -> 3)") == 2
    assert "already completed" not in text
    assert (sweep / "1_nearest_dataset_fashion_mnist" / "samples.pt").stat().st_mtime_ns != before
    assert "num_steps: 3" in (sweep / "0_wiener_fashion_mnist" / "config.yaml").read_text()
    proc = run_app([*again, "sweep.skip_completed=true", "sampler.num_steps=3"], tmp_path)
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).count("already completed") == 2
