"""`python -m locality.run` end to end in a subprocess, and its answers to bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_app

SMALL = ["dataset.subset_size=300", "sampler.num_samples=4", "sampler.batch_size=3", "sampler.num_steps=4",
         "hardware=cpu"]


def single_run_dir(tmp: Path) -> Path:
    runs = list((tmp / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs
    return runs[0]


def mlflow_runs(tmp: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    return mlflow.search_runs(experiment_names=["locality"], output_format="list")


@pytest.mark.parametrize("model", ["pca_locality", "optimal", "wiener", "nearest_dataset"])
def test_each_model_runs_end_to_end(tmp_path, model):
    extra = ["sampler.save_intermediates=true"] if model == "pca_locality" else []
    proc = run_app([f"model={model}", *SMALL, *extra], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = single_run_dir(tmp_path)
    assert out.name.split("_", 1)[1].startswith(f"{model}_fashion_mnist_")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sampling_time_total_s"] > 0 and metrics["sampling_time_per_step_s"] > 0
    assert metrics["num_train_images"] == 300
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    samples = sorted((out / "samples").glob("sample_*.png"))
    assert [p.name for p in samples] == [f"sample_{i:04d}.png" for i in range(4)]
    for png in [*samples, out / "grid.png"]:
        with Image.open(png) as img:
            img.load()
            assert img.size[0] >= 28
    assert "model:" in (out / "config.yaml").read_text()
    log_text = (out / "run.log").read_text()
    assert "sampled 4 images" in log_text
    if extra:
        for kind in ("x_t", "x0_pred"):
            names = sorted(p.name for p in (out / "intermediates" / kind).glob("*.png"))
            assert names == ["step_00_t0750.png", "step_01_t0500.png", "step_02_t0250.png", "step_03_t0000.png"]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{model}_fashion_mnist"
    assert run.data.params["model.name"] == model and run.data.params["sampler.num_samples"] == "4"
    assert run.data.metrics["sampling_time_total_s"] == pytest.approx(metrics["sampling_time_total_s"])
    assert run.data.tags["model"] == model and run.data.tags["dataset"] == "fashion_mnist"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"grid.png", "metrics.json", "config.yaml", "samples", "run.log"} <= artifacts
    assert str(tmp_path / "outputs" / "mlartifacts") in run.info.artifact_uri  # never the job's cwd
    if model != "wiener":  # the models that measure their kernels keep the choices under paths.cache_dir
        (store,) = (tmp_path / "data" / "cache" / "kernels").glob("*.json")
        decisions = json.loads(store.read_text())["decisions"]
        assert any(key.startswith(f"{model}|") for key in decisions), decisions
        if model == "pca_locality":
            assert "kernel choice pca_locality|" in log_text  # the log names the winner and the rates


@pytest.mark.parametrize("model", ["wiener", "pca_locality"])
def test_same_seed_gives_the_same_samples(tmp_path, model):
    """Also for a model whose kernels are measured: the second run reads the first one's choices."""
    import torch

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir(exist_ok=True)
        proc = run_app([f"model={model}", *SMALL, "tracking.enabled=false", f"paths.data_dir={tmp_path}/data"],
                       tmp_path / sub)
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(single_run_dir(tmp_path / "a") / "samples.pt")
    b = torch.load(single_run_dir(tmp_path / "b") / "samples.pt")
    assert torch.equal(a, b)


def test_unknown_model_is_a_clear_error(tmp_path):
    proc = run_app(["model=pca_localty"], tmp_path)
    assert proc.returncode != 0
    assert "pca_localty" in proc.stderr and "pca_locality" in proc.stderr  # lists the options


def test_unknown_dataset_is_a_clear_error(tmp_path):
    proc = run_app(["dataset=imagenet"], tmp_path)
    assert proc.returncode != 0
    assert "imagenet" in proc.stderr and "fashion_mnist" in proc.stderr


def test_wrong_type_in_an_override_is_a_clear_error(tmp_path):
    proc = run_app(["sampler.num_steps=ten", "hardware=cpu"], tmp_path)
    assert proc.returncode == 2
    assert "sampler.num_steps must be an integer" in proc.stderr and "'ten'" in proc.stderr
    out = single_run_dir(tmp_path)
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED" and "num_steps" in run.data.tags["error"]


def test_missing_dataset_says_what_where_and_how(tmp_path):
    proc = run_app(["dataset=cifar10", "hardware=cpu"], tmp_path)
    assert proc.returncode == 2
    assert "cifar-10-batches-py" in proc.stderr and str(tmp_path / "data" / "datasets") in proc.stderr
    assert "dataset.download=true" in proc.stderr
    out = single_run_dir(tmp_path)
    assert not (out / "metrics.json").exists() and not (out / "grid.png").exists()
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"


