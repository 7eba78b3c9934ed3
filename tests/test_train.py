"""The training app: config composition, and train -> checkpoint -> resume in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_factories import write_mnist_like
from locality.app.config import ConfigError, config_dir, register_resolvers
from locality.models.unet_denoiser import UNetDenoiser
from locality.train import unet_architecture
from locality.unet.checkpoint import load_unet_checkpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_train_config_groups() -> None:
    cfg = _compose(["dataset=mnist"])
    assert cfg.train.name == "default" and cfg.train.epochs == 200 and cfg.train.unet == "auto"
    assert cfg.train.checkpoint_dir == f"{cfg.paths.model_dir}/baseline_unet/mnist"
    assert unet_architecture(cfg.train, "mnist", 1) == "28px_1ch"
    quick = _compose(["train=quick_cpu", "dataset=cifar10"])
    assert quick.train.name == "quick_cpu" and quick.train.lr == cfg.train.lr  # inherits the default
    arch = unet_architecture(quick.train, "cifar10", 3)
    assert arch["in_channels"] == 3 and arch["out_channels"] == 3 and arch["ch_mult"] == [1, 2]
    assert quick.train.checkpoint_dir.endswith("baseline_unet_quick/cifar10")
    assert unet_architecture(OmegaConf.create({"unet": "32px_3ch"}), "celeba_hq", 3) == "32px_3ch"
    with pytest.raises(ConfigError, match="train.unet"):
        unet_architecture(OmegaConf.create({"unet": "huge"}), "mnist", 1)
    with pytest.raises(ConfigError, match="no published UNet setting"):
        unet_architecture(OmegaConf.create({"unet": "auto"}), "other", 1)


def test_quick_cpu_takes_dataset_subset_size_from_the_command_line() -> None:
    """The preset's 10 000 images are a default: dataset.subset_size=200 trains on 200."""
    assert _compose(["train=quick_cpu"]).train.subset_size == 10000
    assert _compose(["train=quick_cpu", "dataset.subset_size=200"]).train.subset_size == 200
    assert _compose(["train=quick_cpu", "train.subset_size=300"]).train.subset_size == 300
    assert _compose([]).train.subset_size is None  # the default recipe: all images


def _train(tmp_path: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "locality.train", f"paths.data_dir={tmp_path}",
         f"paths.output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
         "dataset=mnist", "hardware=cpu", "progress=false", "train=quick_cpu", "train.unet.dropout=0.0",
         "train.subset_size=null", "train.epochs=2", "train.batch_size=4", "train.log_every=1",
         "train.warmup_steps=0", "train.samples.num_samples=2", "train.samples.num_steps=2", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
def test_train_app_checkpoint_and_resume(tmp_path: Path) -> None:
    import mlflow

    write_mnist_like(tmp_path / "datasets", folder_name="MNIST", n_train=12, seed=2)  # 3 batches of 4
    ckpt_dir = tmp_path / "models" / "baseline_unet_quick" / "mnist"

    # 1) stop after 2 optimizer steps, mid-epoch: last.pt only
    proc = _train(tmp_path, ["train.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = read_checkpoint(ckpt_dir / "last.pt")
    assert last["step"] == 2 and last["epoch"] == 0 and last["batch_in_epoch"] == 2
    assert not list(ckpt_dir.glob("ckpt_epoch_*.pt"))

    # 2) resume to the end of epoch 2: 6 steps in total, a checkpoint per epoch
    proc = _train(tmp_path, ["train.resume=true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epoch in (1, 2):
        assert (ckpt_dir / f"ckpt_epoch_{epoch}.pt").exists()
    final = read_checkpoint(ckpt_dir / "ckpt_epoch_2.pt")
    assert final["step"] == 6 and final["epoch"] == 2
    assert set(final) >= {"model_state_dict", "unet_config", "net_state_dict", "optimizer_state_dict"}
    # the published format: loads (architecture from unet_config) and denoises
    net = load_unet_checkpoint(ckpt_dir / "ckpt_epoch_2.pt")
    assert net.config["ch_mult"] == [1, 2] and net.config["in_channels"] == 1
    x0 = UNetDenoiser(net)(torch.randn(2, 1, 28, 28), 500)
    assert x0.shape == (2, 1, 28, 28) and torch.isfinite(x0).all()

    runs_dir = sorted((tmp_path / "out" / "train").glob("*/*/metrics.json"))
    assert len(runs_dir) == 2
    metrics = [json.loads(p.read_text()) for p in runs_dir]
    resumed = [m for m in metrics if m["resumed_from"]]
    assert len(resumed) == 1 and resumed[0]["steps"] == 6 and resumed[0]["epochs_completed"] == 2
    assert resumed[0]["resumed_from"] == str(ckpt_dir / "last.pt")
    assert list(runs_dir[0].parent.glob("samples/*.png")) or list(runs_dir[1].parent.glob("samples/*.png"))

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["locality-train"])
    assert len(runs) == 2 and set(runs["status"]) == {"FINISHED"}
    client = mlflow.tracking.MlflowClient()
    for run_id in runs["run_id"]:
        assert client.get_metric_history(run_id, "train/loss")
    resumed_run = runs[runs["metrics.steps"] == 6].iloc[0]
    steps = sorted(m.step for m in client.get_metric_history(resumed_run["run_id"], "train/loss"))
    assert steps == [3, 4, 5, 6]
    assert [f.path for f in client.list_artifacts(resumed_run["run_id"], "samples")]
