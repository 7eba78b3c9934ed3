"""Every model × dataset composes, with the right per-dataset defaults and paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

MODELS = ["pca_locality", "optimal", "wiener", "nearest_dataset", "els", "pspc"]
DATASETS = {"mnist": (28, 0.005), "fashion_mnist": (28, 0.005), "cifar10": (32, 0.05),
            "celeba_hq": (64, 0.02), "afhq": (64, 0.02), "gaussian_field": (28, 0.02)}


def test_defaults_are_pca_locality_on_fashion_mnist():
    cfg = compose()
    assert cfg.model.name == "pca_locality" and cfg.dataset.name == "fashion_mnist"
    assert cfg.sampler.num_steps == 10 and cfg.sampler.num_samples == 8
    assert cfg.sampler.batch_size == 8 and cfg.sampler.seed == 42
    assert cfg.sampler.save_intermediates is False and cfg.hardware.device == "auto"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_every_model_and_dataset_compose(model, dataset):
    cfg = compose([f"model={model}", f"dataset={dataset}"])
    resolution, threshold = DATASETS[dataset]
    assert cfg.model.name == model and cfg.dataset.name == dataset
    assert cfg.dataset.resolution == resolution
    if model == "pca_locality":
        assert cfg.model.mask_threshold == threshold  # follows the dataset
    if model in ("pca_locality", "optimal"):
        assert cfg.model.temperature == 1.0
    for key in cfg:
        if key != "hydra":  # the hydra node needs a running job (hydra.job.num)
            OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]


def test_explicit_threshold_wins_over_dataset_default():
    cfg = compose(["dataset=cifar10", "model.mask_threshold=0.1"])
    assert cfg.model.mask_threshold == 0.1
    cfg = compose(["model.mask_threshold=0.3", "dataset=afhq"])  # order does not matter
    assert cfg.model.mask_threshold == 0.3


@pytest.mark.parametrize("hardware", ["auto", "cpu", "cuda", "mps"])
def test_hardware_choices(hardware):
    assert compose([f"hardware={hardware}"]).hardware.device == hardware


def test_paths_derive_from_one_root_and_are_absolute():
    cfg = compose()
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    assert Path(paths["root_dir"]) == REPO
    for key, value in paths.items():
        assert Path(value).is_absolute(), key
    assert cfg.tracking.uri == f"sqlite:///{REPO}/outputs/mlflow.db"
    moved = compose(["paths.root_dir=/tmp/elsewhere"])
    assert moved.dataset.root == "/tmp/elsewhere/data/datasets"
    assert moved.tracking.uri == "sqlite:////tmp/elsewhere/outputs/mlflow.db"


def test_run_directory_is_unique_per_process_and_names_the_run():
    cfg = compose(["model=wiener", "dataset=mnist"])
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith(f"{REPO}/outputs/runs/") and "_wiener_mnist_" in run_dir
    token = run_dir.rsplit("_", 1)[1]
    assert len(token) == 6 and int(token, 16) >= 0
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}_${model.name}_${dataset.name}"


def test_model_keys_are_checked_by_the_model():
    """model.dense_kernel and model.chunk_size reach the model as given; the model checks them."""
    import torch

    from locality.app.settings import model_params
    from locality.models import build_model
    from locality.statistics import fit_statistics

    name, params = model_params(compose(["model=pca_locality"]).model, torch.device("cpu"))
    assert name == "pca_locality" and params["dense_kernel"] == "auto" and params["chunk_size"] is None
    images = torch.rand(8, 1, 4, 4) * 2 - 1
    stats = fit_statistics(images, progress=False)
    for override, message in (("model.dense_kernel=tf32", "model.dense_kernel must be one of auto, float32, bf16x6, "
                                                          "bf16x3, int8, int8_onednn, int8_intmm, int8_gather, got 'tf32'"),
                              ("model.chunk_size=0", "model.chunk_size must be a positive integer or null, got 0")):
        name, params = model_params(compose(["model=pca_locality", override]).model, torch.device("cpu"))
        with pytest.raises(ValueError, match=message):
            build_model(name, images, stats, **params)
