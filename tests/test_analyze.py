"""python -m locality.analyze sensitivity: end to end on tiny generated data, its figures,
files and MLflow entries, and its one-line errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import compose, run_app

TINY_DATA = ["dataset=gaussian_field", "dataset.num_images=24", "dataset.resolution=8",
             "dataset.correlation_length=1.5", "sampler.num_steps=3", "hardware=cpu", "analysis.num_images=2"]


def _checkpoint(tmp_path):
    from locality.app.baseline import default_checkpoint_path
    from locality.unet.checkpoint import save_unet_checkpoint
    from locality.unet.network import UNet
    from synthetic import TINY_UNET as TINY

    torch.manual_seed(0)
    path = default_checkpoint_path(tmp_path / "data" / "models", "gaussian_field")
    save_unet_checkpoint(path, UNet(**TINY).eval())
    return path


@pytest.mark.slow
def test_analyze_sensitivity_end_to_end(tmp_path):
    from mlflow.tracking import MlflowClient

    ckpt = _checkpoint(tmp_path)
    proc = run_app(["sensitivity", "model=pca_locality", *TINY_DATA, f"baseline.checkpoint={ckpt}"], tmp_path,
                   module="locality.analyze")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out,) = [p.parent for p in (tmp_path / "outputs" / "analyze").glob("*/*/status.json")]
    assert "_sensitivity_pca_locality_gaussian_field_" in out.name
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["radius_heldout.png", "radius_trajectory.png", "sensitivity_heldout_px4_2.png",
                       "sensitivity_heldout_px4_4.png", "sensitivity_trajectory_px4_2.png",
                       "sensitivity_trajectory_px4_4.png"]
    saved = torch.load(out / "fields.pt", weights_only=False)
    assert saved["timesteps"] == [666, 333, 0] and saved["pixels"] == [(0, 4, 4), (0, 4, 2)]
    assert set(saved["fields"]) == {"heldout", "trajectory"}
    assert saved["fields"]["heldout"]["model"].shape == (2, 3, 1, 8, 8)
    assert saved["fields"]["heldout"]["unet"].shape == (2, 3, 1, 8, 8) and saved["masks"].shape == (2, 3, 1, 8, 8)
    # the model's field lives on its mask column (θ = the dataset's 0.02, the same threshold)
    assert torch.all(saved["fields"]["heldout"]["model"][saved["masks"] == 0] == 0)
    report = json.loads((out / "sensitivity.json").read_text())
    assert report["support_threshold"] == 0.02 and report["mass_fraction"] == 0.9
    assert "streamed softmax covariance" in report["methods"]["pca_locality"]
    assert report["methods"]["unet (baseline)"] == "autograd through the network"
    assert len(report["numbers"]) == 2 * 2 * 3  # sources × pixels × timesteps
    first = report["numbers"][0]
    assert {"radius_model", "radius_unet", "radius_mask", "correlation_vs_unet", "iou_vs_unet"} <= set(first)
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["heldout_radius_model_mean"] <= 8 * math.sqrt(2)
    assert -1 <= metrics["trajectory_correlation_vs_unet_t333"] <= 1
    assert math.isnan(metrics["heldout_correlation_vs_unet_t0"])  # at t = 0 the model copies: a zero field

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("locality").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["analysis"] == "sensitivity"
    assert run.data.tags["field_method.unet"] == "autograd through the network"
    assert run.info.run_name == "sensitivity_pca_locality_gaussian_field"
    assert "heldout_iou_vs_unet_mean" in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "heldout_px4_4_radius_unet")
    assert sorted(m.step for m in history) == [0, 1, 2]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert "figures/sensitivity_heldout_px4_4.png" in logged
    assert {"fields.pt", "sensitivity.json", "analyze.log"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_analyze_without_a_unet_and_bad_input(tmp_path):
    proc = run_app(["sensitivity", "model=wiener", *TINY_DATA, "baseline.checkpoint=null",
                    "analysis.sources=[heldout]", "analysis.timesteps=[500,20]", "analysis.pixels=[[0,0]]"], tmp_path,
                   module="locality.analyze")
    assert proc.returncode == 0, proc.stderr[-4000:]
    (out,) = [p.parent for p in (tmp_path / "outputs" / "analyze").glob("*/*/status.json")]
    saved = torch.load(out / "fields.pt", weights_only=False)
    assert set(saved["fields"]["heldout"]) == {"model"} and saved["timesteps"] == [500, 20]
    proc = run_app(["sensitivity", *TINY_DATA, "analysis.timesteps=[500]"], tmp_path, module="locality.analyze")
    assert proc.returncode == 2 and "are not steps of the sampler" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_app(["sensitivity", *TINY_DATA, "analysis.pixels=[[9,0]]"], tmp_path, module="locality.analyze")
    assert proc.returncode == 2 and "lies outside the 8×8 image" in proc.stderr
    proc = run_app(["sensitivities", *TINY_DATA], tmp_path, module="locality.analyze")
    assert proc.returncode == 2 and "usage: python -m locality.analyze {sensitivity}" in proc.stderr


def test_the_config_composes_the_run_apps_groups():
    cfg = compose(["model=els", "dataset=gaussian_field"], config_name="analyze")
    assert cfg.model.name == "els" and cfg.dataset.correlation_length == 3.0
    assert cfg.analysis.sources == ["heldout", "trajectory"] and cfg.analysis.pixels is None