def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    import torch

    assert not torch.cuda.is_available(), "this test expects a machine without CUDA"
    proc = run_app(["hardware=cuda", *SMALL[:1]], tmp_path)
    assert proc.returncode == 2
    assert "hardware=cuda" in proc.stderr and "no CUDA device" in proc.stderr
    assert not (single_run_dir(tmp_path) / "metrics.json").exists()


def test_corrupt_statistics_cache_is_recomputed_with_a_warning(tmp_path):
    args = ["model=wiener", *SMALL, "tracking.enabled=false"]
    assert run_app(args, tmp_path).returncode == 0
    (cache,) = (tmp_path / "data" / "cache" / "statistics").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    proc = run_app(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recomputing" in proc.stdout + proc.stderr
    assert cache.stat().st_size > 1000  # replaced whole


def test_float64_accumulating_models_refuse_mps_clearly():
    import torch

    from locality.app.config import ConfigError
    from locality.app.settings import model_params, place_model
    from conftest import compose

    with pytest.raises(ConfigError, match="hardware=cpu"):
        place_model("optimal", torch.device("mps"), auto=False)
    assert place_model("optimal", torch.device("mps"), auto=True) == torch.device("cpu")
    assert place_model("wiener", torch.device("mps"), auto=False) == torch.device("mps")
    name, params = model_params(compose(["model=wiener"]).model, torch.device("mps"))
    assert name == "wiener" and params["dtype"] == torch.float32  # MPS has no float64


def test_image_folder_dataset_runs_and_keeps_its_decoded_pixels(tmp_path):
    """dataset=celeba_hq from a folder of JPEGs: the first run decodes and keeps the pixels in
    paths.cache_dir/decoded, the second reads them (its log says so); cache_decoded=false opts out."""
    from data_factories import write_image_folder

    write_image_folder(tmp_path / "data" / "datasets" / "celeba_hq" / "train", n=12, size=(20, 18), ext="jpg", seed=5)
    args = ["model=wiener", "dataset=celeba_hq", "dataset.resolution=8", "sampler.num_samples=2",
            "sampler.num_steps=2", "hardware=cpu", "tracking.enabled=false"]
    for attempt in range(2):
        proc = run_app(args, tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    (kept,) = (tmp_path / "data" / "cache" / "decoded").glob("celeba_hq-train-8px-12img-*.pt")
    first, second = sorted((tmp_path / "outputs").rglob("run.log"), key=lambda p: p.stat().st_mtime)
    assert "kept the decoded images of celeba_hq/train" in first.read_text()
    assert "read 12 decoded images of celeba_hq/train" in second.read_text()
    assert "kept the decoded images" not in second.read_text()
    kept.unlink()
    proc = run_app([*args, "dataset.cache_decoded=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not kept.exists()


def test_a_directory_holding_a_finished_run_is_refused_unless_overwritten(tmp_path):
    run_dir = tmp_path / "earlier_run"
    args = ["model=wiener", *SMALL, "tracking.enabled=false", f"hydra.run.dir={run_dir}"]
    assert run_app(args, tmp_path).returncode == 0
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_app([*args, "sampler.seed=7"], tmp_path)
    assert proc.returncode == 2 and "holds a finished run" in proc.stderr and "output.overwrite=true" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept  # not a byte changed
    proc = run_app([*args, "sampler.seed=7", "output.overwrite=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run_dir / "samples.pt").read_bytes() != kept[run_dir / "samples.pt"]
    assert "seed: 7" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("override, message", [
    ("output.save_samples=no", "output.save_samples must be true or false, got 'no'"),
    ("output.grid_columns=0", "output.grid_columns must be ≥ 1, got 0"),
    ("model.temperature=inf", "model.temperature must be a finite number, got inf"),
    ("progress=yes", "progress must be true or false, got 'yes'"),
])
def test_values_of_the_wrong_kind_are_refused_before_any_work(tmp_path, override, message):
    proc = run_app(["model=pca_locality", *SMALL, override], tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    out = single_run_dir(tmp_path)
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert not (out / "samples.pt").exists()


def test_a_checkpoint_that_pickles_code_is_refused_unless_trusted(tmp_path):
    import torch

    from locality.unet.network import UNet
    from synthetic import TINY_UNET, Payload

    marker = tmp_path / "payload_ran"
    net = UNet(**TINY_UNET)
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": net.state_dict(), "unet_config": dict(net.config), "x": Payload(marker)}, evil)
    for args in (["model=wiener", f"baseline.checkpoint={evil}"], ["model=unet", f"model.checkpoint={evil}"]):
        proc = run_app([*args, *SMALL, "tracking.enabled=false"], tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "could run code" in proc.stderr and "trust_checkpoint=true" in proc.stderr
        assert not marker.exists()  # nothing in the file ran
    proc = run_app(["model=unet", f"model.checkpoint={evil}", "++model.trust_checkpoint=true", *SMALL,
                    "tracking.enabled=false", "baseline.checkpoint=null"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.exists()  # the explicit opt-in unpickles everything, as documented
